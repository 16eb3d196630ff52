"""Shared pieces of the Triton kernels: launch configuration, device guard and constants, 16-byte
alignment, and the online log-sum-exp fold of one block of a row (`fold_block`) that the logits
path (triton_logprobs.py) and the fused LM head (triton_linear_logprobs.py) both use.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..common import acc_dtype

# Largest vocab chunk a program holds at once: 16 KiB of logits (8 KiB for 64-bit types' inputs).
_MAX_BLOCK_BYTES = 16384
# Bytes of one row a thread loads per block iteration, at most: enough 128-bit loads in flight to
# hide latency, few enough registers to stay far from a spill (the next block is prefetched, so
# two blocks are alive). With statistics a thread also keeps exp(z - m), exp(2 (z - m)) and int32
# positions alive next to z: a quarter as many (at 32 bytes the forward with statistics and
# reference logits spilled 8 bytes on sm_80 once log sum p^2 joined the statistics).
_BYTES_PER_THREAD = 64
_BYTES_PER_THREAD_STATS = 16


# The row kernels are compiled without FMA contraction: z = x * factor (softcap included) is then
# rounded to float32 once, the same way in the fold and in the gradient kernel. Contracted, each
# rounds `x * factor - lse` its own way, and at |z| ~ 1e6 (ulp 0.06) the softmax was off by
# percents (seen on an H200). The kernels are memory-bound: the extra instruction is free.
NO_FMA = {"enable_fp_fusion": False}


def vec_elems(element_size: int) -> int:
    """Elements in one 16-byte (128-bit) access."""
    return max(1, 16 // element_size)


def launch_config(vocab: int, element_size: int, stats: bool = False) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of `vocab` elements of `element_size` bytes.

    Each thread loads 16 bytes per access (128-bit loads); a block covers up to 16 KiB so a
    thread holds a handful of vectors and the per-block reductions are amortized. With `stats`
    (five running reductions, positions for the argmax) a thread holds half as many bytes.
    """
    block = min(triton.next_power_of_2(vocab), _MAX_BLOCK_BYTES // element_size)
    per_thread = vec_elems(element_size)  # elements in one 128-bit load
    num_warps = max(1, min(8, block // (32 * per_thread * 2)))
    limit = (_BYTES_PER_THREAD_STATS if stats else _BYTES_PER_THREAD) // element_size
    while block > 32 * num_warps * max(limit, per_thread):
        block //= 2
    # At least one 16-byte vector per thread, or the compiler splits the block into narrower loads.
    return max(block, 32 * num_warps * per_thread), num_warps


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """common.acc_dtype as a Triton dtype."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes `t`'s CUDA device current for a launch (a no-op for CPU tensors): Triton launches on
    the current device's current stream, and so does PyTorch for ops on `t`."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def device_constants(values: tuple[float, ...], dtype: torch.dtype, device: torch.device):
    """`torch.tensor(values)` on `device` without a host-to-device copy (which would wait for the
    device, and cannot be captured in a CUDA graph): each value is a fill kernel's argument. Kept
    per (values, dtype, device), except while a CUDA graph is being captured."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.empty(len(values), dtype=dtype, device=device)
        for i, v in enumerate(values):
            t[i].fill_(v)
        if not torch.cuda.is_current_stream_capturing():
            if len(_CONSTANTS) > 256:
                _CONSTANTS.clear()
            _CONSTANTS[key] = t
    return t


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def aligned_base(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(a view of x's storage starting at the 16-byte boundary at or before x's first element,
    x's first element's offset from it). Kernels index from that base, so a row's alignment is
    the alignment of its element offset, which the kernels compute."""
    lead = (x.data_ptr() // x.element_size()) % vec_elems(x.element_size())
    lead = min(lead, x.storage_offset())
    if lead == 0:
        return x, 0
    return x.as_strided((1,), (1,), x.storage_offset() - lead), lead


@triton.jit
def fold_block(m, s, pz, zsum, sq, arg, z, index, valid, STATS: tl.constexpr):
    """Folds a block z of one row's logits (ACC; -inf where not `valid`; `index`: their int32
    positions in the row) into the row's running statistics and returns them updated:
    m max, s sum of exp(z - m), and with STATS pz sum of exp(z - m) * z, zsum sum of z, sq sum of
    exp(2 (z - m)) (for log sum_v p_v^2 = log sq - 2 log s; one multiply, no extra exp), arg the
    first argmax (the smallest position holding the max, whatever order the blocks come in; it
    starts at 2**31 - 1, so a row that is all -inf gets its first position)."""
    blk_max = tl.max(z, 0)
    m_new = tl.maximum(m, blk_max)
    # An infinite max shifts by 0: a row that is -inf so far has nothing to rescale
    # (exp(-inf) = 0), and a +inf logit makes the sum +inf (so lse = +inf) instead of NaN.
    shift = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new).to(m.dtype)
    scale = tl.exp(m - shift)
    e = tl.exp(z - shift)
    s = s * scale + tl.sum(e, 0)
    if STATS:
        pz = pz * scale + tl.sum(tl.where(e == 0.0, 0.0, e * z), 0)
        sq = sq * (scale * scale) + tl.sum(e * e, 0)
        zsum += tl.sum(tl.where(valid, z, 0.0), 0)
        blk_arg = tl.min(tl.where(z == blk_max, index, 2**31 - 1), 0)
        tie = tl.where(blk_max == m, tl.minimum(arg, blk_arg), arg)
        arg = tl.where(blk_max > m, blk_arg, tie)
    return m_new, s, pz, zsum, sq, arg


# Math shared by the loss kernels.
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def log1p(y):
    """log(1 + y) without cancellation for small y (Goldberg's correction)."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def expm1(t, u):
    """exp(t) - 1 without cancellation for small t (Kahan's correction), given u = exp(t)."""
    m = tl.where(u == 1.0, t, (u - 1.0) * (t / tl.log(u)))
    return tl.where(u == 0.0, -1.0, tl.where(u == float("inf"), u, m))


@triton.jit
def softplus(x):
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))
