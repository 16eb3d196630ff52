"""Public ops with autograd, and the one place that picks a backend.

Backends: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpu" (the C++
kernels in csrc/, compiled on first use by _build.py), "reference" (plain PyTorch,
ops/reference.py).
"auto" picks triton for CUDA and cpu (else reference) for CPU tensors. The `backend=` argument,
or else the DPO_KERNELS_BACKEND environment variable, forces one.

Each op is a torch.library custom op with a fake implementation, so torch.compile traces through
it without a graph break; validation of shapes, dtypes and devices happens before it, in Python,
and validation of label values inside it, before any kernel runs.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import NamedTuple

import torch

from . import _build, _cpu
from .ops import reference

BACKENDS = ("auto", "triton", "cpu", "reference")


# --------------------------------------------------------------------------------------------
# Host synchronization. On CUDA no op reads a device value back to the host to validate it: label,
# mask and cu_seqlens checks are device-side asserts (`torch._assert_async`: a bad value stops the
# process at a later CUDA call, with the message, instead of raising a ValueError that names the
# position, as on CPU). What is left: the linear path gathers the counted tokens' rows, which needs
# their number on the host: one sync in the forward and one in the backward. Sync-free mode
# projects every token instead (counted or not: more matmul work when many tokens do not count)
# and syncs never, so a step can be captured in a CUDA graph; it is on while a graph is captured.

_SYNC_FREE: bool | None = None


def set_sync_free(enabled: bool | None) -> None:
    """Sync-free mode on (True), off (False), or automatic (None: on while a CUDA graph is being
    captured, or when the DPO_KERNELS_SYNC_FREE environment variable is 1). See above."""
    global _SYNC_FREE
    _SYNC_FREE = enabled


def sync_free(device: torch.device) -> bool:
    """Whether ops on `device` must not synchronize with the host (see `set_sync_free`)."""
    if _SYNC_FREE is not None:
        return _SYNC_FREE
    if os.environ.get("DPO_KERNELS_SYNC_FREE", "0") not in ("", "0"):
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _device_side_checks(device: torch.device) -> bool:
    """Data checks as device-side asserts (CUDA), or as host checks that raise ValueError."""
    return device.type == "cuda"


class TokenStats(NamedTuple):
    """Per-token statistics of the policy logits that trainers use (no gradient; 0 where not
    counted): TRL's entropy, logits/chosen|rejected and mean_token_accuracy come from the first
    three, WPO's weights (TRL's use_weighting) from log_sum_sq."""

    entropy: torch.Tensor  # [B, T] -sum_v p_v log p_v
    mean_logits: torch.Tensor  # [B, T] sum_v z_v / V
    is_top1: torch.Tensor  # [B, T] bool: the label is the (first) argmax; False if a logit is NaN
    log_sum_sq: torch.Tensor  # [B, T] log sum_v p_v^2


class SequenceLogprobs(NamedTuple):
    """Per-sequence outputs of `sequence_logprobs` (float32; float64 for float64 logits)."""

    logps: torch.Tensor  # [B] sum of the counted tokens' log-probs (carries gradient)
    counts: torch.Tensor  # [B] int64 number of counted tokens
    token_logps: torch.Tensor  # [B, T] per-token log-probs, 0 where not counted (carries gradient)
    ref_logps: torch.Tensor | None = None  # [B] same sums under ref_logits (no gradient), if given
    ref_token_logps: torch.Tensor | None = None  # [B, T]
    stats: TokenStats | None = None  # with stats=True

    def pairs(self) -> PairLogprobs:
        """Split a concatenated [chosen; rejected] batch into its halves."""
        B = self.logps.shape[0]
        if B % 2:
            raise ValueError(
                f"pairs() needs an even batch ([chosen; rejected] concatenated), got {B} rows"
            )
        h = B // 2
        ref = self.ref_logps
        return PairLogprobs(
            self.logps[:h],
            self.logps[h:],
            None if ref is None else ref[:h],
            None if ref is None else ref[h:],
            self.counts[:h],
            self.counts[h:],
        )


class PairLogprobs(NamedTuple):
    """The four per-sequence sums a DPO loss needs, and the token counts of each half."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor


