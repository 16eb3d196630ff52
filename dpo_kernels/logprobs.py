"""`sequence_logprobs`: per-sequence sums of the label tokens' log-probs from logits, fused.

Validation (validation.py) -> the `dpo_kernels::token_logprobs` custom op, with a fake
implementation (torch.compile traces through it without a graph break) and autograd -> the
backend's `logprobs_forward` / `logprobs_backward` (backend.py). The packed layout (packed.py) and
the vocabulary-parallel path (vocab_parallel.py) extend it.
"""

from __future__ import annotations

import torch

from ._autograd import input_grads, no_double_backward, no_setup
from .backend import kernels, resolve_backend
from .common import SequenceLogprobs, acc_dtype, counted_tokens, stats_dtypes
from .packed import batch_of_one, sequence_outputs
from .validation import check_flag, check_logprob_inputs, check_packed, check_values
from .vocab_parallel import VocabParallelTokenLogprobs, agree, check_global_values, check_group


@torch.library.custom_op("dpo_kernels::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    ignore_index: int,
    stats: bool,
    backend: str,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """(token log-probs, lse, ref token log-probs, entropy, mean logit, is_top1, log_sum_sq); see
    reference."""
    check_values(labels, mask, ignore_index, logits.shape[-1])
    fwd = kernels(backend).logprobs_forward
    return tuple(fwd(logits, labels, mask, ref_logits, ignore_index, stats))


@_token_logprobs_op.register_fake
def _(logits, labels, mask, ref_logits, ignore_index, stats, backend):
    B, T, _ = logits.shape
    acc = acc_dtype(logits.dtype)
    shape = (B, T)
    ref_tok = logits.new_empty(0, dtype=acc)
    if ref_logits is not None:
        ref_tok = logits.new_empty(shape, dtype=acc_dtype(ref_logits.dtype))
    s = shape if stats else (0,)
    return (
        logits.new_empty(shape, dtype=acc),
        logits.new_empty(shape, dtype=acc),
        ref_tok,
        *(logits.new_empty(s, dtype=d) for d in stats_dtypes(acc)),
    )


@torch.library.custom_op("dpo_kernels::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    grad_tok: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    return kernels(backend).logprobs_backward(grad_tok, logits, labels, mask, lse, ignore_index)


@_token_logprobs_backward_op.register_fake
def _(grad_tok, logits, labels, mask, lse, ignore_index, backend):
    # The logits' own strides where the backend's kernel keeps them.
    strides = kernels(backend).grad_strides(tuple(logits.shape), tuple(logits.stride()))
    if strides is not None:
        return logits.new_empty_strided(logits.shape, strides)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, mask, _, ignore_index, _, backend = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(logits, labels, mask, output[1])
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _backward(ctx, grad_tok, *_):
    logits, labels, mask, lse = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0]:
        dlogits = _token_logprobs_backward_op(
            grad_tok, logits, labels, mask, lse, ctx.ignore_index, ctx.backend
        )
    return input_grads(ctx, dlogits)


torch.library.register_autograd(
    "dpo_kernels::token_logprobs", _backward, setup_context=_setup_context
)


torch.library.register_autograd(
    "dpo_kernels::token_logprobs_backward", no_double_backward, setup_context=no_setup
)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    ref_logits: torch.Tensor | None = None,
    stats: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    vocab_group: object | None = None,
    vocab_start: int = 0,
    backend: str | None = None,
) -> SequenceLogprobs:
    """Per-sequence sums of the label tokens' log-probs, fused: log-softmax + gather + masked sum.

    logits: [B, T, V] (bf16, fp16, fp32 or fp64; any strides, e.g. ``logits[:, :-1]``).
    labels: [B, T] integer token ids, already aligned with logits (``labels[:, 1:]`` for causal
        LMs); tokens equal to ``ignore_index`` do not count.
    mask: optional [B, T] bool or 0/1 tensor; tokens with mask 0 do not count.
    ref_logits: optional [B, T, V] reference-model logits for the same labels; their sums come back
        in ``ref_logps`` without gradient, computed in the same kernel launch.
    stats: also return the policy's per-token entropy, mean logit, label-is-argmax and
        log(sum_v p_v^2) (`TokenStats`, no gradient), computed in the same pass over the logits.
    cu_seqlens: packed layout: logits [N, V], labels [N] (mask [N]) hold S sequences back to back,
        sequence i being tokens cu_seqlens[i]:cu_seqlens[i + 1]; sums and counts are [S], token
        outputs [N]. Labels must not cross sequences (see `dpo_kernels.batches.pack`).
    vocab_group, vocab_start: vocabulary-parallel: this rank's logits are the vocabulary columns
        [vocab_start, vocab_start + V) of a vocabulary split over the torch.distributed group
        `vocab_group`; labels are global ids. Every rank gets the full sums; gradients stay local.
    backend: "triton", "cpu", "reference" or "auto"; None (default): $DPO_KERNELS_BACKEND, else
        "auto" (`resolve_backend`).

    Returns a `SequenceLogprobs`; ``.pairs()`` splits a concatenated [chosen; rejected] batch.
    Accumulates in float32 (float64 for float64 logits) whatever the input dtype. The log-sum-exp
    is the only thing saved for the backward. A NaN in the logits of a counted token makes that
    sequence's sum NaN and leaves every other sequence untouched; logits of tokens that do not count
    are never read.
    """
    if cu_seqlens is not None and isinstance(logits, torch.Tensor) and logits.dim() == 2:
        logits, labels, mask, ref_logits = batch_of_one(logits, labels, mask, ref_logits)

    def check() -> str:
        check_logprob_inputs(logits, labels, mask, ref_logits, ignore_index)
        check_flag("stats", stats)
        check_packed(cu_seqlens, logits, "logits")
        check_group(vocab_group, vocab_start)
        if vocab_group is not None and (ref_logits is not None or stats):
            raise ValueError(
                "vocab_group does not combine with ref_logits or stats: call the reference model "
                "separately (under torch.no_grad) and compute statistics on gathered logits"
            )
        return resolve_backend(backend, logits.device)

    name = agree(vocab_group, check)  # vocab_group: every rank raises if one does
    counted = counted_tokens(labels, mask, ignore_index)
    if vocab_group is not None:
        check_global_values(labels, mask, ignore_index, logits.shape[-1], vocab_start,
                            vocab_group, {"logits dtype": logits.dtype})  # fmt: skip
        tok = VocabParallelTokenLogprobs.apply(
            logits, labels, counted, vocab_start, vocab_group, name
        )
        ref_tok, token_stats = None, ()
    else:
        tok, _, ref_tok, *token_stats = _token_logprobs_op(
            logits, labels, mask, ref_logits, ignore_index, stats, name
        )
    return sequence_outputs(
        tok,
        counted,
        cu_seqlens,
        ref_tok if ref_logits is not None else None,
        tuple(token_stats) if stats else None,
    )
