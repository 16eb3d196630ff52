"""The trainers take the fused linear DPO route (`linear_dpo` inside the LM head call) by default,
and train like stock TRL on it (SGD and AdamW): every logged value and the final parameters."""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import (  # noqa: E402
    TRAINER_DEVICE,
    preference_examples,
    prompt_tuned_lm,
    scaled_head_lm,
    tiny_causal_lm,
)
from test_trl_parity import STEPS, train  # noqa: E402

import dpo_kernels.linear_dpo as linear_dpo_module  # noqa: E402
from dpo_kernels import DPOLoss  # noqa: E402
from dpo_kernels.batches import collate_preferences  # noqa: E402
from dpo_kernels.forward import concatenated_forward  # noqa: E402
from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402


@pytest.fixture
def linear_dpo_calls(monkeypatch):
    """Counts `linear_dpo` calls, by whether they ran with gradient (a training step)."""
    calls = {"grad": 0, "no_grad": 0}
    real = linear_dpo_module.linear_dpo

    def spy(*args, **kwargs):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_dpo_module, "linear_dpo", spy)
    return calls


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type=["sigmoid"]),
        dict(loss_type=["ipo"]),  # divides by the unshifted completion lengths (TRL's)
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),  # sft: the scored tokens
        dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.7, 0.3], optim="adamw_torch"),
        dict(loss_type=["aot"], label_smoothing=0.1, optim="adamw_torch"),  # the two-pass route
    ],
    ids=["sigmoid-sgd", "ipo-sgd", "sigmoid+sft-sgd", "mix-adamw", "aot-adamw"],
)
def test_default_route_is_linear_dpo_and_matches_stock(config, linear_dpo_calls, tmp_path):
    stock, stock_params = train(trl.DPOTrainer, tmp_path, **config)
    assert linear_dpo_calls == {"grad": 0, "no_grad": 0}
    ours, our_params = train(FusedDPOTrainer, tmp_path, **config)
    assert linear_dpo_calls == {"grad": STEPS, "no_grad": STEPS}  # policy; reference
    for step, (s, o) in enumerate(zip(stock, ours, strict=True)):
        for k, v in s.items():
            assert o[k] == pytest.approx(v, rel=1e-5, abs=1e-5), (step, k, v, o[k])
    for name, p in stock_params.items():
        torch.testing.assert_close(our_params[name], p, rtol=1e-5, atol=1e-5, msg=name)
    start = tiny_causal_lm("llama", vocab=28, seed=0).state_dict()
    assert any((start[n] - p).abs().max() > 1e-4 for n, p in stock_params.items())


