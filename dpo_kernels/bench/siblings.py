"""The sibling trainers' steps (ops cpo_step, orpo_step, kto_step): stock TRL 1.16
`CPOTrainer` / `ORPOTrainer` (trl.experimental) and `KTOTrainer` against dpo_kernels'
`FusedCPOTrainer` / `FusedORPOTrainer` / `FusedKTOTrainer`, with the fused LM head (their default)
and with `fused_lm_head=False`. One step is the trainer's compute_loss (policy forward, for KTO
the no-grad reference and KL forwards, log-probs, loss) and the backward into the policy.

Every trainer gets the same text dataset of random words, tokenized by its own constructor (a
word-level tokenizer with V entries: one word, one token), and the batch its own collator makes
of it, in order. Case PxTxV: P pairs of a T/4-word prompt and T - T/4 - 1 completion words (the
trainer appends EOS); KTO gets the 2P completions unpaired, chosen desirable, rejected not. The
float64 reference of CPO and ORPO is the stock trainer's step with the model in float64 (TRL is
the spec these drop-ins follow, shares no code with ours, and keeps the model's dtype through
their losses); stock KTO accumulates its fused LM head in float32, so KTO's reference is its loss
written here, in float64, each sequence run through the models alone.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from .cases import Case, GradStep, Result, Step, tiny_llama
from .expected import alone_logps

# op -> (stock trainer "module:Class", its config class, our subclass in integrations.trl_siblings)
TRAINERS = {
    "cpo_step": ("trl.experimental.cpo:CPOTrainer", "trl.experimental.cpo:CPOConfig",
                 "FusedCPOTrainer"),
    "orpo_step": ("trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig",
                  "FusedORPOTrainer"),
    "kto_step": ("trl:KTOTrainer", "trl:KTOConfig", "FusedKTOTrainer"),
}  # fmt: skip


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _tokenizer(V: int):
    """Word-level: "<pad>" 0, "</s>" 1, then "w2" ... "w{V-1}", split on whitespace."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>"
    )


def _rows(op: str, case: Case) -> list[dict]:
    """The dataset: P pairs of random words (seeded), or their 2P completions for KTO."""
    P, T, V = case.shape
    g = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(2, V, (max(n, 1),), generator=g))

    # Completions start with a space: the trainers tokenize prompt + completion as one text.
    pairs = [
        {"prompt": words(T // 4), "chosen": " " + words(T - T // 4 - 1),
         "rejected": " " + words(T - T // 4 - 1)}
        for _ in range(P)
    ]  # fmt: skip
    if op != "kto_step":
        return pairs
    return [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in pairs
        for side in ("chosen", "rejected")
    ]


def sibling_trainer(op: str, fused: bool | None, case: Case, device: str, dtype=torch.float32):
    """The stock trainer of `op` (fused None) or ours (fused_lm_head=fused) on the tiny Llama
    (seed 0; KTO's reference: seed 1) in `dtype`, and its collated batch of the whole dataset.
    Stock settings except float32 (bf16=False) and no gradient checkpointing."""
    import tempfile
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.disable_caching()
    warnings.filterwarnings("ignore", "`(is_)?gradient_checkpointing` is deprecated", FutureWarning)
    stock, config, ours = TRAINERS[op]
    rows = _rows(op, case)
    V = case.shape[-1]
    args = _load(config)(
        output_dir=os.path.join(tempfile.gettempdir(), "dpo-kernels-bench"),  # stays empty
        report_to=[], use_cpu=device == "cpu", bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=len(rows), per_device_eval_batch_size=len(rows),
        dataloader_num_workers=0,
        **({} if op == "kto_step" else {"remove_unused_columns": False}),  # as their collator asks
    )  # fmt: skip
    kwargs = {}
    if op == "kto_step":
        kwargs["ref_model"] = tiny_llama(V, 1, device).to(dtype)
    if fused is None:
        cls = _load(stock)
    else:
        from ..integrations import trl_siblings

        cls, kwargs["fused_lm_head"] = getattr(trl_siblings, ours), fused
    trainer = cls(
        model=tiny_llama(V, 0, device).to(dtype), args=args, processing_class=_tokenizer(V),
        train_dataset=datasets.Dataset.from_list(rows), **kwargs,
    )  # fmt: skip
    # The eval loader: the trainer's own column selection and collator, in the dataset's order.
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    return trainer, trainer._prepare_inputs(batch)


def sibling_step(op: str, fused: bool | None) -> Callable[[Case, str], Step]:
    """The loss step of `op`'s stock trainer (fused None) or ours: compute_loss and backward."""

    def build(case: Case, device: str) -> Step:
        trainer, batch = sibling_trainer(op, fused, case, device)
        model = trainer.model
        return GradStep(list(model.parameters()), lambda: trainer.compute_loss(model, batch)[None])

    return build


def sibling_expected(case: Case, device: str) -> Result:
    """The loss and policy gradient in float64: the stock trainer's (CPO, ORPO) or the KTO loss
    written below."""
    trainer, batch = sibling_trainer(case.op, None, case, device, torch.float64)
    model = trainer.model
    if case.op == "kto_step":
        return GradStep(list(model.parameters()), lambda: _kto_loss64(trainer, batch))()
    return GradStep(list(model.parameters()), lambda: trainer.compute_loss(model, batch)[None])()


def _kto_loss64(trainer, batch: dict) -> torch.Tensor:
    """TRL 1.16's KTOTrainer._compute_loss for loss_type "kto" (desirable and undesirable
    weights, the KL estimate of the mismatched completions, detached and clamped at 0), as [1]."""
    assert trainer.loss_type == "kto" and trainer.calculate_KL, "the bench runs stock settings"
    kl_batch = {k: batch["KL_" + k] for k in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        ref = alone_logps(trainer.ref_model, batch)
        kl = alone_logps(trainer.model, kl_batch) - alone_logps(trainer.ref_model, kl_batch)
        kl = kl.mean().clamp(min=0)
    ratio = alone_logps(trainer.model, batch) - ref
    desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=ratio.device)
    beta = trainer.beta
    losses = torch.where(
        desirable,
        trainer.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        trainer.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses.mean()[None]


def sibling_tokens(case: Case) -> int:
    """Tokens of the policy's forward: 2P sequences of T (prompt, completion and EOS)."""
    return 2 * case.shape[0] * case.shape[1]
