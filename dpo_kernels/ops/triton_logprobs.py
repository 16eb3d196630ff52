"""Triton kernels for fused per-token log-probs: log-softmax + gather of the label, one pass.

Forward: one program per token row. Rows that do not count (label == ignore_index or mask == 0)
never read their logits. A counted row streams its vocabulary once in BLOCK_V chunks with an online
max / sum-exp, and writes only two floats: the label's log-prob and the row's log-sum-exp. The
reference model's row (same labels, same mask) is handled in the same program when given.

Backward: one program per row writes `g * (onehot(label) - exp(z - lse))` for counted rows and zeros
for the rest. No other [rows, vocab] tensor exists.

128-bit accesses for any vocabulary size: a row of V elements starts wherever its strides put it
(V = 32001 puts odd rows at odd addresses), so each row is split into a head of fewer than VEC
elements up to the first 16-byte boundary, a main loop over whole 16-byte vectors (`LDG.E.128`,
and `STG.E.128` for the gradient), and the few elements after the last whole vector; head and end
go in one small masked access. Pointers are passed as a 16-byte-aligned base plus element offsets
so that the alignment is visible to the compiler (`triton_common.aligned_base`).

Every launch runs under a device guard for its tensors' device (`device_guard`): Triton launches on
the current device and its current stream, which are then the tensors' device and the stream that
PyTorch (cuBLAS included) uses there.

Launchers here take validated tensors; autograd lives in the public op modules (logprobs.py,
linear_logprobs.py), dispatch in backend.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import acc_dtype
from .triton_common import (
    NO_FMA,
    aligned_base,
    device_guard,
    fold_block,
    launch_config,
    tl_acc_dtype,
    vec_elems,
)


@triton.jit
def row_fold(
    base_ptr, row_off, V, m, s, pz, zsum, sq, arg, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    VEC: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    """Folds the V logits at base_ptr + row_off (base 16-byte aligned, int64 element offset) into
    the running statistics (see fold_block): whole 16-byte vectors in the loop, then the head and
    end elements in one masked access."""
    a0 = (row_off + VEC - 1) // VEC * VEC  # first 16-byte boundary of the row
    head = a0 - row_off
    n_vec = tl.maximum(V - head, 0) // VEC * VEC
    ptr = base_ptr + a0
    lanes = tl.arange(0, BLOCK_V)
    # Prefetch: block i + 1's loads are issued before block i is folded, so a row's loop keeps
    # one block of loads in flight while it computes (what hides latency when a few long rows,
    # not many programs per SM, are all there is). The last prefetch is fully masked: no traffic.
    nxt = tl.load(ptr + lanes, mask=lanes < n_vec, other=float("-inf"))
    for start in range(0, n_vec, BLOCK_V):
        offs = start + lanes
        valid = offs < n_vec
        z = nxt.to(ACC)
        ahead = offs + BLOCK_V
        nxt = tl.load(ptr + ahead, mask=ahead < n_vec, other=float("-inf"))
        index = lanes + (head + start).to(tl.int32)  # int32: fewer registers than int64
        m, s, pz, zsum, sq, arg = fold_block(m, s, pz, zsum, sq, arg, z, index, valid, STATS)
    edge = tl.arange(0, 2 * VEC)
    pos = tl.where(edge < VEC, edge, head + n_vec + edge - VEC)
    valid = tl.where(edge < VEC, edge < head, True) & (pos < V)
    z = tl.load(base_ptr + row_off + pos, mask=valid, other=float("-inf")).to(ACC)
    return fold_block(m, s, pz, zsum, sq, arg, z, pos.to(tl.int32), valid, STATS)


@triton.jit
def _row_lse_and_target(
    base_ptr, row_off, V, label, ACC: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
    STATS: tl.constexpr,
):  # fmt: skip
    """Log-sum-exp of one row of V logits and the logit at `label`, both in ACC precision; with
    STATS also the entropy, the mean logit, whether `label` is the first argmax and
    log sum_v p_v^2."""
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    pz = tl.zeros([], ACC)
    zsum = tl.zeros([], ACC)
    sq = tl.zeros([], ACC)
    arg = tl.full([], 2**31 - 1, tl.int32)
    m, s, pz, zsum, sq, arg = row_fold(
        base_ptr, row_off, V, m, s, pz, zsum, sq, arg, ACC, BLOCK_V, VEC, STATS
    )
    target = tl.load(base_ptr + row_off + label).to(ACC)
    log_s = tl.log(s)
    lse = m + log_s
    top1 = (arg == label) & (lse == lse)  # a row with a NaN has no argmax
    return lse, target, lse - pz / s, zsum / V, top1, tl.log(sq) - 2 * log_s


@triton.jit
def _row_token(
    row, T, labels_ptr, mask_ptr, ignore_index, s_yb, s_yt, s_mb, s_mt, HAS_MASK: tl.constexpr
):
    """(b, t, label, counted) of token row `row` = b * T + t; int64 indices for large offsets."""
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    label = tl.load(labels_ptr + b * s_yb + t * s_yt).to(tl.int64)
    counted = label != ignore_index
    if HAS_MASK:
        counted = counted & (tl.load(mask_ptr + b * s_mb + t * s_mt) != 0)
    return b, t, label, counted


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # 16-byte-aligned base; row (b, t) starts at z0 + b * s_zb + t * s_zt
    labels_ptr,
    mask_ptr,
    ref_ptr,  # the same for the reference logits, with r0, s_rb, s_rt
    tok_ptr,  # [B*T] out, label log-prob (0 where not counted)
    lse_ptr,  # [B*T] out, log-sum-exp (0 where not counted)
    ref_tok_ptr,  # [B*T] out, reference label log-prob
    ent_ptr,  # [B*T] out with STATS: entropy, mean logit, label is argmax, log sum_v p_v^2
    mean_ptr,
    top1_ptr,
    sq_ptr,
    T,
    V,
    ignore_index,
    z0,
    s_zb,
    s_zt,
    s_yb,
    s_yt,
    s_mb,
    s_mt,
    r0,
    s_rb,
    s_rt,
    HAS_MASK: tl.constexpr,
    HAS_REF: tl.constexpr,
    STATS: tl.constexpr,
    ACC: tl.constexpr,
    REF_ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    REF_BLOCK_V: tl.constexpr,
    REF_VEC: tl.constexpr,
):
    row = tl.program_id(0)
    b, t, label, counted = _row_token(
        row, T, labels_ptr, mask_ptr, ignore_index, s_yb, s_yt, s_mb, s_mt, HAS_MASK
    )
    tok = tl.zeros([], ACC)
    lse = tl.zeros([], ACC)
    ent = tl.zeros([], ACC)
    mean = tl.zeros([], ACC)
    log_sum_sq = tl.zeros([], ACC)
    top1 = label != label
    if counted:
        lse, target, ent, mean, top1, log_sum_sq = _row_lse_and_target(
            logits_ptr, z0 + b * s_zb + t * s_zt, V, label, ACC, BLOCK_V, VEC, STATS
        )
        tok = target - lse
    tl.store(tok_ptr + row, tok)
    tl.store(lse_ptr + row, lse)
    if STATS:
        tl.store(ent_ptr + row, ent)
        tl.store(mean_ptr + row, mean)
        tl.store(top1_ptr + row, top1)
        tl.store(sq_ptr + row, log_sum_sq)
    if HAS_REF:
        ref_tok = tl.zeros([], REF_ACC)
        if counted:
            ref_lse, ref_target, _, _, _, _ = _row_lse_and_target(
                ref_ptr, r0 + b * s_rb + t * s_rt, V, label, REF_ACC, REF_BLOCK_V, REF_VEC, False
            )
            ref_tok = ref_target - ref_lse
        tl.store(ref_tok_ptr + row, ref_tok)


@triton.jit
def _logprobs_bwd_kernel(
    grad_ptr,  # [B, T] upstream gradient of the token log-probs (any strides)
    logits_ptr,  # 16-byte-aligned base; row (b, t) starts at z0 + b * s_zb + t * s_zt
    labels_ptr,
    mask_ptr,
    lse_ptr,  # [B*T] saved by the forward
    dlogits_ptr,  # out, 16-byte-aligned base; SAME: rows where the logits' are, else b*s_ob+t*s_ot
    T,
    V,
    ignore_index,
    z0,
    s_gb,
    s_gt,
    s_zb,
    s_zt,
    s_ob,
    s_ot,
    s_yb,
    s_yt,
    s_mb,
    s_mt,
    HAS_MASK: tl.constexpr,
    SAME: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    row = tl.program_id(0)
    b, t, label, counted = _row_token(
        row, T, labels_ptr, mask_ptr, ignore_index, s_yb, s_yt, s_mb, s_mt, HAS_MASK
    )
    row_z = z0 + b * s_zb + t * s_zt
    if SAME:  # the gradient has the logits' layout: one alignment for both
        row_o = row_z
    else:
        row_o = b * s_ob + t * s_ot
    a0 = (row_o + VEC - 1) // VEC * VEC  # the stores' first 16-byte boundary
    head = a0 - row_o
    n_vec = tl.maximum(V - head, 0) // VEC * VEC
    out_ptr = dlogits_ptr + a0
    if SAME:
        z_ptr = logits_ptr + a0
    else:
        z_ptr = logits_ptr + (row_z + head)
    lanes = tl.arange(0, 2 * VEC)  # head and end elements: fewer than VEC each
    pos = tl.where(lanes < VEC, lanes, head + n_vec + lanes - VEC)
    edge = tl.where(lanes < VEC, lanes < head, True) & (pos < V)
    if counted:
        g = tl.load(grad_ptr + b * s_gb + t * s_gt).to(ACC)
        lse = tl.load(lse_ptr + row).to(ACC)
        for start in range(0, n_vec, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < n_vec
            z = tl.load(z_ptr + offs, mask=valid, other=0.0).to(ACC)
            at = (label - head - start).to(tl.int32)  # the label's lane, compared in int32
            onehot = tl.where(tl.arange(0, BLOCK_V) == at, 1.0, 0.0).to(ACC)
            dz = g * (onehot - tl.exp(z - lse))
            tl.store(out_ptr + offs, dz.to(dlogits_ptr.dtype.element_ty), mask=valid)
        z = tl.load(logits_ptr + row_z + pos, mask=edge, other=0.0).to(ACC)
        dz = g * (tl.where(pos == label, 1.0, 0.0).to(ACC) - tl.exp(z - lse))
        tl.store(dlogits_ptr + row_o + pos, dz.to(dlogits_ptr.dtype.element_ty), mask=edge)
    else:
        zeros = tl.zeros([BLOCK_V], dlogits_ptr.dtype.element_ty)
        for start in range(0, n_vec, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(out_ptr + offs, zeros, mask=offs < n_vec)
        tl.store(dlogits_ptr + row_o + pos, tl.zeros([2 * VEC], zeros.dtype), mask=edge)


def _vocab_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels index the vocabulary with unit stride (vector loads); other strides are kept.
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_args(mask: torch.Tensor | None, labels: torch.Tensor):
    if mask is None:
        return labels, 0, 0  # dummy pointer, never read
    return mask, mask.stride(0), mask.stride(1)


def grad_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The strides the logits' gradient gets from logprobs_backward: the logits' own when their
    rows do not overlap and leave little unused between them (`logits[:, :-1]` of a [B, T + 1, V]
    tensor: B - 1 unused rows), so that a row of both starts at the same 16-byte phase and loads
    and stores are both 128-bit; None (contiguous) otherwise."""
    B, T, V = shape
    s_b, s_t, s_v = strides
    if s_v != 1 or B * T == 0:
        return None
    if (T > 1 and s_t < V) or (B > 1 and s_b < (T - 1) * s_t + V):
        return None  # rows overlap (or are out of order)
    span = (B - 1) * s_b * (B > 1) + (T - 1) * s_t * (T > 1) + V
    numel = B * T * V
    if span > numel + numel // 8:
        return None
    return (s_b if B > 1 else T * V, s_t if T > 1 else V, 1)