def test_fallback_reasons(tmp_path):
    """Options whose loss needs the token log-probs first say so and take the other route."""
    from test_trl import preference_dataset, tiny_tokenizer

    def trainer(fused_lm_head=True, **config):
        args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], **TRAINER_DEVICE, **config)
        return FusedDPOTrainer(
            model=tiny_causal_lm("llama", vocab=28), ref_model=tiny_causal_lm("llama", vocab=28),
            args=args, train_dataset=preference_dataset(4), processing_class=tiny_tokenizer(),
            fused_lm_head=fused_lm_head,
        )  # fmt: skip

    assert trainer().linear_dpo_fallback is None
    assert "use_weighting" in trainer(use_weighting=True).linear_dpo_fallback
    assert "ld_alpha" in trainer(ld_alpha=0.5).linear_dpo_fallback
    assert "sft" in trainer(loss_type=["sigmoid_norm", "sft"]).linear_dpo_fallback
    assert "fused_lm_head" in trainer(fused_lm_head=False).linear_dpo_fallback


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_trainer_default_route(loss_type, linear_dpo_calls, tmp_path):
    """DPOLossTrainer's default (a model with an LM head): the fused linear route, same loss and
    same parameter gradients as the logits path."""
    import transformers

    from dpo_kernels.integrations.hf import DPOLossTrainer

    model, ref = tiny_causal_lm(), tiny_causal_lm(seed=1)
    ex = preference_examples(4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), **TRAINER_DEVICE, report_to=[], remove_unused_columns=False
    )
    trainer = DPOLossTrainer(
        model=model, ref_model=ref, loss=DPOLoss(beta=0.2, loss_type=loss_type), args=args,
        train_dataset=datasets.Dataset.from_list(ex), data_collator=collate_preferences,
    )  # fmt: skip
    assert trainer.fused_lm_head
    batch = collate_preferences(ex)
    got = trainer.compute_loss(model, batch)
    assert linear_dpo_calls == {"grad": 1, "no_grad": 1}  # the policy; the reference
    got.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = concatenated_forward(model, batch, ref_model=ref)
    expect = DPOLoss(beta=0.2, loss_type=loss_type)(out.pairs()).loss
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    expect.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("marks", ["completion_mask", "labels"])
def test_dpo_loss_trainer_divides_by_the_accumulation_steps(marks, tmp_path):
    """Two micro-batches of 2 pairs per step train as one batch of 4 (SGD, no clipping), whether
    the batch marks completions with completion_mask or with labels (-100 elsewhere: the HF
    Trainer then counts num_items_in_batch and, for a model taking **kwargs, took the loss as
    normalized already and skipped the division: gradients 2x)."""
    import transformers

    from dpo_kernels.integrations.hf import DPOLossTrainer

    def collate(examples):
        b = collate_preferences(examples)
        if marks == "labels":
            labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
            return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                    "labels": labels}  # fmt: skip
        return b

    def run(accumulate, batch):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), **TRAINER_DEVICE, report_to=[], remove_unused_columns=False,
            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate, max_steps=2,
            logging_steps=1, optim="sgd", learning_rate=0.3, max_grad_norm=0.0, save_strategy="no",
            seed=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = DPOLossTrainer(
            model=tiny_causal_lm(), ref_model=tiny_causal_lm(seed=1), loss=DPOLoss(beta=0.2),
            args=args, train_dataset=datasets.Dataset.from_list(preference_examples(8)),
            data_collator=collate,
        )  # fmt: skip
        trainer.train()
        logs = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
        return logs, dict(trainer.model.named_parameters())

    (one_logs, one), (two_logs, two) = run(1, 4), run(2, 2)
    assert len(one_logs) == len(two_logs) == 2
    for a, b in zip(one_logs, two_logs, strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    for n, p in one.items():
        torch.testing.assert_close(two[n], p, rtol=1e-5, atol=1e-6, msg=n)


def test_dpo_loss_trainer_evaluate_reports_the_dpo_loss(tmp_path):
    """evaluate() runs the DPO loss on each eval batch (a preference batch has no `labels`, so the
    base Trainer's prediction_step only ran the model): eval_loss is the mean of the batches'
    losses, and the DPO metrics come as eval_*, averaged over the batches."""
    import transformers

    from dpo_kernels.integrations.hf import DPOLossTrainer

    model, ref, loss = tiny_causal_lm(), tiny_causal_lm(seed=1), DPOLoss(beta=0.2)
    ex = preference_examples(4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), **TRAINER_DEVICE, report_to=[], remove_unused_columns=False,
        per_device_eval_batch_size=2,
    )  # fmt: skip
    ds = datasets.Dataset.from_list(ex)
    trainer = DPOLossTrainer(
        model=model, ref_model=ref, loss=loss, args=args, train_dataset=ds, eval_dataset=ds,
        data_collator=collate_preferences,
    )  # fmt: skip
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        outs = [loss(concatenated_forward(model, collate_preferences(ex[i : i + 2]), ref_model=ref)
                     .pairs()) for i in (0, 2)]  # fmt: skip
    assert metrics["eval_loss"] == pytest.approx(sum(o.loss.item() for o in outs) / 2, rel=1e-5)
    for k in ("rewards/margins", "logps/chosen"):
        want = sum(o.metrics[k].item() for o in outs) / 2
        assert metrics[f"eval_{k}"] == pytest.approx(want, rel=1e-5, abs=1e-6), k


