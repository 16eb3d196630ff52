"""Two fusions the CUDA route of the fused linear DPO loss could make, timed against what it does
(issue 16: at most 1.1x its 3 cuBLAS GEMMs). The route projects a chunk of hidden rows with
cuBLAS (float32 logits out), reads the logits once to fold each row's max and sum of exponentials
(`fold_rows`), and once more to write the logits' gradient in bf16 (`grad_rows`): 10 bytes of
memory traffic per logit outside the GEMMs, at the copy bandwidth (7.1 ms of 85 on an H100).

- `gemm`: a Triton matmul with the fold in its epilogue (the tile still in registers) removes
  the first read, but only pays if it is within that margin of cuBLAS. Times cuBLAS (float32
  out, what the route calls; bf16 out), cuBLAS + the fold read (the route today), and Triton
  matmuls (pointer loads; persistent with TMA descriptors; a few tile shapes) with and without
  the per-tile (max, sum of exp) epilogue, each checked against cuBLAS's logits and log-sum-exp.
- `rows`: one kernel that folds a row and writes its q = onehot - softmax in bf16 right after,
  while the row (513 KB at V = 128256) is still in L2, so that the second read misses HBM; a
  fixed number of programs bounds the rows in flight (L2: 50 MB on an H100, 60 on an H200).
  Times it against fold_rows + grad_rows (bf16 out). (The route cannot use it as is: its dz
  carries each row's loss factor g, known only once every row of the pair is folded; q without
  g would need g on the hidden rows instead, a second bf16 rounding in dW.)

Shape (default): the 2 GiB budget's chunk, M = 2048 rows, K = H = 4096, N = V = 128256, bf16.
Prints one line per method. Usage:
    python benchmarks/fusion_probe.py [--only gemm|rows] [--m 2048] [--n 128256] [--k 4096]
(`--device cpu` with TRITON_INTERPRET=1 and a small shape: a smoke run of the checks, in fp16.)
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles walk the columns together (the weight tile stays in L2)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _epilogue(acc, c_ptr, m_ptr, s_ptr, pid_m, pid_n, M, N, ldc, n_tiles_n,
              BM: tl.constexpr, BN: tl.constexpr, STATS: tl.constexpr):  # fmt: skip
    """Stores the float32 tile; with STATS, each row's (max, sum of exp) over the tile."""
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * ldc + rn[None, :], acc, mask=inside)
    if STATS:
        z = tl.where(rn[None, :] < N, acc, float("-inf"))
        m = tl.max(z, 1)
        s = tl.sum(tl.exp(z - m[:, None]), 1)
        tl.store(m_ptr + rm * n_tiles_n + pid_n, m, mask=rm < M)
        tl.store(s_ptr + rm * n_tiles_n + pid_n, s, mask=rm < M)


