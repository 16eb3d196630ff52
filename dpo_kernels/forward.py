"""The concatenated-batch forward: [chosen; rejected] through the policy once, log-probs fused.

Accepts TRL's `DataCollatorForPreference` output as it is (input_ids, attention_mask,
completion_mask; rows are [chosen; rejected]) or a plain dict with separate halves
(chosen_input_ids, chosen_attention_mask, chosen_completion_mask or chosen_labels, and the same
for rejected), pads both halves to one length, runs ONE policy forward, and the reference model
once without gradient (or uses precomputed reference log-probs, or none), then shifts labels and
returns the four sums through the fused op.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .common import DPOLossSpec, PairLogprobs, SequenceLogprobs
from .linear_logprobs import linear_sequence_logprobs
from .logprobs import sequence_logprobs


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
    if not examples:
        raise ValueError(
            "collate_preferences got an empty batch: pass at least one example "
            "{prompt_ids, chosen_ids, rejected_ids}"
        )
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


def _full(p: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter as a plain tensor: FSDP2 shards (DTensor) are gathered differentiably."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


# -- the fused LM head inside the model's forward -----------------------------------------------
#
# DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-3 expect every parameter to be used inside the forward of
# the module that owns it: DDP marks gradients ready per forward, FSDP1 / ZeRO-3 gather a sharded
# parameter only for its module's forward (and again, through hooks on that forward's outputs,
# for its backward) and reduce its gradient through hooks that forward armed. So the fused head
# is a mode of the model's own forward: `install_fused_head` patches the innermost causal LM so
# that `wrapped_model(..., dpo_kernels_head=HeadCall(...))` runs the backbone, then CALLS the LM
# head module (its forward temporarily replaced by `linear_sequence_logprobs`), so the engines'
# hooks on `lm_head` gather the weight for the forward and again for the backward's recompute.

HEAD_KWARG = "dpo_kernels_head"
_WRAPPER_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


@dataclasses.dataclass(frozen=True, eq=False)
class HeadCall:
    """What the fused head scores: passed as `dpo_kernels_head=` to the (wrapped) model."""

    labels: torch.Tensor  # [B, T-1] next tokens (padded rows) or [N] (packed)
    mask: torch.Tensor  # same shape, bool: the token is counted
    cu_seqlens: torch.Tensor | None = None  # packed rows (padding_free)
    stats: bool = False
    backend: str | None = None
    router_aux: bool = False  # MoE: also return the router load-balancing loss
    # Called inside the head's forward as extra(hidden, weight, bias, transform) with the whole
    # backbone output and the (gathered) head; the forward then returns (HeadOutput, its result).
    extra: Any = None
    # Padded [chosen; rejected] rows: the DPO loss fused in the head (not with `extra`).
    dpo: DPOHead | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class DPOHead:
    """The DPO loss the head call computes with `linear_dpo` (3 matmuls, gradients of the head
    and the hidden states made during the forward): the loss spec, the reference sums [P]
    (precomputed, no gradient; None: reference-free) and the lengths [P] the length-normalized
    losses divide by (None: the counted tokens)."""

    spec: DPOLossSpec
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_counts: torch.Tensor | None = None
    rejected_counts: torch.Tensor | None = None
    memory_budget: int | None = None


class HeadOutput(NamedTuple):
    """`logprobs` from the fused head; `aux_loss`: the MoE load-balancing loss (or None)."""

    logprobs: SequenceLogprobs
    aux_loss: torch.Tensor | None = None


class DPOHeadOutput(NamedTuple):
    """A head call with `HeadCall.dpo`: the fused DPO loss (`DPOLossOutput`) too; the log-probs
    then carry no gradient (it flows through the loss)."""

    logprobs: SequenceLogprobs
    aux_loss: torch.Tensor | None
    loss: Any


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside DDP / FSDP1 / DeepSpeed engines (`.module`) and PEFT wrappers."""
    m = model
    while isinstance(getattr(m, "module", None), torch.nn.Module):
        m = m.module
    if hasattr(m, "get_base_model"):  # PEFT: the transformers model under the adapters
        m = m.get_base_model()
    return m