def test_dpo_loss_trainer_metrics_stay_with_their_own_log(tmp_path):
    """The DPO metrics of an evaluation come under its own prefix (each dataset of an eval dict,
    predict()'s test_) and never leak into another evaluation's or into the training log."""
    import transformers

    from dpo_kernels.integrations.hf import DPOLossTrainer

    train, a, b = (datasets.Dataset.from_list(preference_examples(n, seed=s))
                   for n, s in ((8, 0), (4, 1), (6, 2)))  # fmt: skip

    def trainer(evals):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), **TRAINER_DEVICE, report_to=[], remove_unused_columns=False,
            per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=4,
            logging_steps=2, eval_strategy="steps" if evals else "no", eval_steps=1, optim="sgd",
            learning_rate=0.3, save_strategy="no", seed=0,
        )  # fmt: skip
        return DPOLossTrainer(
            model=tiny_causal_lm(), ref_model=tiny_causal_lm(seed=1), loss=DPOLoss(beta=0.2),
            args=args, train_dataset=train, eval_dataset=evals, data_collator=collate_preferences,
        )  # fmt: skip

    alone, t = trainer(None), trainer({"a": a, "b": b})
    alone.train()
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    want = [h for h in alone.state.log_history if "loss" in h]
    assert len(logs) == len(want) == 2
    for got, ref in zip(logs, want, strict=True):  # mid-training evaluations changed nothing
        assert got["rewards/margins"] == pytest.approx(ref["rewards/margins"], rel=1e-6), got
    evals = [h for h in t.state.log_history if "eval_a_loss" in h]
    assert len(evals) == 4 and all("eval_a_rewards/margins" in h for h in evals)
    assert not any("rewards/margins" in h for h in t.state.log_history if "loss" not in h)
    # After training: each evaluation gives what that dataset alone gives.
    alone_a, alone_b = t.evaluate(eval_dataset=a), t.evaluate(eval_dataset=b)
    both, test = t.evaluate(), t.predict(b).metrics
    for k in ("rewards/margins", "logps/chosen", "loss"):
        assert both[f"eval_a_{k}"] == pytest.approx(alone_a[f"eval_{k}"], rel=1e-6), k
        assert both[f"eval_b_{k}"] == pytest.approx(alone_b[f"eval_{k}"], rel=1e-6), k
        assert test[f"test_{k}"] == pytest.approx(alone_b[f"eval_{k}"], rel=1e-6), k
    assert alone_a["eval_rewards/margins"] != pytest.approx(alone_b["eval_rewards/margins"])
    t.model.eval()  # a loss computed by hand, outside any evaluation, counts in none
    t.compute_loss(t.model, collate_preferences(preference_examples(2, seed=5)))
    again = t.evaluate(eval_dataset=a)  # nothing of predict()'s batches, or of that, left over
    assert again["eval_rewards/margins"] == pytest.approx(alone_a["eval_rewards/margins"], rel=1e-6)


def test_torch_compile_compiles_the_backbone_under_the_fused_head(tmp_path):
    """TrainingArguments(torch_compile=True) hands compute_loss a torch.compile wrapper: the fused
    head is installed inside it, so the backbone runs compiled (the head's fused ops eagerly)
    with the same numbers. Patching the wrapper instead replaced its compiled forward."""
    import transformers
    from torch._dynamo.utils import counters

    from dpo_kernels.integrations.hf import DPOLossTrainer

    def train(compiled):
        torch._dynamo.reset()
        counters.clear()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), **TRAINER_DEVICE, report_to=[], remove_unused_columns=False,
            per_device_train_batch_size=2, max_steps=2, logging_steps=1, optim="sgd",
            learning_rate=0.3, save_strategy="no", seed=0, torch_compile=compiled,
            torch_compile_backend="aot_eager",
        )  # fmt: skip
        trainer = DPOLossTrainer(
            model=tiny_causal_lm(), ref_model=tiny_causal_lm(seed=1), args=args,
            train_dataset=datasets.Dataset.from_list(preference_examples(4)),
            data_collator=collate_preferences,
        )  # fmt: skip
        assert trainer.fused_lm_head
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return losses, counters["frames"]["ok"]

    eager, _ = train(False)
    compiled, frames = train(True)
    assert frames > 0
    assert compiled == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("make", [scaled_head_lm, prompt_tuned_lm],
                         ids=["head-with-own-forward", "prompt-learning"])  # fmt: skip
def test_dpo_loss_trainer_defaults_to_the_logits_path_where_the_head_cannot_fuse(make, tmp_path):
    """DPOLossTrainer's default takes the logits path for such models, whose loss sees what the
    model computes (before: the fused head, which misread the first and refused the second)."""
    import transformers

    from dpo_kernels.integrations.hf import DPOLossTrainer

    model = make()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), **TRAINER_DEVICE, report_to=[], remove_unused_columns=False
    )
    ex = preference_examples(2)
    trainer = DPOLossTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(ex),
                             data_collator=collate_preferences)  # fmt: skip
    assert not trainer.fused_lm_head
    want = DPOLoss()(concatenated_forward(model, collate_preferences(ex)).pairs()).loss
    torch.testing.assert_close(trainer.compute_loss(model, collate_preferences(ex)), want)