@triton.jit
def _mm_ptr(a_ptr, b_ptr, c_ptr, m_ptr, s_ptr, M, N, K, n_tiles_n, BM: tl.constexpr,
            BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
            STATS: tl.constexpr):  # fmt: skip
    """c [M, N] = a [M, K] @ b [N, K].T (K a multiple of BK, a and b contiguous)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)) % M  # clamped rows: loads need no mask
    rn = (pid_n * BN + tl.arange(0, BN)) % N
    rk = tl.arange(0, BK)
    a = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    b = b_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K // BK):
        acc = tl.dot(tl.load(a), tl.trans(tl.load(b)), acc)
        a += BK
        b += BK
    _epilogue(acc, c_ptr, m_ptr, s_ptr, pid_m, pid_n, M, N, N, n_tiles_n, BM, BN, STATS)


@triton.jit
def _mm_tma(a_desc, b_desc, c_ptr, m_ptr, s_ptr, M, N, K, n_tiles_n, BM: tl.constexpr,
            BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, STATS: tl.constexpr,
            NUM_SMS: tl.constexpr):  # fmt: skip
    """The same with TMA descriptor loads, persistent (NUM_SMS programs walk the tiles)."""
    n_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_ids(tile, M, N, BM, BN, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K // BK):
            a = a_desc.load([pid_m * BM, k * BK])
            b = b_desc.load([pid_n * BN, k * BK])
            acc = tl.dot(a, b.T, acc)
        _epilogue(acc, c_ptr, m_ptr, s_ptr, pid_m, pid_n, M, N, N, n_tiles_n, BM, BN, STATS)


def triton_mm(a, b, c, cfg, stats: bool):
    """c <- a @ b.T; returns the [M, tiles] (max, sum of exp) with stats, else None."""
    M, K = a.shape
    N = b.shape[0]
    BM, BN, BK, stages, warps, tma = cfg
    nt = triton.cdiv(N, BN)
    m = torch.empty(M, nt if stats else 1, dtype=torch.float32, device=a.device)
    s = torch.empty_like(m)
    if not tma:
        grid = (triton.cdiv(M, BM) * nt,)
        _mm_ptr[grid](a, b, c, m, s, M, N, K, nt, BM=BM, BN=BN, BK=BK, GROUP_M=8, STATS=stats,
                      num_stages=stages, num_warps=warps)  # fmt: skip
    else:
        from triton.tools.tensor_descriptor import TensorDescriptor

        sms = torch.cuda.get_device_properties(a.device).multi_processor_count
        ad = TensorDescriptor.from_tensor(a, [BM, BK])
        bd = TensorDescriptor.from_tensor(b, [BN, BK])
        _mm_tma[(sms,)](ad, bd, c, m, s, M, N, K, nt, BM=BM, BN=BN, BK=BK, GROUP_M=8,
                        STATS=stats, NUM_SMS=sms, num_stages=stages, num_warps=warps)  # fmt: skip
    return (m, s) if stats else None


@triton.jit
def _fold_then_q(x_ptr, q_ptr, y_ptr, lse_ptr, M, N, BLOCK: tl.constexpr):
    """Per row (programs stride over rows): fold max and sum of exp, then q = onehot - softmax
    in q's dtype, the row read a second time (from L2 if it stayed there)."""
    for row in range(tl.program_id(0), M, tl.num_programs(0)):
        x_row = x_ptr + tl.cast(row, tl.int64) * N
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(x_row + cols, mask=cols < N, other=float("-inf"))
            m_new = tl.maximum(m, z)
            s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
            s = tl.where(m_new == float("-inf"), 0.0, s)
            m = m_new
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
        tl.store(lse_ptr + row, lse)
        y = tl.load(y_ptr + row)
        q_row = q_ptr + tl.cast(row, tl.int64) * N
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(x_row + cols, mask=cols < N, other=0.0)
            q = tl.where(cols == y, 1.0, 0.0) - tl.exp(z - lse)
            tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=cols < N)


def fold_then_q(x, y, q, lse, programs: int, block: int) -> None:
    M, N = x.shape
    _fold_then_q[(min(M, programs),)](x, q, y, lse, M, N, BLOCK=block, num_warps=8)


