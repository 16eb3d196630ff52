"""The trainer-level methods: a whole loss step (compute_loss and the backward into the policy)
of stock TRL trainers and ours on a tiny random Llama, and the padded/packed model forward."""

from __future__ import annotations

import os
from collections.abc import Callable

from .cases import DPO_BETA, Case, GradStep, Step, preference_inputs, tiny_llama


def _dpo_trainer(trainer_cls: type, case: Case, device: str, **trainer_kwargs):
    """A `trainer_cls` (trl.DPOTrainer or a subclass, given `trainer_kwargs`) on the tiny Llama
    (seed 0) and its reference (seed 1): stock settings except float32 (bf16=False) and no
    gradient checkpointing. A one-row
    dataset and a two-word tokenizer satisfy the constructor; the timed batch is
    `preference_inputs`, in the layout TRL's DataCollatorForPreference makes."""
    import tempfile
    import warnings

    import datasets
    import transformers
    import trl
    from tokenizers import Tokenizer, models

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # transformers 5 renamed gradient checkpointing; TRL 1.16 still sets and reads the old name.
    warnings.filterwarnings("ignore", "`(is_)?gradient_checkpointing` is deprecated", FutureWarning)
    P, _, V = case.shape
    words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1}, unk_token="<pad>"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="</s>"
    )
    args = trl.DPOConfig(
        output_dir=os.path.join(tempfile.gettempdir(), "dpo-kernels-bench"),  # stays empty
        report_to=[], beta=DPO_BETA,
        use_cpu=device == "cpu", bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=P,
    )  # fmt: skip
    row = {"prompt": "</s>", "chosen": "</s>", "rejected": "</s>"}
    trainer = trainer_cls(
        model=tiny_llama(V, 0, device), ref_model=tiny_llama(V, 1, device), args=args,
        train_dataset=datasets.Dataset.from_list([row]), processing_class=tokenizer,
        **trainer_kwargs,
    )  # fmt: skip
    return trainer, trainer._prepare_inputs(preference_inputs(case, device))


def dpo_step(trainer_cls_of: Callable[[], type], **trainer_kwargs) -> Callable[[Case, str], Step]:
    """The whole DPO loss step of a trainer: its compute_loss (policy forward, no-grad reference
    forward, log-probs, loss) and the backward into the policy's parameters."""

    def build(case, device) -> Step:
        trainer, batch = _dpo_trainer(trainer_cls_of(), case, device, **trainer_kwargs)
        model = trainer.model
        return GradStep(list(model.parameters()), lambda: trainer.compute_loss(model, batch)[None])

    return build


def trl_trainer() -> type:
    import trl

    return trl.DPOTrainer


def fused_trainer() -> type:
    from ..integrations.trl import FusedDPOTrainer

    return FusedDPOTrainer


def padding(padding_free: bool) -> Callable[[Case, str], Step]:
    """fwd+bwd of the tiny Llama and our fused log-probs over a preference batch, padded or packed
    (`concatenated_forward(..., padding_free=...)`); gradients of the model's parameters."""

    def build(case, device) -> Step:
        from .. import concatenated_forward

        model, batch = tiny_llama(case.shape[-1], 0, device), preference_inputs(case, device)
        return GradStep(
            list(model.parameters()),
            lambda: concatenated_forward(model, batch, padding_free=padding_free).policy.logps,
        )

    return build
