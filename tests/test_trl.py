"""FusedDPOTrainer against stock trl.DPOTrainer: same losses and logged metrics over 5 steps."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import TRAINER_DEVICE, tiny_causal_lm  # noqa: E402

from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(LETTERS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def preference_dataset(n=16, seed=0, length=None):
    """n rows of random letters; completions of 1-6 words, or of `length` words."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)

    def words(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(LETTERS[int(i)] for i in torch.randint(0, 26, (k,), generator=g))

    lo, hi = (1, 7) if length is None else (length, length + 1)
    rows = [
        {
            "prompt": words(2, 6),
            "chosen": " " + words(lo, hi) + " </s>",
            "rejected": " " + words(lo, hi) + " </s>",
        }
        for _ in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def train(trainer_cls, loss_type, precompute, tmp_path, bf16=False, **trainer_kwargs):
    datasets.disable_caching()
    model = tiny_causal_lm("llama", vocab=28, seed=0)
    # A reference different from the policy: rewards are real from step 0, not rounding noise.
    ref = tiny_causal_lm("llama", vocab=28, seed=1)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / trainer_cls.__name__),
        per_device_train_batch_size=4,
        max_steps=5,
        logging_steps=1,
        learning_rate=0.5,
        optim="sgd",  # Adam turns 1e-7 gradient rounding into O(1) updates of tiny entries
        report_to=[],
        save_strategy="no",
        **TRAINER_DEVICE,
        seed=0,
        loss_type=[loss_type],
        label_smoothing=0.1 if loss_type == "robust" else 0.0,
        precompute_ref_log_probs=precompute,
        dataloader_num_workers=0,
        bf16=bf16,  # TRL turns CPU bf16 autocast on by default
    )
    trainer = trainer_cls(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=preference_dataset(),
        processing_class=tiny_tokenizer(),
        **trainer_kwargs,
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


KEYS = [
    "loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "entropy", "logits/chosen",
    "logits/rejected", "mean_token_accuracy", "num_tokens",
]  # fmt: skip


def assert_same_history(stock, ours, rel, abs_):
    assert len(stock) == len(ours) == 5
    for step, (s, o) in enumerate(zip(stock, ours, strict=True)):
        for k in KEYS:
            assert k in s and k in o, (step, k)
            assert o[k] == pytest.approx(s[k], rel=rel, abs=abs_), (step, k, s[k], o[k])
    # Training moved the policy: the run is not trivially constant.
    assert stock[0]["logps/chosen"] != stock[-1]["logps/chosen"]


@pytest.mark.parametrize("precompute", [False, True], ids=["ref-model", "precomputed"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_same_losses_and_metrics_as_stock_trl(loss_type, precompute, tmp_path):
    stock = train(trl.DPOTrainer, loss_type, precompute, tmp_path)
    ours = train(FusedDPOTrainer, loss_type, precompute, tmp_path)
    assert_same_history(stock, ours, rel=1e-4, abs_=1e-6)


def test_logits_path_option_matches_stock_trl(tmp_path):
    stock = train(trl.DPOTrainer, "sigmoid", False, tmp_path)
    ours = train(FusedDPOTrainer, "sigmoid", False, tmp_path, fused_lm_head=False)
    assert_same_history(stock, ours, rel=1e-4, abs_=1e-6)


def test_bf16_autocast_close_to_stock_trl(tmp_path):
    # TRL's default on CPU: bf16 autocast. Both heads take bf16 inputs and return the head's
    # gradients in float32; TRL's rounds its logit and gradient tiles to bf16, ours keeps them in
    # float32 (100x closer to float64): differences of bf16 rounding (measured: 5.4e-5 in the
    # loss, 1.1e-3 in a log-prob sum, 3.7e-4 in grad_norm).
    stock = train(trl.DPOTrainer, "sigmoid", False, tmp_path, bf16=True)
    for fused_lm_head in (True, False):
        ours = train(FusedDPOTrainer, "sigmoid", False, tmp_path, bf16=True,
                     fused_lm_head=fused_lm_head)  # fmt: skip
        assert_same_history(stock, ours, rel=2e-3, abs_=5e-4)


def test_bf16_autocast_head_gradient_as_float64_on_rounded_inputs(tmp_path, monkeypatch):
    # bf16=True on a float32 model: the fused head's ops cast the head's inputs to bf16 inside
    # the op and hand the head its gradient in float32, as stock TRL's head does: one SGD step's
    # lm_head gradient matches float64 on the bf16-rounded hidden states and head (the same DPO
    # loss) to 1.2e-7 (relative, Frobenius). Cast before the ops, it came back rounded to bf16:
    # 1.8e-3; stock TRL's head, whose logit and gradient tiles are bf16: 1.6e-3.
    from dpo_kernels import dpo_loss, fused_head

    calls, grads = [], {}

    def spy(head, hidden, call, transform, full):
        if torch.is_grad_enabled():  # the policy's pass (not the reference's)
            calls.append((head.weight.detach().clone(), hidden.detach().clone(), call))
        return fused_head._run_head(head, hidden, call, transform, full)

    monkeypatch.setattr(fused_head, "_EAGER_RUN_HEAD", spy)

    def head_grad(trainer_cls):
        model = tiny_causal_lm("llama", vocab=28, seed=0)
        model.lm_head.weight.register_post_accumulate_grad_hook(
            lambda p: grads.__setitem__(trainer_cls, p.grad.detach().clone())
        )
        args = trl.DPOConfig(
            output_dir=str(tmp_path / trainer_cls.__name__), per_device_train_batch_size=4,
            max_steps=1, learning_rate=1.0, optim="sgd", max_grad_norm=0, report_to=[],
            save_strategy="no", **TRAINER_DEVICE, seed=0, dataloader_num_workers=0, bf16=True,
        )  # fmt: skip
        trainer_cls(
            model=model, ref_model=tiny_causal_lm("llama", vocab=28, seed=1), args=args,
            train_dataset=preference_dataset(), processing_class=tiny_tokenizer(),
        ).train()  # fmt: skip
        return grads[trainer_cls].double()

    ours, stock = head_grad(FusedDPOTrainer), head_grad(trl.DPOTrainer)
    assert grads[FusedDPOTrainer].dtype == torch.float32
    ((weight, hidden, call),) = calls
    w64 = weight.to(torch.bfloat16).double().requires_grad_()
    z = hidden.to(torch.bfloat16).double() @ w64.T
    lp = z.log_softmax(-1).gather(-1, call.labels[..., None].long())[..., 0]
    sums = torch.where(call.mask, lp, 0.0).sum(-1)
    d, P = call.dpo, sums.shape[0] // 2
    dpo_loss(
        sums[:P], sums[P:], d.ref_chosen_logps.double(), d.ref_rejected_logps.double(),
        chosen_counts=d.chosen_counts, rejected_counts=d.rejected_counts, spec=d.spec,
        backend="reference",
    ).loss.backward()  # fmt: skip
    want = w64.grad
    err = ((ours - want).norm() / want.norm()).item()
    assert err <= 1e-5, err
    # The same target as stock's head, up to its bf16 tiles.
    assert ((stock - want).norm() / want.norm()).item() <= 4e-3


@pytest.mark.parametrize("fused_lm_head", [True, False])
def test_bf16_autocast_reaches_the_backbone(tmp_path, fused_lm_head):
    # accelerate's mixed precision wraps the model's forward in autocast; the fused head's path
    # runs the backbone itself, so it takes the same autocast (it ran in float32 before), and
    # the fused ops cast the head's inputs to bf16, as autocast would for a matmul.
    model = tiny_causal_lm("llama", vocab=28)
    seen = []
    layer = model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    args = trl.DPOConfig(
        output_dir=str(tmp_path), report_to=[], **TRAINER_DEVICE, bf16=True, max_steps=1,
        per_device_train_batch_size=4, save_strategy="no",
    )  # fmt: skip
    FusedDPOTrainer(
        model=model, ref_model=tiny_causal_lm("llama", vocab=28, seed=1), args=args,
        train_dataset=preference_dataset(4), processing_class=tiny_tokenizer(),
        fused_lm_head=fused_lm_head,
    ).train()  # fmt: skip
    assert seen and set(seen) == {torch.bfloat16}, seen


def test_prompt_learning_peft_on_the_logits_path(tmp_path):
    # PromptTuning prepends virtual tokens: the logits path drops their positions, as stock does,
    # and trains like stock; the fused head, whose hidden states would not line up, is refused.
    peft = pytest.importorskip("peft")

    def config():
        return peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3)

    stock = train(trl.DPOTrainer, "sigmoid", False, tmp_path, peft_config=config())
    ours = train(FusedDPOTrainer, "sigmoid", False, tmp_path, peft_config=config(),
                 fused_lm_head=False)  # fmt: skip
    assert_same_history(stock, ours, rel=1e-4, abs_=1e-6)
    with pytest.raises(ValueError, match="prompt-learning PEFT"):
        train(FusedDPOTrainer, "sigmoid", False, tmp_path, peft_config=config())


def test_unsupported_options_raise(tmp_path):
    # Stock TRL 1.16 fails at its first step on WPO weighting with sft: we refuse it up front.
    args = trl.DPOConfig(
        output_dir=str(tmp_path), **TRAINER_DEVICE, report_to=[], use_weighting=True,
        loss_type=["sigmoid", "sft"],
    )  # fmt: skip
    model = tiny_causal_lm("llama", vocab=28)
    with pytest.raises(NotImplementedError, match="use_weighting=True with loss_type 'sft'"):
        FusedDPOTrainer(
            model=model, ref_model=copy.deepcopy(model), args=args,
            train_dataset=preference_dataset(4), processing_class=tiny_tokenizer(),
        )  # fmt: skip


def test_unsupported_trl_version_is_refused_with_the_supported_range(monkeypatch):
    from dpo_kernels.integrations import trl as integration

    monkeypatch.setattr(trl, "__version__", "0.9.6")
    with pytest.raises(ImportError, match=r"supports trl>=1\.16,<1\.17; found trl 0\.9\.6"):
        integration.check_trl_version()
    monkeypatch.setattr(trl, "__version__", "1.16.0")
    assert integration.check_trl_version() == "1.16.0"