# --------------------------------------------------------------------------------------------
# Backend choice


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cpu_extension_available() -> bool:
    """True when the C++ CPU kernels (csrc/) are loaded; builds them on first call if needed
    (only CPU tensors ask, so CUDA users never wait for a compiler)."""
    return _cpu.AVAILABLE


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend for tensors on `device` (see the module docstring)."""
    name = backend or os.environ.get("DPO_KERNELS_BACKEND") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpu" if device.type == "cpu" and cpu_extension_available() else "reference"
    if name == "triton" and device.type != "cuda" and not _triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "before importing dpo_kernels to run the Triton kernels on CPU (slow, for tests)"
        )
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if not cpu_extension_available():
            raise RuntimeError(
                "backend='cpu' needs the C++ CPU kernels, which could not be built here "
                f"({_build.load_error()}); fix that, then run `dpo-kernels build`, or use "
                "backend='reference'"
            )
    return name


_REFERENCE_KERNELS = {
    "logprobs": (reference.token_logprobs, reference.token_logprobs_backward),
    "linear_logprobs": (reference.linear_token_logprobs, reference.linear_token_logprobs_backward),
}


def _kernels(backend: str, op: str = "logprobs"):
    """(forward, backward) of `op` ("logprobs" or "linear_logprobs") on a concrete backend."""
    if backend == "reference":
        return _REFERENCE_KERNELS[op]
    if backend == "triton":
        from .ops import triton_linear_logprobs, triton_logprobs

        module = triton_logprobs if op == "logprobs" else triton_linear_logprobs
    else:
        module = _cpu
    return getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward")


# --------------------------------------------------------------------------------------------
# Validation


def _check_same_device(name: str, t: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
    if t.device != other.device:
        raise ValueError(
            f"{name} is on {t.device} but {other_name} is on {other.device}; move {name} with "
            f"{name}.to({other_name}.device)"
        )


def _check_float(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(
            f"{name} must be a floating-point tensor (bf16, fp16, fp32 or fp64), got {got}"
        )


def _check_labels_and_mask(
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ignore_index: int,
    source: torch.Tensor,
    source_name: str,
    token_dims: int,
) -> None:
    """labels (and mask) shaped like the first `token_dims` dims of `source`, on its device."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of token ids, got {got}")
    if labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor of token ids, got torch.bool")
    shape = tuple(source.shape[:token_dims])
    if tuple(labels.shape) != shape:
        hint = f"; for causal LMs pass {source_name}[:, :-1] with labels[:, 1:]"
        raise ValueError(
            f"labels must have shape {shape} ({source_name}.shape[:{token_dims}]), got "
            f"{tuple(labels.shape)}" + (hint if token_dims == 2 else "")
        )
    _check_same_device("labels", labels, source, source_name)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.is_complex():
            raise TypeError("mask must be a bool or 0/1 tensor shaped like labels")
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask must have the shape of labels {shape}, got {tuple(mask.shape)}")
        _check_same_device("mask", mask, source, source_name)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(
            f"ignore_index must lie in the int64 range [-2**63, 2**63 - 1], got {ignore_index}; "
            "use a value no label takes, such as -100"
        )


def _check_logprob_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    ignore_index: int,
) -> None:
    _check_float("logits", logits)
    if logits.dim() != 3:
        raise ValueError(
            f"logits must be [batch, tokens, vocab], got shape {tuple(logits.shape)}; "
            "add a batch dimension with logits.unsqueeze(0)"
        )
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary (last dimension is 0)")
    _check_labels_and_mask(labels, mask, ignore_index, logits, "logits", 2)
    if ref_logits is not None:
        if not isinstance(ref_logits, torch.Tensor) or not ref_logits.is_floating_point():
            raise TypeError("ref_logits must be a floating-point tensor like logits")
        if ref_logits.shape != logits.shape:
            raise ValueError(
                f"ref_logits must have the shape of logits {tuple(logits.shape)}, got "
                f"{tuple(ref_logits.shape)}"
            )
        _check_same_device("ref_logits", ref_logits, logits, "logits")