def _router_aux_loss(model, out, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss as the model's own forward computes it (Mixtral's formula,
    which every transformers MoE family uses), from the backbone's router logits."""
    import sys

    cfg = model.config.get_text_config()
    func = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    if func is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as func
    experts = getattr(model, "num_experts", None) or getattr(cfg, "num_experts", None)
    experts = experts or cfg.num_local_experts
    top_k = getattr(model, "num_experts_per_tok", None) or cfg.num_experts_per_tok
    return func(out.router_logits, experts, top_k, attention_mask)


def _run_head(head: torch.nn.Module, hidden: torch.Tensor, call: HeadCall, transform, full=None):
    """Calls the LM head module (through its engine wrappers and hooks) with its forward
    replaced, for this call, by the fused log-probs of `call.labels`."""
    inner = head
    while any(isinstance(getattr(inner, a, None), torch.nn.Module) for a in _WRAPPER_ATTRS):
        inner = next(getattr(inner, a) for a in _WRAPPER_ATTRS if hasattr(inner, a))

    def fused(h: torch.Tensor) -> SequenceLogprobs:
        weight, bias = _full(inner.weight), _full(getattr(inner, "bias", None))
        if call.dpo is not None:
            from .linear_dpo import linear_dpo

            d, dev = call.dpo, weight.device
            return linear_dpo(
                h.to(dev), weight, call.labels.to(dev), spec=d.spec, bias=bias,
                mask=call.mask.to(dev), ref_chosen_logps=d.ref_chosen_logps,
                ref_rejected_logps=d.ref_rejected_logps, chosen_counts=d.chosen_counts,
                rejected_counts=d.rejected_counts, stats=call.stats, backend=call.backend,
                memory_budget=d.memory_budget, **transform,
            )  # fmt: skip
        res = linear_sequence_logprobs(
            h.to(weight.device), weight, call.labels.to(weight.device), bias=bias,
            mask=call.mask.to(weight.device), stats=call.stats, cu_seqlens=call.cu_seqlens,
            backend=call.backend, **transform,
        )  # fmt: skip
        if call.extra is None:
            return res
        return res, call.extra(full.to(weight.device), weight, bias, transform)

    saved = inner.__dict__.get("forward")  # e.g. accelerate's device hooks
    inner.forward = fused
    try:
        return head(hidden)
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


