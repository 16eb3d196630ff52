"""`linear_sequence_logprobs`: the log-probs of the LM head's logits, from hidden states without
the logits.

Validation (validation.py) -> the `dpo_kernels::linear_token_logprobs` custom op (the logit
transform travels as one `list[float]`, `LogitTransform.pack`), with a fake implementation and
autograd -> the backend's `linear_logprobs_forward` / `linear_logprobs_backward` (backend.py) on
the rows `_CountedRows` picks. The packed layout (packed.py) and the vocabulary-parallel head
(vocab_parallel.py) extend it.
"""

from __future__ import annotations

import torch

from ._autograd import input_grads, no_double_backward, no_setup
from .backend import kernels, resolve_backend, sync_free
from .common import (
    LogitTransform,
    SequenceLogprobs,
    acc_dtype,
    cast_to,
    counted_tokens,
    no_autocast,
    stats_dtypes,
)
from .packed import batch_of_one, sequence_outputs
from .validation import check_flag, check_linear_inputs, check_packed, check_values, make_transform
from .vocab_parallel import VocabParallelLinearTokens, agree, check_global_values, check_group


def _scatter_counted(counted: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[B, T] with the counted tokens' values ([M], in row-major order) and 0 elsewhere."""
    return values.new_zeros(counted.shape).masked_scatter_(counted, values)


@torch.library.custom_op("dpo_kernels::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ignore_index: int,
    transform: list[float],
    stats: bool,
    compute_dtype: torch.dtype | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token log-probs, lse, entropy, mean logit, is_top1, log_sum_sq), [B, T] each (the last
    four [0] without stats); `transform` is a packed LogitTransform; the matmuls take hidden,
    weight and bias in compute_dtype (None: their own)."""
    check_values(labels, mask, ignore_index, weight.shape[0])
    counted = counted_tokens(labels, mask, ignore_index)
    fwd = kernels(backend).linear_logprobs_forward
    tf = LogitTransform.unpack(transform)
    rows = _CountedRows(counted, sync_free(hidden.device))
    with no_autocast(hidden):
        h, w, b = cast_to(compute_dtype, rows.hidden(hidden), weight, bias)
        out = fwd(h, w, b, rows.targets(labels), tf, stats)
    if not stats:
        out = out[:2]
    return (*(rows.scatter(x) for x in out), *_empty_stats(hidden, compute_dtype)[len(out) - 2 :])


class _CountedRows:
    """Which token rows the linear kernels project. By default only the counted ones, gathered by
    index (one host sync: their number); in sync-free mode every row, with a zero hidden row and
    target -1 (no label) where the token does not count, and zeros written back there."""

    def __init__(self, counted: torch.Tensor, every_row: bool):
        self.counted, self.every_row = counted, every_row
        self.index = None if every_row else counted.nonzero(as_tuple=True)

    def hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.every_row:
            return torch.where(self.counted.unsqueeze(-1), hidden, 0).reshape(-1, hidden.shape[-1])
        return hidden[self.index]

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        if self.every_row:
            return torch.where(self.counted, labels, -1).reshape(-1).long()
        return labels[self.index].long()

    def rows(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-token [B, T] values as the projected rows' values ([M])."""
        if self.every_row:
            return torch.where(self.counted, x, fill).reshape(-1)
        return x[self.index]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """The projected rows' values back to [B, T (, ...)], zeros where not counted."""
        shape = (*self.counted.shape, *values.shape[1:])
        if self.every_row:
            mask = self.counted.view(*self.counted.shape, *(1,) * (values.dim() - 1))
            return torch.where(mask, values.view(shape), values.new_zeros(()))
        return values.new_zeros(shape).index_put_(self.index, values)


def _empty_stats(like: torch.Tensor, compute_dtype: torch.dtype | None) -> list[torch.Tensor]:
    acc = acc_dtype(compute_dtype or like.dtype)
    return [like.new_empty(0, dtype=d) for d in stats_dtypes(acc)]


@_linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, mask, ignore_index, transform, stats, compute_dtype, backend):
    acc = acc_dtype(compute_dtype or hidden.dtype)
    shape = labels.shape
    tok, lse = hidden.new_empty(shape, dtype=acc), hidden.new_empty(shape, dtype=acc)
    if not stats:
        return tok, lse, *_empty_stats(hidden, compute_dtype)
    return tok, lse, *(hidden.new_empty(shape, dtype=d) for d in stats_dtypes(acc))


