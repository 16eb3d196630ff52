"""Vocabulary-parallel log-probs: each rank of a torch.distributed group holds a slice of the
vocabulary (of the logits, or of the LM head's rows), and every rank gets the full sums. Used by
`sequence_logprobs` and `linear_sequence_logprobs` with ``vocab_group=``."""

from __future__ import annotations

import hashlib

import torch

from ._autograd import guard_double_backward, input_grads
from .backend import kernels
from .common import cast_to, counted_tokens, no_autocast
from .validation import check_values, refuse_without_values


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
        with torch.no_grad():  # (create_graph: guard_double_backward below refuses it)
            dz = kernels(ctx.backend).logprobs_backward(grad_tok, logits, arg, counted, lse, -1)
            # Rows whose label lives on another rank: that position gets -g * p, not g * (1 - p).
            b, t = (counted & ~in_shard).nonzero(as_tuple=True)
            a = arg[b, t]
            p = torch.exp(logits[b, t, a].to(lse.dtype) - lse[b, t])
            dz[b, t, a] = (-grad_tok[b, t].to(lse.dtype) * p).to(dz.dtype)
        op = "sequence_logprobs(vocab_group=...)"
        return input_grads(ctx, *guard_double_backward((dz,), op, logits))


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

    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "vocab_group: this rank is not a member of the group (dist.new_group returns "
            "GroupMember.NON_GROUP_MEMBER on the ranks it leaves out); call the op only on "
            "the group's ranks"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"vocab_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
            f"dist.new_group(...)), got {type(group).__name__}"
        )