def _check_linear_inputs(hidden, weight, bias, labels, mask, ignore_index, transform) -> None:
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(
            "weight must be the LM head's [vocab, hidden] matrix (lm_head.weight), got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (first dimension is 0)")
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"hidden must be [batch, tokens, hidden] or [tokens, hidden], got shape "
            f"{tuple(hidden.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has {hidden.shape[-1]} features but weight has shape {tuple(weight.shape)} "
            f"([vocab, hidden]); they must agree (pass lm_head.weight, not its transpose)"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}; they must match, e.g. "
            "hidden.to(weight.dtype)"
        )
    _check_same_device("weight", weight, hidden, "hidden")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},) (weight.shape[:1]), got "
                f"{tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias is {bias.dtype} but weight is {weight.dtype}; they must match")
        _check_same_device("bias", bias, hidden, "hidden")
    _check_labels_and_mask(labels, mask, ignore_index, hidden, "hidden", hidden.dim() - 1)
    logit_scale, softcap, temperature = transform
    for name, value in (("logit_scale", logit_scale), ("temperature", temperature)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if softcap is not None and (
        not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0
    ):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")


def _check_values(
    labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int, vocab: int
) -> None:
    """Data checks: counted labels in [0, vocab), mask values 0 or 1. On CPU one look at the
    values and a ValueError naming the first bad position; on CUDA a device-side assert."""
    counted = reference.counted_tokens(labels, mask, ignore_index)
    bad_label = counted & ((labels < 0) | (labels >= vocab))
    bad_mask = None
    if mask is not None and mask.dtype != torch.bool:
        bad_mask = (mask != 0) & (mask != 1)
    if _device_side_checks(labels.device):
        bad = bad_label.any() if bad_mask is None else bad_label.any() | bad_mask.any()
        torch._assert_async(
            ~bad,
            f"dpo_kernels: a counted label is outside the vocabulary [0, {vocab}) or the mask "
            f"holds a value other than 0 and 1; use ignore_index={ignore_index} (or mask=0) for "
            "tokens that should not count (run on CPU tensors to see the position)",
        )
        return
    flags = torch.stack(
        [bad_label.any(), bad_mask.any() if bad_mask is not None else bad_label.new_zeros(())]
    ).tolist()
    if flags[0]:
        b, t = bad_label.nonzero()[0].tolist()
        raise ValueError(
            f"labels[{b}, {t}] = {labels[b, t].item()} is outside the vocabulary [0, {vocab}); "
            f"use ignore_index={ignore_index} (or mask=0) for tokens that should not count"
        )
    if flags[1]:
        b, t = bad_mask.nonzero()[0].tolist()
        raise ValueError(
            f"mask[{b}, {t}] = {mask[b, t].item()}; mask must hold only 0 and 1 (or be bool)"
        )


# --------------------------------------------------------------------------------------------
# The token log-prob op: custom op + fake + autograd


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
    _check_values(labels, mask, ignore_index, logits.shape[-1])
    fwd, _ = _kernels(backend)
    return tuple(fwd(logits, labels, mask, ref_logits, ignore_index, stats))


@_token_logprobs_op.register_fake
def _(logits, labels, mask, ref_logits, ignore_index, stats, backend):
    B, T, _ = logits.shape
    acc = reference.acc_dtype(logits.dtype)
    shape = (B, T)
    ref_tok = logits.new_empty(0, dtype=acc)
    if ref_logits is not None:
        ref_tok = logits.new_empty(shape, dtype=reference.acc_dtype(ref_logits.dtype))
    s = shape if stats else (0,)
    return (
        logits.new_empty(shape, dtype=acc),
        logits.new_empty(shape, dtype=acc),
        ref_tok,
        *(logits.new_empty(s, dtype=d) for d in reference.stats_dtypes(acc)),
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
    _, bwd = _kernels(backend)
    return bwd(grad_tok, logits, labels, mask, lse, ignore_index)


@_token_logprobs_backward_op.register_fake
def _(grad_tok, logits, labels, mask, lse, ignore_index, backend):
    if backend == "triton":  # the logits' own strides where the kernel keeps them
        from .ops.triton_logprobs import grad_strides

        strides = grad_strides(tuple(logits.shape), tuple(logits.stride()))
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
    return dlogits, None, None, None, None, None, None


torch.library.register_autograd(
    "dpo_kernels::token_logprobs", _backward, setup_context=_setup_context
)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "dpo_kernels: double backward (torch.autograd.grad(..., create_graph=True), e.g. a "
        "gradient penalty) through sequence_logprobs / linear_sequence_logprobs is not supported: "
        "their backward is a fused kernel with no derivative of its own. Compute the term that "
        "needs second derivatives with plain PyTorch (log_softmax + gather)."
    )


def _no_setup(ctx, inputs, output) -> None:
    pass


torch.library.register_autograd(
    "dpo_kernels::token_logprobs_backward", _no_double_backward, setup_context=_no_setup
)


# --------------------------------------------------------------------------------------------
# Packed (padding-free) layout: tokens of many sequences back to back, split by cu_seqlens.


def check_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int) -> None:
    """cu_seqlens: [S + 1] integer offsets from 0 to n_tokens, non-decreasing (flash-attn's varlen
    convention). Raises ValueError naming what is wrong."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.is_floating_point():
        raise TypeError("cu_seqlens must be an integer tensor of sequence offsets, [S + 1]")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D [S + 1] with S >= 1, got {tuple(cu_seqlens.shape)}"
        )
    if _device_side_checks(cu_seqlens.device):
        cu = cu_seqlens.long()
        ok = (cu[0] == 0) & (cu[-1] == n_tokens) & (cu[1:] >= cu[:-1]).all()
        torch._assert_async(
            ok,
            f"cu_seqlens must rise from 0 to the number of tokens ({n_tokens}) without going down",
        )
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != n_tokens or any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the number of tokens ({n_tokens}) without going "
            f"down, got {cu[:4]}{'...' if len(cu) > 4 else ''}{cu[-1:]}"
        )


def segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N] -> [S]: the sum of each sequence's tokens (differentiable)."""
    return torch.segment_reduce(x, "sum", offsets=cu_seqlens.long(), initial=0)


