"""The packed (padding-free) layout and the per-token -> per-sequence reduction every log-prob op
ends with: tokens of many sequences back to back, split by cu_seqlens (flash-attn's varlen
convention; checked by validation.check_cu_seqlens)."""

from __future__ import annotations

import torch

from .common import SequenceLogprobs, TokenStats


def segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N] -> [S]: the sum of each sequence's tokens (differentiable)."""
    return torch.segment_reduce(x, "sum", offsets=cu_seqlens.long(), initial=0)


def segment_count(counted: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N] bool -> [S] int64 counts, exact."""
    c = torch.nn.functional.pad(counted.long().cumsum(0), (1, 0))
    cu = cu_seqlens.long()
    return c[cu[1:]] - c[cu[:-1]]


def batch_of_one(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """A flat [N, ...] layout as a batch of one sequence [1, N, ...]."""
    return tuple(None if t is None or not isinstance(t, torch.Tensor) else t.unsqueeze(0)
                 for t in tensors)  # fmt: skip


# Token sums are taken in chunks of this many tokens: see _fixed_order_sum.
_SUM_CHUNK = 4096


def _fixed_order_sum(x: torch.Tensor) -> torch.Tensor:
    """x.sum(-1), in an order fixed by x's shape alone, so bitwise identical for any thread count.

    ATen's CPU reduction splits a long row over threads when the output has one element (a batch
    of one sequence), and the partial sums then depend on the thread count. Here every row is cut
    into chunks of _SUM_CHUNK tokens (each too short to be split) and the chunk sums are summed the
    same way, until one chunk is left; rows of a batch are never split. Differentiable.
    """
    while x.shape[-1] > _SUM_CHUNK:
        pad = -x.shape[-1] % _SUM_CHUNK
        x = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, _SUM_CHUNK)).sum(-1)
    return x.sum(-1)


def sequence_outputs(
    tok: torch.Tensor,
    counted: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    ref_tok: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, ...] | None = None,
) -> SequenceLogprobs:
    """Per-token [B, T] outputs -> per-sequence sums and counts; packed ([1, N] + cu_seqlens)
    outputs come back as [N] tokens and [S] sequences."""
    if cu_seqlens is None:
        reduce, counts = _fixed_order_sum, counted.sum(-1)
    else:
        tok, counted = tok[0], counted[0]
        ref_tok = None if ref_tok is None else ref_tok[0]
        stats = None if stats is None else tuple(x[0] for x in stats)
        reduce, counts = (lambda x: segment_sum(x, cu_seqlens)), segment_count(counted, cu_seqlens)
    return SequenceLogprobs(
        logps=reduce(tok),
        counts=counts,
        token_logps=tok,
        ref_logps=None if ref_tok is None else reduce(ref_tok),
        ref_token_logps=ref_tok,
        stats=None if stats is None else TokenStats(*stats),
    )
