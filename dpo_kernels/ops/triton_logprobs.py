"""Triton kernels for fused per-token log-probs: log-softmax + gather of the label, one pass.

Forward: one program per token row. Rows that do not count (label == ignore_index or mask == 0)
never read their logits. A counted row streams its vocabulary once in BLOCK_V chunks with an online
max / sum-exp, and writes only two floats: the label's log-prob and the row's log-sum-exp. The
reference model's row (same labels, same mask) is handled in the same program when given.

Backward: one program per row writes `g * (onehot(label) - exp(z - lse))` for counted rows and zeros
for the rest. No other [rows, vocab] tensor exists.

Launchers here take validated tensors; autograd and dispatch live in `dpo_kernels.functional`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import acc_dtype

# Largest vocab chunk a program holds at once: 16 KiB of logits (8 KiB for 64-bit types' inputs).
_MAX_BLOCK_BYTES = 16384


def launch_config(vocab: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of `vocab` elements of `element_size` bytes.

    Each thread loads 16 bytes per access (128-bit loads); a block covers up to 16 KiB so a
    thread holds a handful of vectors and the per-block reductions are amortized.
    """
    block = min(triton.next_power_of_2(vocab), _MAX_BLOCK_BYTES // element_size)
    per_thread = 16 // element_size  # elements in one 128-bit load
    num_warps = max(1, min(8, block // (32 * per_thread * 2)))
    return block, num_warps


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """reference.acc_dtype as a Triton dtype."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def fold_block(m, s, pz, zsum, sq, arg, z, index, valid, STATS: tl.constexpr):
    """Folds a block z of one row's logits (ACC; -inf where not `valid`; `index`: their positions
    in the row) into the row's running statistics and returns them updated:
    m max, s sum of exp(z - m), and with STATS pz sum of exp(z - m) * z, zsum sum of z, sq sum of
    exp(2 (z - m)) (for log sum_v p_v^2 = log sq - 2 log s; one multiply, no extra exp), arg the
    first argmax."""
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
        blk_arg = tl.min(tl.where(z == blk_max, index.to(tl.int64), 2**62), 0)
        # strictly: earlier blocks win ties; a row that is all -inf so far has its first -inf
        arg = tl.where((blk_max > m) | (arg < 0), blk_arg, arg)
    return m_new, s, pz, zsum, sq, arg


@triton.jit
def _row_lse_and_target(
    row_ptr, V, label, ACC: tl.constexpr, BLOCK_V: tl.constexpr, STATS: tl.constexpr
):
    """Log-sum-exp of one row of V logits and the logit at `label`, both in ACC precision; with
    STATS also the entropy, the mean logit, whether `label` is the first argmax and
    log sum_v p_v^2."""
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    pz = tl.zeros([], ACC)
    zsum = tl.zeros([], ACC)
    sq = tl.zeros([], ACC)
    arg = tl.full([], -1, tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(ACC)
        m, s, pz, zsum, sq, arg = fold_block(m, s, pz, zsum, sq, arg, z, offs, offs < V, STATS)
    target = tl.load(row_ptr + label).to(ACC)
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
    logits_ptr,
    labels_ptr,
    mask_ptr,
    ref_ptr,
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
    s_zb,
    s_zt,
    s_yb,
    s_yt,
    s_mb,
    s_mt,
    s_rb,
    s_rt,
    HAS_MASK: tl.constexpr,
    HAS_REF: tl.constexpr,
    STATS: tl.constexpr,
    ACC: tl.constexpr,
    REF_ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
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
            logits_ptr + b * s_zb + t * s_zt, V, label, ACC, BLOCK_V, STATS
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
                ref_ptr + b * s_rb + t * s_rt, V, label, REF_ACC, BLOCK_V, False
            )
            ref_tok = ref_target - ref_lse
        tl.store(ref_tok_ptr + row, ref_tok)


@triton.jit
def _logprobs_bwd_kernel(
    grad_ptr,  # [B, T] upstream gradient of the token log-probs (any strides)
    logits_ptr,
    labels_ptr,
    mask_ptr,
    lse_ptr,  # [B*T] saved by the forward
    dlogits_ptr,  # [B*T, V] out, contiguous
    T,
    V,
    ignore_index,
    s_gb,
    s_gt,
    s_zb,
    s_zt,
    s_yb,
    s_yt,
    s_mb,
    s_mt,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    b, t, label, counted = _row_token(
        row, T, labels_ptr, mask_ptr, ignore_index, s_yb, s_yt, s_mb, s_mt, HAS_MASK
    )
    out_ptr = dlogits_ptr + row.to(tl.int64) * V
    if counted:
        g = tl.load(grad_ptr + b * s_gb + t * s_gt).to(ACC)
        lse = tl.load(lse_ptr + row).to(ACC)
        z_ptr = logits_ptr + b * s_zb + t * s_zt
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(z_ptr + offs, mask=offs < V, other=0.0).to(ACC)
            onehot = tl.where(offs == label, 1.0, 0.0).to(ACC)
            dz = g * (onehot - tl.exp(z - lse))
            tl.store(out_ptr + offs, dz.to(dlogits_ptr.dtype.element_ty), mask=offs < V)
    else:
        zeros = tl.zeros([BLOCK_V], dlogits_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(out_ptr + offs, zeros, mask=offs < V)


def _vocab_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels index the vocabulary with unit stride (vector loads); other strides are kept.
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_args(mask: torch.Tensor | None, labels: torch.Tensor):
    if mask is None:
        return labels, 0, 0  # dummy pointer, never read
    return mask, mask.stride(0), mask.stride(1)


def logprobs_forward(
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T]
    mask: torch.Tensor | None,  # [B, T]
    ref_logits: torch.Tensor | None,  # [B, T, V]
    ignore_index: int,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Token log-probs, log-sum-exp, reference token log-probs and, with `stats`, entropy, mean
    logit, label-is-argmax and log sum_v p_v^2: the contract of ops/reference.py::token_logprobs."""
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
    if ref_logits is not None:
        ref_logits = _vocab_contiguous(ref_logits)
        ref_acc = acc_dtype(ref_logits.dtype)
        ref_tok = torch.empty((B, T), dtype=ref_acc, device=logits.device)
        ref_args = (ref_logits, ref_logits.stride(0), ref_logits.stride(1))
    else:
        ref_acc = acc
        ref_tok = torch.empty(0, dtype=acc, device=logits.device)
        ref_args = (logits, 0, 0)
    mask_t, s_mb, s_mt = _mask_args(mask, labels)
    if B * T == 0:
        return tok, lse, ref_tok, *outs
    element_size = max(logits.element_size(), ref_args[0].element_size())
    block, warps = launch_config(V, element_size)
    _logprobs_fwd_kernel[(B * T,)](
        logits,
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
        logits.stride(0),
        logits.stride(1),
        labels.stride(0),
        labels.stride(1),
        s_mb,
        s_mt,
        ref_args[1],
        ref_args[2],
        HAS_MASK=mask is not None,
        HAS_REF=ref_logits is not None,
        STATS=stats,
        ACC=tl_acc_dtype(logits.dtype),
        REF_ACC=tl_acc_dtype(ref_acc),
        BLOCK_V=block,
        num_warps=warps,
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
    """Gradient of the token log-probs with respect to the logits: [B, T, V], logits' dtype."""
    B, T, V = logits.shape
    logits = _vocab_contiguous(logits)
    dlogits = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    if B * T == 0:
        return dlogits
    mask_t, s_mb, s_mt = _mask_args(mask, labels)
    block, warps = launch_config(V, logits.element_size())
    _logprobs_bwd_kernel[(B * T,)](
        grad_tok,
        logits,
        labels,
        mask_t,
        lse,
        dlogits,
        T,
        V,
        ignore_index,
        grad_tok.stride(0),
        grad_tok.stride(1),
        logits.stride(0),
        logits.stride(1),
        labels.stride(0),
        labels.stride(1),
        s_mb,
        s_mt,
        HAS_MASK=mask is not None,
        ACC=tl_acc_dtype(logits.dtype),
        BLOCK_V=block,
        num_warps=warps,
    )
    return dlogits