def segment_count(counted: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N] bool -> [S] int64 counts, exact."""
    c = torch.nn.functional.pad(counted.long().cumsum(0), (1, 0))
    cu = cu_seqlens.long()
    return c[cu[1:]] - c[cu[:-1]]


def _batch_of_one(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """A flat [N, ...] layout as a batch of one sequence [1, N, ...]."""
    return tuple(None if t is None or not isinstance(t, torch.Tensor) else t.unsqueeze(0)
                 for t in tensors)  # fmt: skip


def _check_packed(cu_seqlens: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    if cu_seqlens is None:
        return
    if x.shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens, {name} must be packed [N, ...] (or [1, N, ...]), got "
            f"{tuple(x.shape)}"
        )
    check_cu_seqlens(cu_seqlens, x.shape[1])


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


def _sequence_outputs(
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


# --------------------------------------------------------------------------------------------
# Vocabulary-parallel log-probs: each rank holds a slice of the vocabulary.


def _all_reduce(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(x, getattr(dist.ReduceOp, op.upper()), group=group)
    return x


def _all_reduce_logsumexp(lse_local: torch.Tensor, group) -> torch.Tensor:
    """log(sum over ranks of exp(lse_local)), without overflow: two all-reduces of [M] floats."""
    top = _all_reduce(lse_local.clone(), group, "max")
    top = torch.where(torch.isinf(top), 0.0, top)  # all -inf: any shift works
    return top + torch.log(_all_reduce(torch.exp(lse_local - top), group))


class _VocabParallelTokenLogprobs(torch.autograd.Function):
    """Token log-probs when the vocabulary is split over `group`: a rank holds logits[..., V_local]
    for ids [vocab_start, vocab_start + V_local). Local log-sum-exp and label logit are combined
    with three all-reduces of [B, T] floats; the backward needs no communication."""

    @staticmethod
    def forward(ctx, logits, labels, counted, vocab_start, group, backend):
        local = labels.long() - vocab_start
        in_shard = counted & (local >= 0) & (local < logits.shape[-1])
        arg = torch.where(in_shard, local, 0)  # any valid index for rows owned elsewhere
        fwd, _ = _kernels(backend)
        lse_local = fwd(logits, arg, counted, None, -1, False)[1]
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
        _, bwd = _kernels(ctx.backend)
        dz = bwd(grad_tok, logits, arg, counted, lse, -1)
        # Rows whose label lives on another rank: that position gets -g * p, not g * (1 - p).
        b, t = (counted & ~in_shard).nonzero(as_tuple=True)
        a = arg[b, t]
        p = torch.exp(logits[b, t, a].to(lse.dtype) - lse[b, t])
        dz[b, t, a] = (-grad_tok[b, t].to(lse.dtype) * p).to(dz.dtype)
        return dz, None, None, None, None, None


def _check_global_values(labels, mask, ignore_index, local_vocab: int, group) -> None:
    """`_check_values` against the whole vocabulary: the ranks' slices summed over `group`."""
    vocab = int(_all_reduce(torch.tensor([local_vocab], device=labels.device), group))
    _check_values(labels, mask, ignore_index, vocab)


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
        outputs [N]. Labels must not cross sequences (see `dpo_kernels.forward.packed_labels`).
    vocab_group, vocab_start: vocabulary-parallel: this rank's logits are the vocabulary columns
        [vocab_start, vocab_start + V) of a vocabulary split over the torch.distributed group
        `vocab_group`; labels are global ids. Every rank gets the full sums; gradients stay local.

    Returns a `SequenceLogprobs`; ``.pairs()`` splits a concatenated [chosen; rejected] batch.
    Accumulates in float32 (float64 for float64 logits) whatever the input dtype. The log-sum-exp
    is the only thing saved for the backward. A NaN in the logits of a counted token makes that
    sequence's sum NaN and leaves every other sequence untouched; logits of tokens that do not count
    are never read.
    """
    if cu_seqlens is not None and isinstance(logits, torch.Tensor) and logits.dim() == 2:
        logits, labels, mask, ref_logits = _batch_of_one(logits, labels, mask, ref_logits)
    _check_logprob_inputs(logits, labels, mask, ref_logits, ignore_index)
    _check_packed(cu_seqlens, logits, "logits")
    name = resolve_backend(backend, logits.device)
    counted = reference.counted_tokens(labels, mask, ignore_index)
    if vocab_group is not None:
        if ref_logits is not None or stats:
            raise ValueError(
                "vocab_group does not combine with ref_logits or stats: call the reference model "
                "separately (under torch.no_grad) and compute statistics on gathered logits"
            )
        _check_global_values(labels, mask, ignore_index, logits.shape[-1], vocab_group)
        tok = _VocabParallelTokenLogprobs.apply(
            logits, labels, counted, vocab_start, vocab_group, name
        )
        ref_tok, token_stats = None, ()
    else:
        tok, _, ref_tok, *token_stats = _token_logprobs_op(
            logits, labels, mask, ref_logits, ignore_index, stats, name
        )
    return _sequence_outputs(
        tok,
        counted,
        cu_seqlens,
        ref_tok if ref_logits is not None else None,
        tuple(token_stats) if stats else None,
    )


# --------------------------------------------------------------------------------------------
# The DPO loss: one fused op computes the loss and its gradient; autograd only scales it.


def _dpo_loss_kernel(backend: str):
    if backend == "triton":
        from .ops import triton_dpo_loss

        return triton_dpo_loss.dpo_loss_and_grads
    from .ops import torch_dpo_loss

    return torch_dpo_loss.dpo_loss_and_grads


@torch.library.custom_op("dpo_kernels::dpo_loss", mutates_args=())
def _dpo_loss_op(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    nc: torch.Tensor,
    nr: torch.Tensor,
    type_weights: list[float],
    beta: float,
    label_smoothing: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
    discopop_tau: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair loss [P], dloss/dpc [P], dloss/dpr [P]).

    type_weights[i] is the weight of reference.LOSS_TYPES[i] (0: not used)."""
    spec = _spec_of(type_weights, beta, label_smoothing, f_divergence_type,
                    f_alpha_divergence_coef, discopop_tau)  # fmt: skip
    loss, per, dpc, dpr = _dpo_loss_kernel(backend)(pc, pr, rc, rr, nc, nr, spec)
    return tuple(t.to(pc.dtype).clone() for t in (loss, per, dpc, dpr))


