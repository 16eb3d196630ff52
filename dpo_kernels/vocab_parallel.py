"""Vocabulary-parallel log-probs: each rank of a torch.distributed group holds a slice of the
vocabulary (of the logits, or of the LM head's rows), and every rank gets the full sums. Used by
`sequence_logprobs` and `linear_sequence_logprobs` with ``vocab_group=``."""

from __future__ import annotations

import torch

from ._autograd import input_grads
from .backend import kernels
from .validation import check_values


def _all_reduce(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(x, getattr(dist.ReduceOp, op.upper()), group=group)
    return x


def _all_reduce_logsumexp(lse_local: torch.Tensor, group) -> torch.Tensor:
    """log(sum over ranks of exp(lse_local)), without overflow: two all-reduces of [M] floats."""
    top = _all_reduce(lse_local.clone(), group, "max")
    top = torch.where(torch.isinf(top), 0.0, top)  # all -inf: any shift works
    return top + torch.log(_all_reduce(torch.exp(lse_local - top), group))


class VocabParallelTokenLogprobs(torch.autograd.Function):
    """Token log-probs when the vocabulary is split over `group`: a rank holds logits[..., V_local]
    for ids [vocab_start, vocab_start + V_local). Local log-sum-exp and label logit are combined
    with three all-reduces of [B, T] floats; the backward needs no communication."""

    @staticmethod
    def forward(ctx, logits, labels, counted, vocab_start, group, backend):
        local = labels.long() - vocab_start
        in_shard = counted & (local >= 0) & (local < logits.shape[-1])
        arg = torch.where(in_shard, local, 0)  # any valid index for rows owned elsewhere
        lse_local = kernels(backend).logprobs_forward(logits, arg, counted, None, -1, False)[1]
        acc = lse_local.dtype
        target = torch.where(in_shard, logits.gather(-1, arg.unsqueeze(-1)).squeeze(-1).to(acc), 0)
        _all_reduce(target, group)
        lse = torch.where(counted, _all_reduce_logsumexp(lse_local, group), 0.0)
        ctx.save_for_backward(logits, arg, counted, in_shard, lse)
        ctx.backend = backend
        return torch.where(counted, target - lse, 0.0)

    @staticmethod
    def backward(ctx, grad_tok):
        logits, arg, counted, in_shard, lse = ctx.saved_tensors
        dz = kernels(ctx.backend).logprobs_backward(grad_tok, logits, arg, counted, lse, -1)
        # Rows whose label lives on another rank: that position gets -g * p, not g * (1 - p).
        b, t = (counted & ~in_shard).nonzero(as_tuple=True)
        a = arg[b, t]
        p = torch.exp(logits[b, t, a].to(lse.dtype) - lse[b, t])
        dz[b, t, a] = (-grad_tok[b, t].to(lse.dtype) * p).to(dz.dtype)
        return input_grads(ctx, dz)


def check_group(group: object, vocab_start: object) -> None:
    """vocab_group a torch.distributed process group (or None, and then vocab_start 0), and
    vocab_start a non-negative int."""
    if not isinstance(vocab_start, int) or isinstance(vocab_start, bool) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    if group is None:
        if vocab_start:
            raise ValueError(
                f"vocab_start={vocab_start} needs vocab_group (the torch.distributed group the "
                "vocabulary is split over); without one the logits hold the whole vocabulary"
            )
        return
    import torch.distributed as dist

    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"vocab_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
            f"dist.new_group(...)), got {type(group).__name__}"
        )


def check_global_values(labels, mask, ignore_index, local_vocab: int, group) -> None:
    """`check_values` against the whole vocabulary: the ranks' slices summed over `group`."""
    vocab = int(_all_reduce(torch.tensor([local_vocab], device=labels.device), group))
    check_values(labels, mask, ignore_index, vocab)


class VocabParallelLinearTokens(torch.autograd.Function):
    """Token log-probs of hidden [M, H] through this rank's LM-head rows weight [V_local, H]
    (ids [vocab_start, vocab_start + V_local)) of a head split over `group`. The forward combines
    local log-sum-exps and label logits like the logits path; the backward all-reduces the hidden
    gradient (every rank's slice contributes to it) and keeps weight and bias gradients local."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, vocab_start, group, transform, backend):
        local = targets - vocab_start
        here = (local >= 0) & (local < weight.shape[0])
        arg = torch.where(here, local, -1)  # -1: the label's row is on another rank
        fwd = kernels(backend).linear_logprobs_forward
        tok_local, lse_local = fwd(hidden, weight, bias, arg, transform, False)[:2]
        target = torch.where(here, tok_local + lse_local, 0.0)
        lse = _all_reduce_logsumexp(lse_local, group)
        _all_reduce(target, group)
        ctx.save_for_backward(hidden, weight, bias, arg, lse)
        ctx.args = (group, transform, backend)
        return target - lse

    @staticmethod
    def backward(ctx, grad_tok):
        hidden, weight, bias, arg, lse = ctx.saved_tensors
        group, transform, backend = ctx.args
        needs = (True, ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        bwd = kernels(backend).linear_logprobs_backward
        dh, dw, db = bwd(grad_tok.to(lse.dtype), hidden, weight, bias, arg, lse, transform, needs)
        _all_reduce(dh, group)
        return input_grads(ctx, dh, dw if needs[1] else None, db if needs[2] else None)
