"""DPOConfig options beyond the loss type: FusedDPOTrainer against stock trl.DPOTrainer.

For each configuration, a few steps of stock and fused training from the same seed: every logged
value (train, and eval on a dict of two datasets) and the final parameters agree in float32. SGD
runs expose a uniform gradient scale error that AdamW would hide; AdamW runs check the rest.
"""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import TRAINER_DEVICE, tiny_causal_lm  # noqa: E402
from test_trl import preference_dataset, tiny_tokenizer  # noqa: E402

from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402

STEPS = 3
# Timing entries of the logs differ between any two runs.
VOLATILE = ("runtime", "per_second")


def empty_prompts(ds):
    """The same pairs without prompts: completions start at position 0 (no token predicts them)."""
    return ds.map(lambda ex: {"prompt": "", "chosen": ex["chosen"][1:]})


def run(trainer_cls, tmp_path, *, optim="sgd", no_prompt=False, peft=False, kernel=None, **config):
    """Trains STEPS steps, evaluates on {"a", "b"} at the end; (log history, final parameters).
    kernel: FusedDPOTrainer's own options."""
    datasets.disable_caching()
    model = tiny_causal_lm("llama", vocab=28, seed=0)
    kwargs = dict(kernel or {})
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
    else:  # a reference different from the policy: rewards are real from step 0
        kwargs["ref_model"] = tiny_causal_lm("llama", vocab=28, seed=1)
    train, evals = (
        preference_dataset(16),
        {
            "a": preference_dataset(8, seed=1),
            "b": preference_dataset(6, seed=2),
        },
    )
    if no_prompt:
        train, evals = empty_prompts(train), {k: empty_prompts(v) for k, v in evals.items()}
    args = trl.DPOConfig(
        output_dir=str(tmp_path / trainer_cls.__name__),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=STEPS,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=STEPS,
        learning_rate=0.3 if optim == "sgd" else 5e-3,
        optim=optim,
        # Adam divides by sqrt(v) + eps: a larger eps keeps float32 rounding of a near-zero gradient
        # entry (relative noise ~1e-7 of the tensor's scale) from moving that entry by ~lr / 100.
        adam_epsilon=1e-6,
        report_to=[],
        save_strategy="no",
        **TRAINER_DEVICE,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        **config,
    )
    torch.manual_seed(0)  # PEFT draws its adapter weights in the trainer's __init__
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train, eval_dataset=evals,
        processing_class=tiny_tokenizer(), **kwargs,
    )  # fmt: skip
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer.state.log_history, params


def assert_same_run(stock, ours, rel=1e-5, abs_=1e-6):
    (s_logs, s_params), (o_logs, o_params) = stock, ours
    assert len(s_logs) == len(o_logs)
    seen = set()
    for s, o in zip(s_logs, o_logs, strict=True):
        assert s.keys() == o.keys()
        for k in s:
            if any(v in k for v in VOLATILE):
                continue
            assert o[k] == pytest.approx(s[k], rel=rel, abs=abs_), (k, s[k], o[k])
            seen.add(k)
    # Training and both evaluations were logged, with the DPO metrics.
    for k in ("loss", "rewards/margins", "eval_a_loss", "eval_b_loss", "eval_rewards/margins"):
        assert k in seen, k
    assert s_params.keys() == o_params.keys()
    moved = False
    for n, p in s_params.items():
        torch.testing.assert_close(
            o_params[n], p, rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}"
        )
    first = [h for h in s_logs if "loss" in h]
    moved = first[0]["logps/chosen"] != first[-1]["logps/chosen"]
    assert moved, "training did not change the policy: the comparison proves nothing"


CONFIGS = {
    # Completions from position 0: sft averages over the scored (shifted) tokens.
    "sft-no-prompt": dict(no_prompt=True, loss_type=["sft"]),
    # ipo and sigmoid_norm divide by the unshifted completion lengths, sft by the shifted count.
    "ipo+sigmoid_norm+sft-no-prompt-adamw": dict(
        no_prompt=True,
        loss_type=["ipo", "sigmoid_norm", "sft"],
        loss_weights=[1.0, 0.5, 0.5],
        optim="adamw_torch",
    ),
    # The fused route (no sft): ipo and sigmoid_norm divide by the unshifted completion lengths,
    # one more than the scored tokens when a completion starts at position 0.
    "ipo+sigmoid_norm-no-prompt": dict(
        no_prompt=True, loss_type=["ipo", "sigmoid_norm"], loss_weights=[1.0, 0.5]
    ),
    # The reference is the policy without its (non-zero) adapter, precomputed.
    "peft-precompute": dict(peft=True, precompute_ref_log_probs=True),
    "peft-adamw": dict(peft=True, optim="adamw_torch"),
    # Stock TRL 1.16 warns and trains on padded batches; so do we.
    "padding-free": dict(padding_free=True),
    "wpo": dict(use_weighting=True),
    "wpo-mix-adamw": dict(
        use_weighting=True,
        loss_type=["sigmoid", "ipo"],
        loss_weights=[1.0, 0.3],
        optim="adamw_torch",
    ),
    # The reference follows the policy (mixup every step): each step reads the updated reference.
    "sync-ref": dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
    # Two micro-batches per step, the clipped norm of their summed gradient: a loss not divided
    # by the accumulation steps, or divided twice, moves every parameter.
    "grad-accum-clip": dict(
        gradient_accumulation_steps=2, max_grad_norm=0.05, loss_type=["sigmoid", "sft"]
    ),
    "ld-alpha-sft": dict(ld_alpha=0.5, loss_type=["sigmoid", "sft"]),
    "ld-alpha-sft-only-adamw": dict(ld_alpha=0.3, loss_type=["sft"], optim="adamw_torch"),
}
# The logits path (fused_lm_head=False) too where the options read the new log_sum_sq statistic,
# and for the accumulated steps.
CASES = [(name, True) for name in CONFIGS] + [
    (name, False) for name in ("wpo", "wpo-mix-adamw", "grad-accum-clip")
]
_stock_runs = {}


@pytest.mark.parametrize(
    ("name", "fused_lm_head"), CASES, ids=[f"{n}-{'head' if f else 'logits'}" for n, f in CASES]
)
def test_option_trains_like_stock(name, fused_lm_head, tmp_path):
    config = CONFIGS[name]
    if name.startswith("peft"):
        pytest.importorskip("peft")
    if name not in _stock_runs:
        _stock_runs[name] = run(trl.DPOTrainer, tmp_path, **config)
    ours = run(FusedDPOTrainer, tmp_path, kernel={"fused_lm_head": fused_lm_head}, **config)
    assert_same_run(_stock_runs[name], ours)