@_dpo_loss_op.register_fake
def _(pc, pr, rc, rr, nc, nr, *_):
    return pc.new_empty(()), pc.new_empty(pc.shape), pc.new_empty(pc.shape), pc.new_empty(pc.shape)


def _spec_of(
    type_weights: list[float],
    beta: float,
    label_smoothing: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
    discopop_tau: float,
    *_,
) -> reference.DPOLossSpec:
    """The DPOLossSpec that `_dpo_loss_op`'s flat arguments describe."""
    used = [(t, w) for t, w in zip(reference.LOSS_TYPES, type_weights, strict=True) if w != 0]
    return reference.DPOLossSpec(
        tuple(t for t, _ in used),
        tuple(w for _, w in used),
        beta,
        label_smoothing,
        f_divergence_type,
        f_alpha_divergence_coef,
        discopop_tau,
    )


def _dpo_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[2], output[3], *inputs[:6])
    ctx.config = inputs[6:]


def _dpo_backward(ctx, grad_loss, *_):
    dpc, dpr, pc, pr, rc, rr, nc, nr = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, Hessian-vector products): the gradient must be
        # differentiable in pc and pr. The closed forms are not, so recompute it (same values)
        # from the autograd formulas of the reference, whose graph supports double backward.
        spec = _spec_of(*ctx.config)
        a = pc if pc.requires_grad else pc.detach().requires_grad_()
        b = pr if pr.requires_grad else pr.detach().requires_grad_()
        mean = reference.dpo_losses(a, b, rc.detach(), rr.detach(), nc, nr, spec).mean()
        ga, gb = torch.autograd.grad(mean, (a, b), grad_loss, create_graph=True, allow_unused=True)
        return (
            torch.zeros_like(pc) if ga is None else ga,
            torch.zeros_like(pr) if gb is None else gb,
            *([None] * 11),
        )
    return (grad_loss * dpc, grad_loss * dpr, *([None] * 11))


