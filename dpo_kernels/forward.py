"""The concatenated-batch forward: [chosen; rejected] through the policy once, log-probs fused.

Accepts TRL's `DataCollatorForPreference` output as it is (input_ids, attention_mask,
completion_mask; rows are [chosen; rejected]) or a plain dict with separate halves
(chosen_input_ids, chosen_attention_mask, chosen_completion_mask or chosen_labels, and the same
for rejected), pads both halves to one length, runs ONE policy forward, and the reference model
once without gradient (or uses precomputed reference log-probs, or none), then shifts labels and
returns the four sums through the fused op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .functional import (
    PairLogprobs,
    SequenceLogprobs,
    linear_sequence_logprobs,
    sequence_logprobs,
)


class PreferenceBatch(NamedTuple):
    """A concatenated preference batch: rows [chosen (P); rejected (P)], right-padded to L."""

    input_ids: torch.Tensor  # [2P, L]
    attention_mask: torch.Tensor  # [2P, L]
    completion_mask: torch.Tensor  # [2P, L] 1 on completion tokens (the ones scored)
    ref_chosen_logps: torch.Tensor | None  # [P] precomputed, if the batch carries them
    ref_rejected_logps: torch.Tensor | None


class ConcatenatedOutput(NamedTuple):
    policy: SequenceLogprobs  # 2P rows, [chosen; rejected]; carries gradient
    ref_chosen_logps: torch.Tensor | None  # [P] (None: reference-free)
    ref_rejected_logps: torch.Tensor | None
    batch: PreferenceBatch

    def pairs(self) -> PairLogprobs:
        """Policy and reference sums of chosen and rejected, with the completion token counts."""
        p = self.policy.pairs()
        return p._replace(
            ref_chosen_logps=self.ref_chosen_logps, ref_rejected_logps=self.ref_rejected_logps
        )


def _pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


def _completion(batch: Mapping[str, Any], prefix: str, ignore_index: int) -> torch.Tensor:
    if f"{prefix}completion_mask" in batch:
        return batch[f"{prefix}completion_mask"]
    if f"{prefix}labels" in batch:
        return batch[f"{prefix}labels"] != ignore_index
    raise KeyError(
        f"the batch has no {prefix}completion_mask or {prefix}labels to say which tokens to score"
    )


def preference_batch(
    batch: Mapping[str, Any], pad_token_id: int = 0, ignore_index: int = -100
) -> PreferenceBatch:
    """Normalize a preference batch (TRL collator output or separate halves) to one layout."""
    if "input_ids" in batch:
        ids = batch["input_ids"]
        if ids.dim() != 2 or ids.shape[0] % 2:
            raise ValueError(
                f"input_ids must be [2 * pairs, length] with rows [chosen; rejected], got "
                f"shape {tuple(ids.shape)}"
            )
        am = batch.get("attention_mask", torch.ones_like(ids))
        cm = _completion(batch, "", ignore_index)
    elif "chosen_input_ids" in batch and "rejected_input_ids" in batch:
        c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
        if c_ids.shape[0] != r_ids.shape[0]:
            raise ValueError(
                f"chosen_input_ids has {c_ids.shape[0]} rows but rejected_input_ids has "
                f"{r_ids.shape[0]}; every prompt needs one chosen and one rejected completion"
            )
        L = max(c_ids.shape[1], r_ids.shape[1])
        halves = []
        for prefix, x in (("chosen_", c_ids), ("rejected_", r_ids)):
            am = batch.get(f"{prefix}attention_mask", torch.ones_like(x))
            cm = _completion(batch, prefix, ignore_index)
            halves.append(
                (_pad_right(x, L, pad_token_id), _pad_right(am, L, 0), _pad_right(cm, L, 0))
            )
        ids, am, cm = (torch.cat(parts) for parts in zip(*halves, strict=True))
    else:
        raise KeyError(
            "a preference batch needs input_ids (+ completion_mask), as TRL's "
            "DataCollatorForPreference makes, or chosen_input_ids and rejected_input_ids"
        )
    if am.shape != ids.shape or cm.shape != ids.shape:
        raise ValueError(
            f"attention_mask {tuple(am.shape)} and completion_mask {tuple(cm.shape)} must match "
            f"input_ids {tuple(ids.shape)}"
        )
    return PreferenceBatch(
        ids, am, cm, batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps")
    )


def collate_preferences(
    examples: list[Mapping[str, list[int]]], pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Token-id examples {prompt_ids, chosen_ids, rejected_ids} -> a concatenated batch.

    The layout TRL's DataCollatorForPreference makes (rows [chosen; rejected], right-padded), for
    loops and trainers that do not use TRL.
    """
    rows, completion = [], []
    for half in ("chosen_ids", "rejected_ids"):
        for e in examples:
            rows.append(list(e["prompt_ids"]) + list(e[half]))
            completion.append([0] * len(e["prompt_ids"]) + [1] * len(e[half]))
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_token_id, dtype=torch.long)
    am = torch.zeros((len(rows), L), dtype=torch.long)
    cm = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (r, c) in enumerate(zip(rows, completion, strict=True)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        am[i, : len(r)] = 1
        cm[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}


class PackedBatch(NamedTuple):
    """The rows of a PreferenceBatch back to back without padding (padding-free layout)."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N], restarting at 0 for every sequence
    cu_seqlens: torch.Tensor  # [2P + 1] int32 offsets, flash-attention's varlen convention
    labels: torch.Tensor  # [N] next token within the same sequence; ignore_index at each end
    mask: torch.Tensor  # [N] bool: the label is a completion token


def pack(b: PreferenceBatch, ignore_index: int = -100) -> PackedBatch:
    """Drop the padding of a right-padded batch: its real tokens back to back, rows in order."""
    lengths = b.attention_mask.sum(1)
    keep = b.attention_mask != 0
    ids = b.input_ids[keep]
    completion = (b.completion_mask != 0)[keep]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    starts = torch.repeat_interleave(cu[:-1].long(), lengths)
    position = torch.arange(ids.numel(), device=ids.device) - starts
    last = torch.zeros_like(completion)
    last[cu[1:].long() - 1] = True  # a sequence's last token has no next token in the sequence
    labels = torch.roll(ids, -1).masked_fill(last, ignore_index)
    mask = torch.roll(completion, -1) & ~last
    return PackedBatch(ids[None], position[None], cu, labels, mask)


# Model types whose `logits_scaling` multiplies the logits (muP); Granite's divides them.
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


def head_transform(model) -> dict[str, float | None]:
    """The logit post-processing a causal LM applies after its LM head, read from its config:
    Gemma-2-style `final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`
    (a divisor; HyperCLOVAX's multiplies). Arguments for `linear_sequence_logprobs`. A config
    with a post-processing this does not map raises instead of giving wrong log-probs."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    if getattr(cfg, "output_multiplier", None) not in (None, 1, 1.0):
        raise NotImplementedError(
            f"{type(cfg).__name__} scales its logits by output_multiplier before the softcap; "
            "fused_lm_head=True does not cover it: use fused_lm_head=False"
        )
    scale = getattr(cfg, "logit_scale", None)
    if scale is None and getattr(cfg, "logits_scaling", None):
        multiplies = getattr(cfg, "model_type", "") in _MULTIPLYING_LOGITS_SCALING
        scale = cfg.logits_scaling if multiplies else 1.0 / cfg.logits_scaling
    return {
        "logit_scale": float(scale or 1.0),
        "softcap": getattr(cfg, "final_logit_softcapping", None),
    }


@contextlib.contextmanager
def capture_head_input(model) -> Iterator[list[torch.Tensor]]:
    """Within the block, the model's LM head records its input (the final hidden states) and
    returns a [..., 1] stand-in instead of the logits, so a normal `model(...)` call (through any
    DDP wrapper, with its hooks) runs the backbone only. Yields the list of recorded inputs."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    head = inner.get_output_embeddings()
    seen: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(hidden)
        return hidden[..., :1]

    head.forward = forward
    try:
        yield seen
    finally:
        del head.forward


def _head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, head.bias


def _full(p: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter as a plain tensor: FSDP2 shards are gathered (differentiably) first."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def batch_logprobs(
    model,
    b: PreferenceBatch,
    *,
    stats: bool = False,
    padding_free: bool = False,
    fused_lm_head: bool = False,
    backend: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> SequenceLogprobs:
    """One forward of `model` over the concatenated rows; fused log-probs of the completions.

    padding_free: run the rows packed into one sequence with restarting position_ids and no
    padding (flash-attention varlen on GPU; transformers' packed-sequence masks with sdpa/eager),
    and score them through the fused op's cu_seqlens layout. Same numbers, no padded tokens.
    fused_lm_head: never build the logits: the backbone's last hidden states and the LM head
    (`get_output_embeddings()`, with `head_transform`) go to `linear_sequence_logprobs`.
    """
    kwargs = dict(model_kwargs or {}, use_cache=False)
    if padding_free:
        p = pack(b)
        kwargs |= {"input_ids": p.input_ids, "position_ids": p.position_ids}
        labels, mask, cu = p.labels, p.mask, p.cu_seqlens
    else:
        kwargs |= {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        labels = b.input_ids[:, 1:]
        mask = (b.completion_mask[:, 1:] != 0) & (b.attention_mask[:, 1:] != 0)
        cu = None
    if fused_lm_head:
        with capture_head_input(model) as seen:
            model(**kwargs)
        hidden = seen[-1][0] if padding_free else seen[-1][:, :-1]
        inner = getattr(model, "module", model)
        weight, bias = (_full(p) for p in _head_params(inner))
        return linear_sequence_logprobs(
            hidden, weight, labels, bias=bias, mask=mask, stats=stats, cu_seqlens=cu,
            backend=backend, **head_transform(inner),
        )  # fmt: skip
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits = logits[0] if padding_free else logits[:, :-1]
    return sequence_logprobs(logits, labels, mask=mask, cu_seqlens=cu, stats=stats, backend=backend)


def concatenated_forward(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    *,
    ref_model: torch.nn.Module | None = None,
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    stats: bool = False,
    padding_free: bool = False,
    fused_lm_head: bool = False,
    pad_token_id: int = 0,
    ignore_index: int = -100,
    backend: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> ConcatenatedOutput:
    """Policy log-prob sums of chosen and rejected from one forward, and the reference's.

    The reference comes from, in order: `ref_logps` (chosen, rejected), the batch's
    ref_chosen_logps / ref_rejected_logps, one no-grad forward of `ref_model`; else None
    (reference-free). `stats` adds the policy's per-token entropy, mean logit and top-1 flags.
    `padding_free` packs the rows (see `batch_logprobs`): the model must honour packed
    position_ids (flash-attention 2/3 in transformers, or its sdpa/eager packed-sequence masks).
    `fused_lm_head` never builds the logits (see `batch_logprobs`).
    Works with any Hugging Face causal LM (anything whose forward takes input_ids and
    attention_mask and returns logits).
    """
    b = preference_batch(batch, pad_token_id, ignore_index)
    options = dict(
        padding_free=padding_free,
        fused_lm_head=fused_lm_head,
        backend=backend,
        model_kwargs=model_kwargs,
    )
    if ref_logps is None and b.ref_chosen_logps is not None:
        ref_logps = (b.ref_chosen_logps, b.ref_rejected_logps)
    if ref_logps is None and ref_model is not None:
        with torch.no_grad():  # before the policy: its logits are freed before the policy's exist
            ref = batch_logprobs(ref_model, b, **options)
        ref_logps = ref.logps.chunk(2)
    policy = batch_logprobs(model, b, stats=stats, **options)
    rc, rr = (None, None) if ref_logps is None else ref_logps
    return ConcatenatedOutput(policy, rc, rr, b)