def _flag_device(group) -> torch.device:
    """Where a collective's small tensor goes: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(group: object, check):
    """Runs `check()` (this rank's argument checks; returns its result). With a process group,
    every rank then learns whether any rank's checks failed (one all-reduce) and raises: the
    failing rank its own error, the others one that says so, so that no rank is left waiting in
    the next collective for one that raised."""
    if group is None:
        return check()
    import torch.distributed as dist

    error, result = None, None
    try:
        result = check()
    except (TypeError, ValueError, RuntimeError) as e:
        error = e
    if not isinstance(group, dist.ProcessGroup):
        if error is not None:
            raise error
        return result
    failed = _all_reduce(torch.tensor([error is not None], device=_flag_device(group)), group)
    if error is not None:
        raise error
    if bool(failed):
        raise ValueError(
            "vocab_group: another rank refused its inputs (see its error); every rank raises, so "
            "that none waits for it in a collective"
        )
    return result


_MIX = (0x9E3779B97F4A7C15 - 2**64, 0xBF58476D1CE4E5B9 - 2**64)  # splitmix64's, as int64


def _labels_digest(labels, mask, ignore_index) -> torch.Tensor:
    """An int64 digest of the counted tokens' (position, label) pairs: each pair hashed (a
    splitmix64-style mix, wrapping), the hashes summed: equal on ranks given the same, and
    otherwise different but by a 2^-64 fluke (a linear digest missed e.g. labels +1, -2, +1).
    Position and label are packed one-to-one (32 bits each) before the mix."""
    counted = counted_tokens(labels, mask, ignore_index).reshape(-1)
    ids = labels.reshape(-1).long() & (2**32 - 1)
    x = torch.arange(counted.numel(), device=counted.device) * 2**32 + ids
    for m, shift in zip(_MIX, (31, 29), strict=True):
        x = x * m
        x = x ^ (x >> shift)
    return torch.where(counted, x, 0).sum() + counted.numel()


def _digest(values: dict[str, object]) -> int:
    """An int64 digest of reprs (equal in every process, unlike Python's salted str hash)."""
    raw = hashlib.blake2b(repr(sorted(values.items())).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


def check_global_values(labels, mask, ignore_index, local_vocab: int, vocab_start: int,
                        group, same: dict[str, object]) -> None:  # fmt: skip
    """The ranks' slices [vocab_start, vocab_start + V_local) tile [0, V) without gaps or
    overlaps (else a label owned by no rank, or by two, would give a wrong sum silently), the
    ranks' counted labels agree (each rank adds its slice's part of every token's log-prob:
    other labels on another rank mix two batches silently), and so do the values in `same`
    (dtypes, sizes, the logit transform: a dtype or a size that differs ends the collectives'
    processes, a transform that differs gives wrong log-probs silently); every rank sees every
    rank's, so all raise alike. Then `check_values` against the whole V, every rank raising if
    one does."""
    import torch.distributed as dist

    refuse_without_values(
        "vocab_group=", labels, "compares the ranks' labels and vocabulary slices on the host"
    )
    here = _flag_device(group)
    mine = torch.stack([torch.tensor(vocab_start, device=here),
                        torch.tensor(local_vocab, device=here),
                        _labels_digest(labels, mask, ignore_index).to(here),
                        torch.tensor(_digest(same), device=here)])  # fmt: skip
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    if len({p[2].item() for p in parts}) > 1:
        raise ValueError(
            "vocab_group: the ranks passed different labels (or counted different tokens: mask, "
            "ignore_index); every rank of a vocabulary-parallel group computes the same tokens' "
            "log-probs from its slice of the vocabulary, so pass every rank the same labels and "
            "mask (the batch is split over the group's ranks by vocabulary, not by sequence)"
        )
    if len({p[3].item() for p in parts}) > 1:
        raise ValueError(
            f"vocab_group: the ranks passed different {', '.join(same)} (this rank: "
            f"{', '.join(map(str, same.values()))}); every rank of a vocabulary-parallel group "
            "must pass the same"
        )
    spans = sorted(tuple(p[:2].tolist()) for p in parts)
    vocab = 0
    for start, size in spans:
        if start != vocab:
            got = [(s, s + n) for s, n in spans]
            raise ValueError(
                "vocab_group: the ranks' vocabulary slices [vocab_start, vocab_start + V_local) "
                f"must tile [0, V) without gaps or overlaps, got {got}; pass each rank's "
                "vocab_start = the sum of the earlier ranks' V_local"
            )
        vocab = start + size
    agree(group, lambda: check_values(labels, mask, ignore_index, vocab))


class VocabParallelLinearTokens(torch.autograd.Function):
    """Token log-probs of hidden [M, H] through this rank's LM-head rows weight [V_local, H]
    (ids [vocab_start, vocab_start + V_local)) of a head split over `group`. The forward combines
    local log-sum-exps and label logits like the logits path; the backward all-reduces the hidden
    gradient (every rank's slice contributes to it) and keeps weight and bias gradients local."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, vocab_start, group, transform, compute_dtype,
                backend):  # fmt: skip
        local = targets - vocab_start
        here = (local >= 0) & (local < weight.shape[0])
        arg = torch.where(here, local, -1)  # -1: the label's row is on another rank
        fwd = kernels(backend).linear_logprobs_forward
        with no_autocast(hidden):
            h, w, b = cast_to(compute_dtype, hidden, weight, bias)
            tok_local, lse_local = fwd(h, w, b, arg, transform, False)[:2]
        target = torch.where(here, tok_local + lse_local, 0.0)
        lse = _all_reduce_logsumexp(lse_local, group)
        _all_reduce(target, group)
        ctx.save_for_backward(hidden, weight, bias, arg, lse)  # as given: cast again below
        ctx.args = (group, transform, compute_dtype, backend)
        return target - lse

    @staticmethod
    def backward(ctx, grad_tok):
        hidden, weight, bias, arg, lse = ctx.saved_tensors
        group, transform, compute_dtype, backend = ctx.args
        needs = (True, ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        bwd = kernels(backend).linear_logprobs_backward
        with torch.no_grad(), no_autocast(hidden):  # (create_graph: guard below refuses it)
            h, w, b = cast_to(compute_dtype, hidden, weight, bias)
            dh, dw, db = bwd(grad_tok.to(lse.dtype), h, w, b, arg, lse, transform, needs)
            # The ranks' partial dh (large, and mostly cancelling) added up in the accumulation
            # dtype, rounded once: added in bf16 they lost up to a fifth of the result. dw and db
            # (local) come in the accumulation dtype too, rounded once to their inputs' dtypes.
            dh = _all_reduce(dh, group).to(hidden.dtype)
        grads = (dh, dw.to(weight.dtype) if needs[1] else None,
                 db.to(bias.dtype) if needs[2] else None)  # fmt: skip
        op = "linear_sequence_logprobs(vocab_group=...)"
        return input_grads(ctx, *guard_double_backward(grads, op, hidden, weight))
