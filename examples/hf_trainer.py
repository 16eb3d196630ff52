"""DPO with the plain Hugging Face Trainer: DPOLossTrainer = Trainer + the fused DPO loss.

    python examples/hf_trainer.py [--steps 40]

Same tiny model and inline data as plain_loop.py; the Trainer drives the optimization, the loss is
one concatenated forward through the fused log-prob op and the fused DPO loss.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import datasets
import transformers
from plain_loop import preference_data, tiny_llama

from dpo_kernels import DPOLoss
from dpo_kernels.integrations.hf import DPOLossTrainer


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--logging-steps", type=int, default=10)
    a = p.parse_args(argv)
    policy = tiny_llama()
    reference = copy.deepcopy(policy)
    with tempfile.TemporaryDirectory() as out_dir:
        args = transformers.TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=8,
            max_steps=a.steps,
            learning_rate=3e-3,
            logging_steps=a.logging_steps,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
        )
        trainer = DPOLossTrainer(
            model=policy,
            ref_model=reference,
            loss=DPOLoss(beta=0.1),
            args=args,
            train_dataset=datasets.Dataset.from_list(preference_data(64)),
        )
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


if __name__ == "__main__":
    for h in main():
        print({k: round(v, 4) for k, v in h.items() if k in ("step", "loss", "rewards/accuracies")})