def lse_of(m, s):
    top = m.max(1).values
    return top + torch.log((s * torch.exp(m - top[:, None])).sum(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["gemm", "rows"])
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--n", type=int, default=128256)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    from linear_dpo_gpu import bench as smoke_ms  # (its CPU branch: 3 calls, the median)
    from triton.testing import do_bench

    from dpo_kernels.common import LogitTransform
    from dpo_kernels.linear_dpo_rows import Fold
    from dpo_kernels.ops import triton as T

    M, N, K = args.m, args.n, args.k
    cuda = args.device == "cuda"
    dt = torch.bfloat16 if cuda else torch.float16  # (the interpreter's bf16 tl.dot is wrong)
    g = torch.Generator(device=args.device).manual_seed(0)
    a = torch.randn(M, K, device=args.device, dtype=dt, generator=g)
    b = torch.randn(N, K, device=args.device, dtype=dt, generator=g) * 0.05
    y = torch.randint(0, N, (M,), device=args.device, generator=g)
    c = torch.empty(M, N, device=args.device, dtype=torch.float32)
    flop = 2 * M * N * K
    gpu = torch.cuda.get_device_name(0) if cuda else args.device

    def mm32(out=None):  # the route's projection: float32 logits (CPU: no out_dtype form)
        if cuda:
            return torch.mm(a, b.T, out_dtype=torch.float32, out=out)
        return torch.mm(a.float(), b.float().T, out=out)

    print(f"{gpu}, M={M} N={N} K={K}, {str(dt)[6:]} in, torch {torch.__version__},"
          f" triton {triton.__version__}")  # fmt: skip

    def record(name, fn, nbytes=0):
        try:
            ms = do_bench(fn, warmup=50, rep=300) if cuda else smoke_ms(fn)
        except Exception as e:
            print(f"{name:48s} failed: {type(e).__name__}: {str(e)[:120]}")
            return
        rate = f"{nbytes / ms / 1e6:6.0f} GB/s" if nbytes else f"{flop / ms / 1e9:6.0f} TFLOP/s"
        print(f"{name:48s} {ms:7.3f} ms {rate}", flush=True)

    def candidate(name, run, errors, limits, nbytes=0):
        """Runs `run` once, checks errors() (a pair) within limits, then times it."""
        try:
            run()
            errs = errors()
        except Exception as e:
            print(f"{name:48s} failed: {type(e).__name__}: {str(e)[:160]}")
            return
        if any(err > lim for err, lim in zip(errs, limits, strict=True)):
            print(f"{name:48s} WRONG: errors {errs[0]:.2e}, {errs[1]:.2e}")
            return
        record(name, run, nbytes)

    mm32(c)
    ref = c.clone()
    tf = LogitTransform()

    def fold():
        f = Fold(M, torch.float32, a.device, False, "triton")
        T.fold_rows(c, y, f, 0, tf)
        return f

    ref_lse = fold().lse()
    if args.only in (None, "gemm"):
        record("cuBLAS bf16 out", lambda: torch.mm(a, b.T))
        record("cuBLAS fp32 out (the route)", mm32)
        record("cuBLAS fp32 out + fold read (the route)",
               lambda: (mm32(c), fold()))  # fmt: skip
        configs = [  # BM, BN, BK, stages, warps, tma
            (128, 256, 64, 3, 8, False), (128, 256, 64, 4, 8, False), (128, 128, 64, 4, 4, False),
            (128, 128, 64, 4, 8, False), (256, 128, 64, 3, 8, False),
            (128, 128, 64, 4, 8, True), (128, 128, 64, 3, 8, True), (128, 256, 64, 2, 8, True),
            (128, 128, 64, 5, 8, True), (128, 256, 32, 4, 8, True),
        ]  # fmt: skip
        for cfg in configs:
            for stats in (False, True):
                name = f"triton {'tma' if cfg[5] else 'ptr'} {cfg[:5]}{' +fold' if stats else ''}"
                out = []

                def run(cfg=cfg, stats=stats, out=out):
                    out[:] = [triton_mm(a, b, c, cfg, stats)]

                def errors(stats=stats, out=out):  # (logits, log-sum-exp)
                    lse_err = (lse_of(*out[0]) - ref_lse).abs().max().item() if stats else 0.0
                    return (c - ref).abs().max().item(), lse_err

                c.zero_()  # (a kernel that writes nothing must not pass on cuBLAS's logits)
                candidate(name, run, errors, (1e-2, 1e-3))
        c.copy_(ref)
    if args.only in (None, "rows"):
        # bytes to and from HBM per logit: fold 4, dz 4 + 2 (the route); fused 4 + 2 if the
        # second read hits L2
        dz = torch.empty(M, N, device=args.device, dtype=dt)
        ones = torch.ones(M, device=args.device)

        def route():
            f = fold()
            T.grad_rows(c, y, ones, f.lse(), tf, out=dz)

        route()
        want = dz.float()
        record("fold_rows + grad_rows, bf16 out (the route)", route, 10 * M * N)
        lse = torch.empty(M, device=args.device)
        for programs in (66, 132, 264, 528):
            for block in (2048, 4096):
                candidate(
                    f"fold_then_q programs={programs} block={block}",
                    lambda p=programs, bl=block: fold_then_q(c, y, dz, lse, p, bl),
                    lambda: ((dz.float() - want).abs().max().item(),  # (q, log-sum-exp)
                             (lse - ref_lse).abs().max().item()),
                    (1e-2, 1e-3), 6 * M * N,
                )  # fmt: skip


if __name__ == "__main__":
    main()