torch.library.register_autograd(
    "dpo_kernels::dpo_loss", _dpo_backward, setup_context=_dpo_setup_context
)


def _type_weights(spec: reference.DPOLossSpec) -> list[float]:
    weights = [0.0] * len(reference.LOSS_TYPES)
    for kind, w in zip(spec.loss_types, spec.loss_weights, strict=True):
        weights[reference.LOSS_TYPES.index(kind)] += float(w)
    return weights


def dpo_pair_loss(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    nc: torch.Tensor,
    nr: torch.Tensor,
    spec: reference.DPOLossSpec,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss (carries gradient to pc and pr) and the detached per-pair losses [P].

    Validated inputs only (see `dpo_kernels.losses.dpo_loss`); computes in float32 (float64 for
    float64 inputs). The reference log-probs get no gradient. Backends: "triton" (one kernel
    launch), "cpu" (the closed forms in vectorized torch), "reference" (autograd formulas).
    """
    dtype = reference.acc_dtype(pc.dtype)
    pc, pr, rc, rr, nc, nr = (t.to(dtype) for t in (pc, pr, rc, rr, nc, nr))
    name = resolve_backend(backend, pc.device)
    if name == "reference":  # the spec: plain autograd formulas
        per = reference.dpo_losses(pc, pr, rc.detach(), rr.detach(), nc, nr, spec)
        return per.mean(), per.detach()
    loss, per, _, _ = _dpo_loss_op(
        pc,
        pr,
        rc.detach(),
        rr.detach(),
        nc,
        nr,
        _type_weights(spec),
        float(spec.beta),
        float(spec.label_smoothing),
        spec.f_divergence_type,
        float(spec.f_alpha_divergence_coef),
        float(spec.discopop_tau),
        name,
    )
    return loss, per


# --------------------------------------------------------------------------------------------
# The fused LM head + token log-prob op: custom op + fake + autograd


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
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    stats: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token log-probs, lse, entropy, mean logit, is_top1, log_sum_sq), [B, T] each (the last
    four [0] without stats)."""
    _check_values(labels, mask, ignore_index, weight.shape[0])
    counted = reference.counted_tokens(labels, mask, ignore_index)
    fwd, _ = _kernels(backend, "linear_logprobs")
    transform = reference.LogitTransform(logit_scale, softcap, temperature)
    rows = _CountedRows(counted, sync_free(hidden.device))
    out = fwd(rows.hidden(hidden), weight, bias, rows.targets(labels), transform, stats)
    if not stats:
        out = out[:2]
    return (*(rows.scatter(x) for x in out), *_empty_stats(hidden)[len(out) - 2 :])


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


def _empty_stats(like: torch.Tensor) -> list[torch.Tensor]:
    acc = reference.acc_dtype(like.dtype)
    return [like.new_empty(0, dtype=d) for d in reference.stats_dtypes(acc)]


@_linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, mask, ignore_index, logit_scale, softcap, temperature, stats,
      backend):  # fmt: skip
    acc = reference.acc_dtype(hidden.dtype)
    shape = labels.shape
    tok, lse = hidden.new_empty(shape, dtype=acc), hidden.new_empty(shape, dtype=acc)
    if not stats:
        return tok, lse, *_empty_stats(hidden)
    return tok, lse, *(hidden.new_empty(shape, dtype=d) for d in reference.stats_dtypes(acc))


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
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counted = reference.counted_tokens(labels, mask, ignore_index)
    _, bwd = _kernels(backend, "linear_logprobs")
    rows = _CountedRows(counted, sync_free(hidden.device))
    dh, dw, db = bwd(
        rows.rows(grad_tok.to(lse.dtype)),
        rows.hidden(hidden),
        weight,
        bias,
        rows.targets(labels),
        rows.rows(lse, float("inf")),  # exp(z - inf) = 0: rows not counted add nothing
        reference.LogitTransform(logit_scale, softcap, temperature),
        (hidden_grad, weight_grad, bias_grad),
    )
    if hidden_grad:  # tokens that do not count get exactly zero
        dh = rows.scatter(dh)
    # Outputs must not alias each other: the gradients not asked for are distinct empty tensors.
    return tuple(g if want else hidden.new_empty(0) for g, want in
                 zip((dh, dw, db), (hidden_grad, weight_grad, bias_grad), strict=True))  # fmt: skip


