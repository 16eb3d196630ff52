"""Fused LM head + token log-probs on CUDA: cuBLAS tiles and Triton kernels; the logits never exist.

The counted tokens' hidden rows [M, H] go in tiles of TOKEN_TILE rows, and each tile is projected
one VOCAB_BLOCK of the LM head at a time by torch.mm (cuBLAS) into one preallocated
[TOKEN_TILE, VOCAB_BLOCK] buffer in float32 (float64 for float64 inputs): bf16/fp16 products are
accumulated and kept in float32 up to the log-softmax. Forward: `_linear_fwd_kernel` applies the
logit transform and folds the buffer into per-token running max / sum-exp (float32; float64 for
float64 inputs), picking the label's logit in the block that holds it. Backward: each tile is
recomputed and `_linear_bwd_kernel` overwrites it with the gradient with respect to the
pre-transform logits; cuBLAS then accumulates dh (per token tile) and dW, db (across token tiles) in
float32, cast once at the end. Why cuBLAS tiles rather than a fused matmul kernel: BENCHMARKS.md.

The buffer's rows are padded to a multiple of 16 elements, so every row starts on a 16-byte
boundary whatever the vocabulary size; the kernels read (and the backward writes) whole 16-byte
vectors up to the padded width, and the forward drops the padding columns with a select.
Everything (cuBLAS and Triton) runs under one device guard for the inputs' device, on that
device's current stream.

Launchers here take validated tensors; autograd lives in the public op modules (logprobs.py,
linear_logprobs.py), dispatch in backend.py.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ..common import LogitTransform, acc_dtype, stats_dtypes
from .triton_common import (
    NO_FMA,
    device_constants,
    device_guard,
    fold_block,
    launch_config,
    tl_acc_dtype,
    vec_elems,
)

# One projection tile: 2048 tokens x 4096 vocabulary entries, 32 MiB of float32 for any input;
# large enough for cuBLAS to run near peak, small next to the [tokens, vocab] logits it replaces.
TOKEN_TILE = 2048
VOCAB_BLOCK = 4096
ROW_ALIGN = 16  # tile rows start every ROW_ALIGN elements: 16-byte aligned for every dtype


@triton.jit
def _tanh(y):
    """tanh from exp (libdevice's tanh has no interpreter version), to a few ulps relative.

    (1 - e) / (1 + e) with e = exp(-2|y|) has an absolute error of ~1 ulp of 1, so a relative
    error of ~ulp / (2|y|) at small |y|: a softcap c much larger than the logits (y = x / c) made
    the logits c * tanh(x / c) off by ~c ulps (1e-3 at c = 1e4, float32). Below 0.4 (float64:
    0.1) the odd Taylor series to y^13 is used instead (its next term is below 4e-9 (2e-17)
    relative there)."""
    a = tl.abs(y)
    e = tl.exp(-2 * a)
    t = (1 - e) / (1 + e)
    t = tl.where(y < 0, -t, t)
    y2 = y * y
    p = -1382.0 / 155925.0 + y2 * (21844.0 / 6081075.0)
    p = 62.0 / 2835.0 + y2 * p
    p = -17.0 / 315.0 + y2 * p
    p = 2.0 / 15.0 + y2 * p
    p = -1.0 / 3.0 + y2 * p
    p = y + y * (y2 * p)
    if y.dtype == tl.float64:
        small = a < 0.1
    else:
        small = a < 0.4
    return tl.where(small, p, t)


@triton.jit
def _transform(x, params_ptr, HAS_SOFTCAP: tl.constexpr):
    """(z, dz/dx) for z = (c * tanh(x / c)) * a, or z = x * a; params = (a, c) with
    a = logit_scale / temperature and c = softcap (the order of operations of ops/reference.py)."""
    a = tl.load(params_ptr)
    if HAS_SOFTCAP:
        c = tl.load(params_ptr + 1)
        t = _tanh(x / c)
        z = c * t * a
        slope = a * (1 - t * t)
    else:
        z = x * a
        slope = tl.zeros_like(x) + a
    return z, slope


@triton.jit
def _linear_fwd_kernel(
    tile_ptr,  # [n, n_cols] projection tile (row stride s_tile), float32 (float64)
    targets_ptr,  # [n] labels of the tile's rows
    max_ptr,  # [n] running max of the transformed logits, ACC, updated in place
    sum_ptr,  # [n] running sum of exp(z - max), ACC, updated in place
    pz_ptr,  # [n] with STATS: running sum of exp(z - max) * z, sum of z, sum of
    zsum_ptr,  # exp(2 (z - max)), first argmax
    sq_ptr,
    arg_ptr,
    target_ptr,  # [n] out, the label's transformed logit, written by the block holding it
    params_ptr,  # [2] (logit_scale / temperature, softcap), ACC
    n_cols,
    n_pad,  # n_cols rounded up to VEC: the row's allocated width, read in whole vectors
    s_tile,
    vocab_start,
    HAS_SOFTCAP: tl.constexpr,
    STATS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = tile_ptr + row.to(tl.int64) * s_tile
    m = tl.load(max_ptr + row)
    s = tl.load(sum_ptr + row)
    pz = tl.zeros([], ACC)
    zsum = tl.zeros([], ACC)
    sq = tl.zeros([], ACC)
    arg = tl.full([], 2**31 - 1, tl.int32)
    if STATS:
        pz = tl.load(pz_ptr + row)
        zsum = tl.load(zsum_ptr + row)
        sq = tl.load(sq_ptr + row)
        arg = tl.load(arg_ptr + row).to(tl.int32)
    n_vec = n_pad // VEC * VEC  # n_pad is a multiple of VEC: say so to the compiler
    for start in range(0, n_vec, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < n_vec, other=0.0).to(ACC)
        valid = offs < n_cols  # the padding columns hold whatever the buffer held
        z, _ = _transform(x, params_ptr, HAS_SOFTCAP)
        z = tl.where(valid, z, float("-inf"))
        index = (vocab_start + offs).to(tl.int32)
        m, s, pz, zsum, sq, arg = fold_block(m, s, pz, zsum, sq, arg, z, index, valid, STATS)
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    if STATS:
        tl.store(pz_ptr + row, pz)
        tl.store(zsum_ptr + row, zsum)
        tl.store(sq_ptr + row, sq)
        tl.store(arg_ptr + row, arg)
    local = tl.load(targets_ptr + row) - vocab_start
    if (local >= 0) & (local < n_cols):
        z, _ = _transform(tl.load(row_ptr + local).to(ACC), params_ptr, HAS_SOFTCAP)
        tl.store(target_ptr + row, z)


@triton.jit
def _linear_bwd_kernel(
    tile_ptr,  # [n, n_cols] recomputed projection tile (row stride s_tile), float32 (float64)
    out_ptr,  # [n, n_cols] dx (row stride s_out): the tile itself (in place), or a buffer in
    # the inputs' dtype (bf16/fp16: the tile is only read, dx rounded once on the way out)
    targets_ptr,  # [n] labels of the tile's rows
    grad_ptr,  # [n] upstream gradient of the label log-probs, ACC
    lse_ptr,  # [n] log-sum-exp saved by the forward, ACC
    params_ptr,  # [2] (logit_scale / temperature, softcap), ACC
    n_pad,  # the tile's width rounded up to VEC: padding columns are computed and never read
    s_tile,
    s_out,
    vocab_start,
    HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,  # elements in 16 bytes of the narrower of the tile and out
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < n_pad // VEC * VEC
    ptrs = tile_ptr + row.to(tl.int64) * s_tile + offs
    z, slope = _transform(tl.load(ptrs, mask=valid, other=0.0).to(ACC), params_ptr, HAS_SOFTCAP)
    g = tl.load(grad_ptr + row)
    lse = tl.load(lse_ptr + row)
    onehot = tl.where(offs == tl.load(targets_ptr + row) - vocab_start, 1.0, 0.0).to(ACC)
    dx = g * (onehot - tl.exp(z - lse)) * slope
    out = out_ptr + row.to(tl.int64) * s_out + offs
    tl.store(out, dx.to(out_ptr.dtype.element_ty), mask=valid)


def project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = h @ w.T + b with `out` in the accumulation dtype: bf16/fp16 products are accumulated
    and kept in float32, never rounded to the inputs' dtype before the log-softmax."""
    if h.dtype == out.dtype:
        if b is None:
            torch.mm(h, w.T, out=out)
        else:
            torch.addmm(b, h, w.T, out=out)
        return
    # bf16/fp16: the product accumulated in float32, written over `out` (no zero fill to read
    # back), or added to the bias copied there
    if b is not None:
        out.copy_(b.to(out.dtype).expand_as(out))
    addmm_acc(out, h, w.T, fresh=b is None)


def _projected_tiles(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Yields (token start, rows [n, H], vocab start, weight block [nv, H], tile [n, nv]) with
    tile = rows @ block.T + bias in the accumulation dtype (float32; float64 for float64 inputs),
    token tiles outside, vocabulary blocks inside. One buffer serves every tile: use each before
    asking for the next. A tile's rows are `padded(nv)` apart, and the buffer holds every row's
    padding."""
    M, V = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    buf = hidden.new_empty(min(M, TOKEN_TILE) * padded(min(V, VOCAB_BLOCK)), dtype=acc)
    for ts in range(0, M, TOKEN_TILE):
        h = hidden[ts : ts + TOKEN_TILE]
        for vs in range(0, V, VOCAB_BLOCK):
            w = weight[vs : vs + VOCAB_BLOCK]
            n, nv = h.shape[0], w.shape[0]
            tile = buf[: n * padded(nv)].view(n, padded(nv))[:, :nv]  # a BLAS leading dimension
            project(h, w, None if bias is None else bias[vs : vs + VOCAB_BLOCK], tile)
            yield ts, h, vs, w, tile


def padded(n_cols: int) -> int:
    """Row stride of an n_cols-wide tile: a multiple of ROW_ALIGN elements."""
    return -(-n_cols // ROW_ALIGN) * ROW_ALIGN


def transform_params(transform: LogitTransform, like: torch.Tensor) -> torch.Tensor:
    # A tensor rather than scalar arguments: Triton passes Python floats as float32.
    values = (float(transform.factor), float(transform.softcap or 0.0))
    return device_constants(values, acc_dtype(like.dtype), like.device)


def tile_factor(transform: LogitTransform, dtype: torch.dtype, on_cuda: bool) -> float:
    """The factor (logit_scale / temperature) that the gradient tiles leave out, and the float32
    matmul results get instead, where the tiles are rounded to float16 for the matmuls (CUDA):
    there |dz| <= |g| * factor can overflow float16 (65504) or sink into its subnormals, where
    g * q * softcap' (|.| <= |g|) does not. 1 elsewhere (bf16 has float32's range)."""
    factor = float(transform.factor)
    return factor if on_cuda and dtype == torch.float16 and factor != 0 else 1.0


def has_out_dtype_mm() -> bool:
    """Whether this torch has the out-dtype matmuls, `torch.mm(..., out_dtype=)` and
    `torch.baddbmm(..., out_dtype=)`: bf16/fp16 products with a float32 result (torch >= 2.8)."""
    global _OUT_DTYPE_MM
    if _OUT_DTYPE_MM is None:
        _OUT_DTYPE_MM = all(hasattr(getattr(torch.ops.aten, op), "dtype_out")
                            for op in ("mm", "baddbmm"))  # fmt: skip
    return _OUT_DTYPE_MM


_OUT_DTYPE_MM: bool | None = None
_ACC_BY_ADD = False  # this build's batched out-dtype form was rejected: product, then add


def addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fresh: bool = False) -> None:
    """acc += a @ b (with `fresh`: acc = a @ b, acc not read) with a float32 result, without
    rounding a @ b to the inputs' dtype first.

    One of a, b may be a gradient tile (float32) and the other the inputs' rows or weight block.
    CUDA (and meta) tensors use the out-dtype matmuls (one cuBLAS call in the inputs' dtype, the
    float32 gradient tile rounded once, float32 accumulation): `mm` when fresh, else `baddbmm`
    on a batch of one, which adds into its float32 `out` (addmm's out-dtype form on CUDA wants
    its `self` in the inputs' dtype). If this build rejects the batched form, the product is
    made in float32 and added (one temporary); without out-dtype matmuls, or on CPU (ATen's CPU
    matmul has no bf16 -> float32 form), the inputs are upcast first (exact, one temporary each,
    and on CUDA several times slower: warned once)."""
    if a.dtype == b.dtype == acc.dtype:
        torch.mm(a, b, out=acc) if fresh else acc.addmm_(a, b)
        return
    global _OUT_DTYPE_MM, _ACC_BY_ADD
    if acc.device.type in ("cuda", "meta") and has_out_dtype_mm():
        low = b.dtype if a.dtype == acc.dtype else a.dtype
        a, b = a.to(low), b.to(low)
        try:
            if fresh:
                torch.mm(a, b, out_dtype=acc.dtype, out=acc)
            elif _ACC_BY_ADD:
                acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
            else:
                torch.baddbmm(acc[None], a[None], b[None], out_dtype=acc.dtype, out=acc[None])
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError) as exc:
            if not (fresh or _ACC_BY_ADD):
                _ACC_BY_ADD = True
                return addmm_acc(acc, a, b)
            _OUT_DTYPE_MM = False
            if acc.device.type == "cuda":
                warnings.warn(
                    f"dpo_kernels: this torch rejects bf16/fp16 matmuls with a float32 result "
                    f"({exc}); the linear path upcasts its inputs instead (same numbers, several "
                    "times slower). torch >= 2.8 has them.",
                    stacklevel=2,
                )
    if fresh:
        torch.mm(a.to(acc.dtype), b.to(acc.dtype), out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def fold_tile(tile, targets, run_max, run_sum, pz, zsum, sq, arg, target, params, vocab_start,
              has_softcap: bool, stats: bool) -> None:  # fmt: skip
    """Folds a tile of logits ([n, nv], rows padded to whole 16-byte vectors) of vocabulary
    [vocab_start, vocab_start + nv) into the rows' running max, sum of exp, label logit and, with
    stats, the statistics' sums (pz, zsum, sq, first argmax); all [n] from their first row."""
    n, nv = tile.shape
    vec = vec_elems(tile.element_size())
    block, warps = launch_config(nv, tile.element_size(), stats)
    _linear_fwd_kernel[(n,)](
        tile, targets, run_max, run_sum, pz, zsum, sq, arg, target, params, nv,
        -(-nv // vec) * vec, tile.stride(0), vocab_start, HAS_SOFTCAP=has_softcap, STATS=stats,
        ACC=tl_acc_dtype(tile.dtype), BLOCK_V=block, VEC=vec, num_warps=warps, **NO_FMA,
    )  # fmt: skip


def grad_tile(tile, out, targets, grad, lse, params, vocab_start, has_softcap: bool) -> None:
    """out <- grad * (onehot(target) - softmax) * dz/dx of a tile of logits ([n, nv], vocabulary
    [vocab_start, vocab_start + nv)); `out` is the tile itself (in place) or a buffer of its
    shape in the inputs' dtype (the tile only read, dx rounded once)."""
    n, nv = tile.shape
    block, warps = launch_config(nv, tile.element_size())
    vec = vec_elems(out.element_size())  # whole 16-byte vectors of both
    _linear_bwd_kernel[(n, triton.cdiv(nv, block))](
        tile, out, targets, grad, lse, params, -(-nv // vec) * vec, tile.stride(0),
        out.stride(0), vocab_start, HAS_SOFTCAP=has_softcap, ACC=tl_acc_dtype(tile.dtype),
        BLOCK_V=block, VEC=vec, num_warps=warps, **NO_FMA,
    )  # fmt: skip


# Row kernels of the fused linear losses (linear_dpo_rows.Rows; contracts in ops/reference.py).
FOLD_NO_ARG = 2**31 - 1  # Fold.arg before any block (see _linear_fwd_kernel's ties)
TILE_COPIES = 1  # the row kernels work in place


def project_rows(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    """out <- h @ w.T in out's dtype (float32 from bf16/fp16 rows on CUDA: `project`)."""
    project(h, w, None, out)


def fold_rows(x, y, f, vs: int, tf: LogitTransform) -> None:
    pz, zsum, sq = f.st.unbind(0) if f.stats else (f.s,) * 3
    with device_guard(x):
        fold_tile(
            x, y, f.m, f.s, pz, zsum, sq, f.arg if f.stats else y, f.target,
            transform_params(tf, x), vs, tf.softcap is not None, f.stats,
        )  # fmt: skip


def grad_rows(x, local, g, lse, tf: LogitTransform, out=None) -> None:
    """`out` (a buffer of x's shape, in x's dtype or the inputs'): written instead of x."""
    if x.shape[0] == 0:
        return
    with device_guard(x):
        grad_tile(
            x, x if out is None else out, local, g.contiguous(), lse.contiguous(),
            transform_params(tf, x), 0, tf.softcap is not None,
        )  # fmt: skip


def fold_softmax_rows(x, y, f, tf: LogitTransform) -> None:
    fold_rows(x, y, f, 0, tf)
    grad_rows(x, y, torch.ones_like(f.m), f.lse(), tf)


def linear_logprobs_forward(
    hidden: torch.Tensor,  # [M, H] counted rows, contiguous
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [M] int64 labels in [0, V); -1: not in this weight (vocab-parallel)
    transform: LogitTransform,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Label log-probs [M], log-sum-exp [M] and, with `stats`, entropy, mean logit,
    label-is-argmax and log sum_v p_v^2 [M] (float32; float64 for float64 inputs):
    ops/reference.py's contract."""
    with device_guard(hidden):
        return _forward(hidden, weight, bias, targets, transform, stats)


def _forward(hidden, weight, bias, targets, transform, stats):
    M = hidden.shape[0]
    params = transform_params(transform, hidden)
    acc, dev = params.dtype, hidden.device
    run_max = torch.full((M,), float("-inf"), dtype=acc, device=dev)
    run_sum = torch.zeros(M, dtype=acc, device=dev)
    target = torch.zeros(M, dtype=acc, device=dev)
    n_stats = M if stats else 1
    pz, zsum, sq = (torch.zeros(n_stats, dtype=acc, device=dev) for _ in range(3))
    arg = torch.full((n_stats,), 2**31 - 1, dtype=torch.int64, device=dev)  # see fold_block
    for ts, _, vs, _, tile in _projected_tiles(hidden, weight, bias):
        st = [t[ts:] if stats else t for t in (pz, zsum, sq, arg)]
        fold_tile(tile, targets[ts:], run_max[ts:], run_sum[ts:], *st, target[ts:], params, vs,
                  transform.softcap is not None, stats)  # fmt: skip
    log_s = torch.log(run_sum)
    lse = run_max + log_s
    if not stats:
        empty = [hidden.new_empty(0, dtype=d) for d in stats_dtypes(acc)]
        return target - lse, lse, *empty
    mean = zsum / weight.shape[0]
    top1 = (arg == targets) & ~lse.isnan()  # a row with a NaN has no argmax
    return target - lse, lse, lse - pz / run_sum, mean, top1, torch.log(sq) - 2 * log_s


def linear_logprobs_backward(
    grad: torch.Tensor,  # [M] gradient of the label log-probs
    hidden: torch.Tensor,  # [M, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,
    targets: torch.Tensor,  # [M]
    lse: torch.Tensor,  # [M] from linear_logprobs_forward
    transform: LogitTransform,
    needs: tuple[bool, bool, bool],  # gradients wanted for (hidden, weight, bias)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for hidden [M, H], weight [V, H], bias [V] in the accumulation dtype; [0] if not
    asked (the contract: ops/reference.py)."""
    with device_guard(hidden):
        return _backward(grad, hidden, weight, bias, targets, lse, transform, needs)


def _backward(grad, hidden, weight, bias, targets, lse, transform, needs):
    M, V = hidden.shape[0], weight.shape[0]
    hidden_grad, weight_grad, bias_grad = needs
    params = transform_params(transform, hidden)
    acc = params.dtype
    empty = hidden.new_empty(0)
    dh = hidden.new_empty(hidden.shape, dtype=acc) if hidden_grad else empty  # contiguous
    # No zero fill where a matmul writes first: dw by the first token tile (zeros only when no
    # tile comes), each token tile's dh rows by its first vocabulary block.
    new_dw = torch.empty if M else torch.zeros
    dw = new_dw(weight.shape, dtype=acc, device=weight.device) if weight_grad else None
    use_bias = bias_grad and bias is not None
    db = torch.zeros(V, dtype=acc, device=weight.device) if use_bias else None
    f = tile_factor(transform, hidden.dtype, hidden.device.type != "cpu")
    grad = grad.to(acc).contiguous()
    if f != 1:  # the tiles without the factor; the results get it
        grad = grad / f
    lse = lse.to(acc).contiguous()
    for ts, h, vs, w, tile in _projected_tiles(hidden, weight, bias):
        n, nv = tile.shape
        grad_tile(tile, tile, targets[ts:], grad[ts:], lse[ts:], params, vs,
                  transform.softcap is not None)  # fmt: skip
        if hidden_grad:
            addmm_acc(dh[ts : ts + n], tile, w, fresh=vs == 0)
        if dw is not None:
            addmm_acc(dw[vs : vs + nv], tile.T, h, fresh=ts == 0)
        if db is not None:
            db[vs : vs + nv] += tile.sum(0, dtype=acc)
    if f != 1:
        for t in (dh if hidden_grad else None, dw, db):
            if t is not None:
                t.mul_(f)
    return dh, empty if dw is None else dw, empty if db is None else db