def logprobs_forward(
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T]
    mask: torch.Tensor | None,  # [B, T]
    ref_logits: torch.Tensor | None,  # [B, T, V]
    ignore_index: int,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Token log-probs, log-sum-exp, reference token log-probs and, with `stats`, entropy, mean
    logit, label-is-argmax and log sum_v p_v^2: the contract of reference.logprobs_forward."""
    B, T, V = logits.shape
    logits = _vocab_contiguous(logits)
    acc = acc_dtype(logits.dtype)
    tok = torch.empty((B, T), dtype=acc, device=logits.device)
    lse = torch.empty((B, T), dtype=acc, device=logits.device)
    n_stats = B * T if stats else 0
    ent = torch.empty(n_stats, dtype=acc, device=logits.device)
    mean = torch.empty(n_stats, dtype=acc, device=logits.device)
    top1 = torch.empty(n_stats, dtype=torch.bool, device=logits.device)
    sq = torch.empty(n_stats, dtype=acc, device=logits.device)
    outs = (ent, mean, top1, sq)
    if stats:
        outs = tuple(x.view(B, T) for x in outs)
    base, z0 = aligned_base(logits)
    # The statistics' budget with or without them: one block size, one order of summation, so the
    # log-probs are the same bits whether stats are asked for or not.
    block, warps = launch_config(V, logits.element_size(), stats=True)
    if ref_logits is not None:
        ref_logits = _vocab_contiguous(ref_logits)
        ref_acc = acc_dtype(ref_logits.dtype)
        ref_tok = torch.empty((B, T), dtype=ref_acc, device=logits.device)
        ref_base, r0 = aligned_base(ref_logits)
        ref_args = (ref_base, r0, ref_logits.stride(0), ref_logits.stride(1))
        ref_block = launch_config(V, ref_logits.element_size())[0]
        ref_vec = vec_elems(ref_logits.element_size())
    else:
        ref_acc = acc
        ref_tok = torch.empty(0, dtype=acc, device=logits.device)
        ref_args = (base, 0, 0, 0)
        ref_block, ref_vec = block, vec_elems(logits.element_size())
    mask_t, s_mb, s_mt = _mask_args(mask, labels)
    if B * T == 0:
        return tok, lse, ref_tok, *outs
    with device_guard(logits):
        _logprobs_fwd_kernel[(B * T,)](
            base,
            labels,
            mask_t,
            ref_args[0],
            tok,
            lse,
            ref_tok if ref_logits is not None else tok,
            ent if stats else tok,
            mean if stats else tok,
            top1 if stats else labels,
            sq if stats else tok,
            T,
            V,
            ignore_index,
            z0,
            logits.stride(0),
            logits.stride(1),
            labels.stride(0),
            labels.stride(1),
            s_mb,
            s_mt,
            *ref_args[1:],
            HAS_MASK=mask is not None,
            HAS_REF=ref_logits is not None,
            STATS=stats,
            ACC=tl_acc_dtype(logits.dtype),
            REF_ACC=tl_acc_dtype(ref_acc),
            BLOCK_V=block,
            VEC=vec_elems(logits.element_size()),
            REF_BLOCK_V=ref_block,
            REF_VEC=ref_vec,
            num_warps=warps,
            **NO_FMA,
        )
    return tok, lse, ref_tok, *outs


def logprobs_backward(
    grad_tok: torch.Tensor,  # [B, T]
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,  # [B, T] contiguous, from logprobs_forward
    ignore_index: int,
) -> torch.Tensor:
    """Gradient of the token log-probs with respect to the logits: [B, T, V], logits' dtype, with
    the strides of `grad_strides` (the logits' own where that keeps 128-bit stores)."""
    B, T, V = logits.shape
    logits = _vocab_contiguous(logits)
    base, z0 = aligned_base(logits)
    strides = grad_strides((B, T, V), logits.stride())
    same = strides is not None
    lead = z0 if same else 0
    strides = strides or (T * V, V, 1)
    span = (B - 1) * strides[0] + (T - 1) * strides[1] + V if B * T else 0
    out = torch.empty(lead + span, dtype=logits.dtype, device=logits.device)
    dlogits = out.as_strided((B, T, V), strides, lead)
    if B * T == 0:
        return dlogits
    mask_t, s_mb, s_mt = _mask_args(mask, labels)
    block, warps = launch_config(V, logits.element_size())
    with device_guard(logits):
        _logprobs_bwd_kernel[(B * T,)](
            grad_tok,
            base,
            labels,
            mask_t,
            lse,
            out,
            T,
            V,
            ignore_index,
            z0,
            grad_tok.stride(0),
            grad_tok.stride(1),
            logits.stride(0),
            logits.stride(1),
            strides[0],
            strides[1],
            labels.stride(0),
            labels.stride(1),
            s_mb,
            s_mt,
            HAS_MASK=mask is not None,
            SAME=same,
            ACC=tl_acc_dtype(logits.dtype),
            BLOCK_V=block,
            VEC=vec_elems(logits.element_size()),
            num_warps=warps,
            **NO_FMA,
        )
    return dlogits