@_linear_token_logprobs_backward_op.register_fake
def _(grad_tok, hidden, weight, bias, labels, mask, lse, ignore_index, logit_scale, softcap,
      temperature, hidden_grad, weight_grad, bias_grad, backend):  # fmt: skip
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden) if hidden_grad else empty,
        torch.empty_like(weight) if weight_grad else empty,
        torch.empty_like(bias) if bias_grad and bias is not None else empty,
    )


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, mask, ignore_index, scale, softcap, temperature, _, backend = (
        inputs
    )
    lse = output[1]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(hidden, weight, bias, labels, mask, lse)
    ctx.args = (ignore_index, scale, softcap, temperature)
    ctx.backend = backend


def _linear_backward(ctx, grad_tok, *_):
    hidden, weight, bias, labels, mask, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]  # a frozen hidden or weight skips its matmul
    grads = _linear_token_logprobs_backward_op(
        grad_tok, hidden, weight, bias, labels, mask, lse, *ctx.args, *needs, ctx.backend
    )
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), *(None,) * 8


torch.library.register_autograd(
    "dpo_kernels::linear_token_logprobs", _linear_backward, setup_context=_linear_setup_context
)
torch.library.register_autograd(
    "dpo_kernels::linear_token_logprobs_backward",
    _no_double_backward,
    setup_context=_no_setup,
)