def _fused_head_forward(self, *args, dpo_kernels_head: HeadCall | None = None, **kwargs):
    if dpo_kernels_head is None:
        return self._dpo_kernels_forward(*args, **kwargs)
    call = dpo_kernels_head
    for k in ("labels", "output_attentions", "output_hidden_states", "return_dict"):
        kwargs.pop(k, None)  # PEFT passes these (as None); the backbone returns what we need
    kwargs["use_cache"] = False
    if call.router_aux:
        kwargs["output_router_logits"] = True
    out = self.base_model(*args, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    full, hidden = hidden, hidden[0] if call.cu_seqlens is not None else hidden[:, :-1]
    res = _run_head(self.get_output_embeddings(), hidden, call, head_transform(self), full)
    logprobs, extra = (res, None) if call.extra is None else res
    aux = _router_aux_loss(self, out, kwargs.get("attention_mask")) if call.router_aux else None
    if call.dpo is not None:  # a LinearDPOOutput
        return DPOHeadOutput(logprobs.logprobs, aux, logprobs.loss)
    return HeadOutput(logprobs, aux) if call.extra is None else (HeadOutput(logprobs, aux), extra)


def install_fused_head(model: torch.nn.Module) -> torch.nn.Module:
    """Patches the causal LM inside `model` (DDP / FSDP / DeepSpeed / PEFT wrappers) so that its
    forward takes `dpo_kernels_head=HeadCall(...)` and then returns a `HeadOutput` computed inside
    that forward; without the keyword the forward is unchanged. Idempotent; returns the patched
    module. Works after the model was wrapped: the wrappers call the patched forward."""
    inner = unwrap_model(model)
    if "_dpo_kernels_forward" in inner.__dict__:
        return inner
    if not hasattr(inner, "get_output_embeddings") or inner.get_output_embeddings() is None:
        raise ValueError(
            f"fused_lm_head needs a causal LM with an LM head (get_output_embeddings()); "
            f"{type(inner).__name__} has none: pass fused_lm_head=False"
        )
    inner._dpo_kernels_forward = inner.forward

    @functools.wraps(type(inner).forward)  # generate() validates its kwargs against the signature
    def forward(self, *args, **kwargs):
        return _fused_head_forward(self, *args, **kwargs)

    inner.forward = types.MethodType(forward, inner)
    return inner


def model_logprobs(
    model,
    b: PreferenceBatch,
    *,
    stats: bool = False,
    padding_free: bool = False,
    fused_lm_head: bool = False,
    backend: str | None = None,
    router_aux: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    dpo: DPOHead | None = None,
) -> HeadOutput | DPOHeadOutput:
    """`batch_logprobs`, and with `router_aux` the MoE router load-balancing loss of the same
    forward (`output_router_logits=True`), as `HeadOutput`. `dpo` (fused_lm_head, padded rows
    only): the DPO loss fused into the head call (a `DPOHeadOutput`)."""
    if dpo is not None and (padding_free or not fused_lm_head):
        raise ValueError("dpo= needs fused_lm_head=True and padded rows (padding_free=False)")
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
        install_fused_head(model)
        call = HeadCall(labels, mask, cu, stats, backend, router_aux, dpo)
        return model(**kwargs, **{HEAD_KWARG: call})
    if router_aux:
        kwargs["output_router_logits"] = True
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits = logits[0] if padding_free else logits[:, :-1]
    res = sequence_logprobs(logits, labels, mask=mask, cu_seqlens=cu, stats=stats, backend=backend)
    return HeadOutput(res, out.aux_loss if router_aux else None)


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
    fused_lm_head: never build the logits: inside the model's forward (`install_fused_head`), the
    backbone's last hidden states and the LM head (with `head_transform`) go to
    `linear_sequence_logprobs`; works under DDP, FSDP1/2 and DeepSpeed ZeRO-1/2/3.
    """
    return model_logprobs(
        model, b, stats=stats, padding_free=padding_free, fused_lm_head=fused_lm_head,
        backend=backend, model_kwargs=model_kwargs,
    ).logprobs  # fmt: skip


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


def concatenated_dpo_loss(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    spec: Any,
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
) -> tuple[Any, ConcatenatedOutput]:
    """`concatenated_forward` and the DPO loss of `spec` (`make_spec`; a `DPOLoss`'s `.spec`):
    (`DPOLossOutput`, `ConcatenatedOutput`). With fused_lm_head and padded rows the loss is fused
    into the LM head call (`linear_dpo`: 3 matmuls over the completion tokens, the reference sums
    computed first), and the output's policy sums carry no gradient; otherwise (logits, packed
    rows) the log-probs op and `dpo_loss`, as `concatenated_forward` + `DPOLoss` would."""
    from .losses import dpo_loss

    options = dict(stats=stats, padding_free=padding_free, fused_lm_head=fused_lm_head,
                   pad_token_id=pad_token_id, ignore_index=ignore_index, backend=backend,
                   model_kwargs=model_kwargs)  # fmt: skip
    if not fused_lm_head or padding_free:
        out = concatenated_forward(model, batch, ref_model=ref_model, ref_logps=ref_logps,
                                   **options)  # fmt: skip
        p = out.pairs()
        loss = dpo_loss(*p[:4], chosen_counts=p.chosen_counts, rejected_counts=p.rejected_counts,
                        spec=spec, backend=backend)  # fmt: skip
        return loss, out
    b = preference_batch(batch, pad_token_id, ignore_index)
    if ref_logps is None and b.ref_chosen_logps is not None:
        ref_logps = (b.ref_chosen_logps, b.ref_rejected_logps)
    if ref_logps is None and ref_model is not None:
        with torch.no_grad():  # linear_dpo's pass: the policy's summation (exact ties)
            ref = model_logprobs(ref_model, b, fused_lm_head=True, backend=backend,
                                 model_kwargs=model_kwargs, dpo=DPOHead(spec))  # fmt: skip
        ref_logps = ref.logprobs.logps.chunk(2)
    rc, rr = (None, None) if ref_logps is None else ref_logps
    head = model_logprobs(model, b, stats=stats, fused_lm_head=True, backend=backend,
                          model_kwargs=model_kwargs, dpo=DPOHead(spec, rc, rr))  # fmt: skip
    return head.loss, ConcatenatedOutput(head.logprobs, rc, rr, b)