@torch.library.custom_op("dpo_kernels::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward_op(
    grad_tok: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    transform: list[float],
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    compute_dtype: torch.dtype | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of hidden, weight and bias (the forward's inputs, cast to compute_dtype
    again for the recompute), in the accumulation dtype from the backend, rounded once to their
    own dtypes."""
    counted = counted_tokens(labels, mask, ignore_index)
    bwd = kernels(backend).linear_logprobs_backward
    rows = _CountedRows(counted, sync_free(hidden.device))
    with no_autocast(hidden):
        h, w, b = cast_to(compute_dtype, rows.hidden(hidden), weight, bias)
        dh, dw, db = bwd(
            rows.rows(grad_tok.to(lse.dtype)),
            h,
            w,
            b,
            rows.targets(labels),
            rows.rows(lse, float("inf")),  # exp(z - inf) = 0: rows not counted add nothing
            LogitTransform.unpack(transform),
            (hidden_grad, weight_grad, bias_grad),
        )
    if hidden_grad:  # tokens that do not count get exactly zero
        dh = rows.scatter(dh.to(hidden.dtype))
    dw = dw.to(weight.dtype) if weight_grad else dw
    db = db.to(bias.dtype) if bias_grad and bias is not None else db
    # Outputs must not alias each other: the gradients not asked for are distinct empty tensors.
    return tuple(g if want else hidden.new_empty(0) for g, want in
                 zip((dh, dw, db), (hidden_grad, weight_grad, bias_grad), strict=True))  # fmt: skip


@_linear_token_logprobs_backward_op.register_fake
def _(grad_tok, hidden, weight, bias, labels, mask, lse, ignore_index, transform, hidden_grad,
      weight_grad, bias_grad, compute_dtype, backend):  # fmt: skip
    empty = hidden.new_empty(0)
    return (  # contiguous, as the backends make them (not the inputs' strides)
        hidden.new_empty(hidden.shape) if hidden_grad else empty,
        weight.new_empty(weight.shape) if weight_grad else empty,
        bias.new_empty(bias.shape) if bias_grad and bias is not None else empty,
    )


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, mask, ignore_index, transform, _, compute_dtype, backend = inputs
    lse = output[1]
    ctx.mark_non_differentiable(*output[1:])
    # The inputs as given (not their compute_dtype copies: the backward casts again, and no second
    # copy of the head lives from the forward to the backward).
    ctx.save_for_backward(hidden, weight, bias, labels, mask, lse)
    ctx.args = (ignore_index, transform)
    ctx.tail = (compute_dtype, backend)


def _linear_backward(ctx, grad_tok, *_):
    hidden, weight, bias, labels, mask, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]  # a frozen hidden or weight skips its matmul
    grads = _linear_token_logprobs_backward_op(
        grad_tok, hidden, weight, bias, labels, mask, lse, *ctx.args, *needs, *ctx.tail
    )
    return input_grads(ctx, *(g if need else None for g, need in zip(grads, needs, strict=True)))


torch.library.register_autograd(
    "dpo_kernels::linear_token_logprobs", _linear_backward, setup_context=_linear_setup_context
)
torch.library.register_autograd(
    "dpo_kernels::linear_token_logprobs_backward",
    no_double_backward,
    setup_context=no_setup,
)


def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    stats: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    vocab_group: object | None = None,
    vocab_start: int = 0,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> SequenceLogprobs:
    """`sequence_logprobs` of the LM head's logits, computed from hidden states without them.

    hidden: [B, T, H] (or [N, H], taken as one sequence [1, N, H]); bf16, fp16, fp32 or fp64.
    weight: [V, H] LM head (``lm_head.weight``), same dtype as hidden; bias: optional [V].
    compute_dtype: the dtype the matmuls take hidden, weight and bias in, cast inside the op (the
        dtype torch.autocast would give the LM head's matmul: the fused head passes it); their
        dtypes may then differ, and their gradients still come back in their own dtypes, from
        the float32 accumulators. None: the inputs' dtype.
    labels, mask, ignore_index: as in `sequence_logprobs`, shaped ``hidden.shape[:-1]``.
    The logits are ``z = logit_scale * softcap(hidden @ weight.T + bias) / temperature`` with
    ``softcap(x) = softcap * tanh(x / softcap)`` (the identity when softcap is None).
    stats, cu_seqlens, backend: as in `sequence_logprobs` (packed: hidden [N, H], labels [N]).
    vocab_group, vocab_start: vocabulary-parallel LM head: `weight` (and `bias`) are rows
        [vocab_start, vocab_start + V) of a head split over the torch.distributed group; hidden is
        the same on every rank and its gradient is all-reduced; weight gradients stay local.

    Only the counted tokens are projected, in tiles of tokens x vocabulary that are never all alive
    at once; the forward saves one float32 log-sum-exp per token and the backward recomputes each
    tile. Gradients reach hidden, weight and bias; those of weight and bias accumulate in float32
    and are cast once. Returns a `SequenceLogprobs` without reference fields.
    """
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2:  # [N, H]: one sequence, or packed
        hidden, labels, mask = batch_of_one(hidden, labels, mask)

    def check() -> tuple[str, LogitTransform]:
        transform = make_transform(logit_scale, softcap, temperature)
        check_flag("stats", stats)
        check_linear_inputs(hidden, weight, bias, labels, mask, ignore_index, compute_dtype)
        check_packed(cu_seqlens, hidden, "hidden")
        check_group(vocab_group, vocab_start)
        if vocab_group is not None and stats:
            raise ValueError("vocab_group does not combine with stats")
        return resolve_backend(backend, hidden.device), transform

    name, transform = agree(vocab_group, check)  # vocab_group: every rank raises if one does
    counted = counted_tokens(labels, mask, ignore_index)
    if vocab_group is not None:
        same = {
            "hidden dtype": hidden.dtype,
            "compute_dtype": compute_dtype,
            "hidden size": hidden.shape[-1],
            "logit transform (logit_scale, softcap, temperature)": transform.pack(),
        }
        check_global_values(labels, mask, ignore_index, weight.shape[0], vocab_start,
                            vocab_group, same)  # fmt: skip
        tok_c = VocabParallelLinearTokens.apply(
            hidden[counted], weight, bias, labels[counted].long(), vocab_start, vocab_group,
            transform, compute_dtype, name,
        )  # fmt: skip
        return sequence_outputs(_scatter_counted(counted, tok_c), counted, cu_seqlens)
    tok, _, *token_stats = _linear_token_logprobs_op(
        hidden,
        weight,
        bias,
        labels,
        mask,
        ignore_index,
        transform.pack(),
        stats,
        compute_dtype,
        name,
    )
    return sequence_outputs(tok, counted, cu_seqlens, stats=tuple(token_stats) if stats else None)