class _VocabParallelLinearTokens(torch.autograd.Function):
    """Token log-probs of hidden [M, H] through this rank's LM-head rows weight [V_local, H]
    (ids [vocab_start, vocab_start + V_local)) of a head split over `group`. The forward combines
    local log-sum-exps and label logits like the logits path; the backward all-reduces the hidden
    gradient (every rank's slice contributes to it) and keeps weight and bias gradients local."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, vocab_start, group, transform, backend):
        local = targets - vocab_start
        here = (local >= 0) & (local < weight.shape[0])
        arg = torch.where(here, local, -1)  # -1: the label's row is on another rank
        fwd, _ = _kernels(backend, "linear_logprobs")
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
        _, bwd = _kernels(backend, "linear_logprobs")
        dh, dw, db = bwd(grad_tok.to(lse.dtype), hidden, weight, bias, arg, lse, transform, needs)
        _all_reduce(dh, group)
        return dh, dw if needs[1] else None, db if needs[2] else None, *(None,) * 5


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
    backend: str | None = None,
) -> SequenceLogprobs:
    """`sequence_logprobs` of the LM head's logits, computed from hidden states without them.

    hidden: [B, T, H] (or [N, H], taken as one sequence [1, N, H]); bf16, fp16, fp32 or fp64.
    weight: [V, H] LM head (``lm_head.weight``), same dtype as hidden; bias: optional [V].
    labels, mask, ignore_index: as in `sequence_logprobs`, shaped ``hidden.shape[:-1]``.
    The logits are ``z = logit_scale * softcap(hidden @ weight.T + bias) / temperature`` with
    ``softcap(x) = softcap * tanh(x / softcap)`` (the identity when softcap is None).
    stats, cu_seqlens: as in `sequence_logprobs` (packed: hidden [N, H], labels [N]).
    vocab_group, vocab_start: vocabulary-parallel LM head: `weight` (and `bias`) are rows
        [vocab_start, vocab_start + V) of a head split over the torch.distributed group; hidden is
        the same on every rank and its gradient is all-reduced; weight gradients stay local.

    Only the counted tokens are projected, in tiles of tokens x vocabulary that are never all alive
    at once; the forward saves one float32 log-sum-exp per token and the backward recomputes each
    tile. Gradients reach hidden, weight and bias; those of weight and bias accumulate in float32
    and are cast once. Returns a `SequenceLogprobs` without reference fields.
    """
    transform = reference.LogitTransform(logit_scale, softcap, temperature)
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2:  # [N, H]: one sequence, or packed
        hidden, labels, mask = _batch_of_one(hidden, labels, mask)
    _check_linear_inputs(hidden, weight, bias, labels, mask, ignore_index, transform)
    _check_packed(cu_seqlens, hidden, "hidden")
    name = resolve_backend(backend, hidden.device)
    counted = reference.counted_tokens(labels, mask, ignore_index)
    if vocab_group is not None:
        if stats:
            raise ValueError("vocab_group does not combine with stats")
        _check_global_values(labels, mask, ignore_index, weight.shape[0], vocab_group)
        tok_c = _VocabParallelLinearTokens.apply(
            hidden[counted], weight, bias, labels[counted].long(), vocab_start, vocab_group,
            transform, name,
        )  # fmt: skip
        return _sequence_outputs(_scatter_counted(counted, tok_c), counted, cu_seqlens)
    tok, _, *token_stats = _linear_token_logprobs_op(
        hidden,
        weight,
        bias,
        labels,
        mask,
        ignore_index,
        float(logit_scale),
        None if softcap is None else float(softcap),
        float(temperature),
        stats,
        name,
    )
    return _sequence_outputs(tok, counted, cu_seqlens, stats=tuple(token_stats) if stats else None)
