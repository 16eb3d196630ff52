"""The examples run, and DPO training with them does what DPO training should."""

import math
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import TRAINER_DEVICE, preference_examples, tiny_causal_lm

from dpo_kernels import DPOLoss
from dpo_kernels.batches import collate_preferences
from dpo_kernels.forward import concatenated_forward

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_plain_loop_script_learns_the_preferences():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_loop.py"), "--steps", "40"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("step")]
    losses = [float(ln[3]) for ln in lines]
    accuracy = [float(ln[6]) for ln in lines]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at the start
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy[-1] >= 0.9


def test_hf_trainer_example_trains():
    import hf_trainer

    history = hf_trainer.main(["--steps", "30", "--logging-steps", "1"])
    assert len(history) == 30
    # Step 1: the policy is a copy of the reference, so every margin is 0 and the loss is exactly
    # -log sigmoid(0) = log 2, whatever the batch.
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    # The loss is the mean of -log sigmoid(margin) over the pairs (margins are beta-scaled, as
    # logged); -log sigmoid is convex, so by Jensen it is at least -log sigmoid(mean margin).
    for h in history:
        assert h["loss"] >= -math.log(1 / (1 + math.exp(-h["rewards/margins"]))) - 1e-6
    first, last = history[:5], history[-5:]
    assert sum(h["loss"] for h in last) < sum(h["loss"] for h in first)
    assert sum(h["rewards/accuracies"] for h in last) / 5 > 0.5


@pytest.mark.parametrize("fused_lm_head", [False, True], ids=["logits", "fused-head"])
def test_dpo_loss_trainer_compute_loss_is_the_fused_loss(fused_lm_head, tmp_path):
    import datasets
    import transformers

    from dpo_kernels.integrations.hf import DPOLossTrainer

    model, ref = tiny_causal_lm(), tiny_causal_lm(seed=1)
    ex = preference_examples(4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), **TRAINER_DEVICE, report_to=[], remove_unused_columns=False
    )
    trainer = DPOLossTrainer(
        model=model, ref_model=ref, loss=DPOLoss(beta=0.2, loss_type="ipo"), args=args,
        train_dataset=datasets.Dataset.from_list(ex), data_collator=collate_preferences,
        fused_lm_head=fused_lm_head,
    )  # fmt: skip
    batch = collate_preferences(ex)
    got = trainer.compute_loss(model, batch)
    out = concatenated_forward(model, batch, ref_model=ref)
    expect = DPOLoss(beta=0.2, loss_type="ipo")(out.pairs()).loss
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
