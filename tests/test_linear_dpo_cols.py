"""The cpu backend's vocabulary-major tiles of the fused linear losses (linear_dpo_rows.Rows, C++
kernels in csrc/linear_dpo_loss.cpp): token counts that leave a partial last vector block or fill
less than one, infinities and NaN, argmax ties across chunks and vocabulary blocks; against
float64 formulas written here and the row-major "reference" backend on the same logits."""

import math

import pytest
import torch

from dpo_kernels.common import LogitTransform
from dpo_kernels.linear_dpo_rows import Fold, Rows
from dpo_kernels.ops import cpu as cpu_ops

pytestmark = pytest.mark.skipif(not cpu_ops.AVAILABLE, reason="C++ CPU kernels not built")

TRANSFORMS = [LogitTransform(), LogitTransform(1.5, 6.0, 0.7)]
V = 600  # three 256-entry chunks of the C++ column fold, the last one partial
CPU = torch.device("cpu")


def _z(x, tf):
    """float64 z(x) of ops/reference.py::LogitTransform."""
    if tf.softcap is not None:
        x = tf.softcap * torch.tanh(x / tf.softcap)
    return x * tf.factor


def _dzdx(x, tf):
    if tf.softcap is None:
        return torch.full_like(x, tf.factor)
    return tf.factor * (1 - torch.tanh(x / tf.softcap) ** 2)


def _logits(n, dtype, seed):
    """[n, V] logits; rows 0-3 have their maximum twice (the first of each pair is the argmax),
    and the last four rows hold +inf, NaN, only -inf, and -inf over most of the row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    top = x.abs().max() + 1
    for r, (a, b) in enumerate([(40, 300), (5, V - 1), (10, 11), (513, 599)]):
        x[r, a] = x[r, b] = top
    special = {n - 1: "inf", n - 2: "nan", n - 3: "all -inf", n - 4: "most -inf"}
    x[n - 1, 7] = math.inf
    x[n - 2, 100] = math.nan
    x[n - 3] = -math.inf
    x[n - 4, 3:] = -math.inf
    y = torch.randint(0, V, (n,), generator=g)
    y[0] = 300  # a tied maximum, but not the first one
    y[1] = 5  # the first of a tie
    return x.to(dtype), y, [r for r in range(n) if r not in special]


def _tile(rows, x):
    n, nv = x.shape
    buf = torch.full((n * nv + rows.slack(n),), math.nan, dtype=x.dtype)
    t = rows.tile(buf, n, nv)
    t.copy_(x)
    return t


# n: below one vector of 8 / 16 tokens; a partial last block. spike: a logit far above the
# first 256 of its row (the kernel's shift moves).
CASES = [(5, 0, False), (77, 0, False), (77, 0, True), (5, 1, False), (77, 1, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "t", "spike"), CASES, ids=[f"n{n}-tf{t}-{s}" for n, t, s in CASES])
def test_fold_softmax_on_vocabulary_major_tiles(n, t, spike, dtype):
    tf = TRANSFORMS[t]
    x, y, regular = _logits(max(n, 8), dtype, seed=n)
    x, y, regular = x[:n], y[:n], [r for r in regular if r < n]
    if spike:
        x[2, 400] = x[2].max() + 40
    if n < 8:  # keep one special row of each kind the short case can hold
        x[n - 1, 7], x[n - 2, 100] = math.inf, math.nan
        regular = [r for r in regular if r < n - 2]
    cpu, ref = Rows("cpu", dtype, CPU, tf), Rows("reference", dtype, CPU, tf)
    tc, tr = _tile(cpu, x), _tile(ref, x)
    assert tc.stride() == (1, n) and tr.stride() == (V, 1)
    fc, fr = (Fold(n, dtype, "cpu", True, b) for b in ("cpu", "reference"))
    cpu.fold_softmax(tc, y, fc)
    ref.fold_softmax(tr, y, fr)
    # The cpu tile may hold q / factor (per token): one-shift blocks of finite rows.
    assert fr.factor is None and fc.factor is not None
    if n > 64 and tf.softcap is None:  # rows 0-15 (in one block): finite, spiked or not
        assert bool((fc.factor[:16] == 1).all()) == spike
        assert bool((fc.factor[:16] != 1).all()) == (not spike)
    else:  # a block with an infinity or NaN, or softcap: one more pass, factor 1
        assert bool((fc.factor == 1).all())
    tc = tc * fc.factor[:, None]
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    # entropy = lse - sum p z cancels: |lse| ~ 20 here, so float32 is good to ~1e-4 absolute
    stol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else tol
    # Every row, infinities and NaN included, as the reference backend gives it.
    torch.testing.assert_close(fc.lse(), fr.lse(), equal_nan=True, **tol)
    torch.testing.assert_close(fc.target, fr.target, equal_nan=True, **tol)
    torch.testing.assert_close(tc, tr, equal_nan=True, **tol)
    for a, b in zip(fc.token_stats(V, y), fr.token_stats(V, y), strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, **stol)
    # Regular rows against float64 formulas.
    z = _z(x.double(), tf)[regular]
    yr = y[regular]
    lse = z.logsumexp(1)
    p = (z - lse[:, None]).exp()
    q = (torch.nn.functional.one_hot(yr, V) - p) * _dzdx(x.double()[regular], tf)
    torch.testing.assert_close(fc.lse()[regular].double(), lse, **tol)
    torch.testing.assert_close(fc.target[regular].double(), z.gather(1, yr[:, None])[:, 0], **tol)
    torch.testing.assert_close(tc[regular].double(), q, **tol)
    entropy, mean, top1, log_sq = fc.token_stats(V, y)
    torch.testing.assert_close(entropy[regular].double(), lse - (p * z).sum(1), **stol)
    torch.testing.assert_close(mean[regular].double(), z.mean(1), **tol)
    torch.testing.assert_close(log_sq[regular].double(), (p * p).sum(1).log(), **tol)
    first = (z == z.max(1, keepdim=True).values).double().argmax(1)  # first maximum
    assert fc.arg[regular].tolist() == first.tolist()
    assert top1[regular].tolist() == (first == yr).tolist()
    if n > 1:  # the label is a tied maximum but not the first one / the first one
        assert fc.arg[:2].tolist() == [40, 5] and top1[:2].tolist() == [False, True]
    # The +inf row: log p = -inf for its other labels (softcap: finite); NaN row: NaN.
    if tf.softcap is None:
        assert (fc.target - fc.lse())[n - 1].item() == -math.inf
    assert fc.lse()[n - 2].isnan()


@pytest.mark.parametrize("n", [3, 21])
@pytest.mark.parametrize("tf", TRANSFORMS, ids=["identity", "softcap"])
def test_fold_in_vocabulary_blocks_then_grad(n, tf):
    """The recompute route: fold over blocks with a vocab_start (labels outside a block give no
    target), then each block's gradient with a per-token g; the tile leaves x intact."""
    dtype = torch.float32
    x, y, _ = _logits(max(n, 8), dtype, seed=7)
    x, y = x[:n], y[:n]
    if n >= 8:
        x[n - 2 :] = torch.randn(2, V, dtype=torch.float64).to(dtype)  # no NaN: a finite g * q
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    blocks = [(0, 280), (280, 299), (299, V)]  # ties 40|300 and 513|599 cross or share blocks
    out = {}
    for backend in ("cpu", "reference"):
        rows = Rows(backend, dtype, CPU, tf)
        f = Fold(n, dtype, "cpu", True, backend)
        for vs, ve in blocks:
            t = _tile(rows, x[:, vs:ve])
            rows.fold(t, y, f, vs)
            assert torch.equal(t.isnan(), x[:, vs:ve].isnan())
            torch.testing.assert_close(t, x[:, vs:ve], equal_nan=True, rtol=0, atol=0)
        grads = []
        for vs, ve in blocks:
            t = _tile(rows, x[:, vs:ve])
            local = torch.where((y >= vs) & (y < ve), y - vs, -1)
            rows.grad(t, local, g, f.lse())
            grads.append(t.clone())
        out[backend] = (f, torch.cat(grads, 1))
    (fc, qc), (fr, qr) = out["cpu"], out["reference"]
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(fc.lse(), fr.lse(), equal_nan=True, **tol)
    torch.testing.assert_close(fc.target, fr.target, equal_nan=True, **tol)
    for a, b in zip(fc.token_stats(V, y), fr.token_stats(V, y), strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(qc, qr, equal_nan=True, **tol)
    if n > 3:
        assert fc.arg[:4].tolist() == [40, 5, 10, 513]
    ok = ~(x.isnan().any(1) | x.isinf().any(1))
    z = _z(x.double()[ok], tf)
    p = (z - z.logsumexp(1, keepdim=True)).exp()
    q = g[ok].double()[:, None] * (torch.nn.functional.one_hot(y[ok], V) - p)
    torch.testing.assert_close(qc[ok].double(), q * _dzdx(x.double()[ok], tf), **tol)


def test_same_bits_for_any_thread_count():
    x, y, _ = _logits(45, torch.float32, seed=3)
    rows = Rows("cpu", torch.float32, CPU, LogitTransform())
    threads = torch.get_num_threads()
    results = []
    try:
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            f, t = Fold(45, torch.float32, "cpu", True, "cpu"), _tile(rows, x)
            rows.fold_softmax(t, y, f)
            results.append((t.clone(), f.m, f.s, f.st, f.arg))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_kernels_refuse_a_row_major_tile():
    rows = Rows("cpu", torch.float32, CPU, LogitTransform())
    x = torch.randn(20, 30)  # row-major
    f = Fold(20, torch.float32, "cpu", False, "cpu")
    with pytest.raises(RuntimeError, match="vocabulary-major"):
        rows.fold(x, torch.zeros(20, dtype=torch.long), f, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_and_backprop_on_the_tile(dtype, monkeypatch):
    """project / backprop on the vocabulary-major tile, with a bias, the g path and (bf16)
    several upcast weight blocks, against float64 matmuls; float32: no copy of the tile (ATen
    takes it as a transposed operand or output)."""
    import dpo_kernels.linear_dpo_rows as lr

    monkeypatch.setattr(lr, "VOCAB_BLOCK", 32)
    g = torch.Generator().manual_seed(0)
    n, H, Vw = 19, 24, 70
    h = torch.randn(n, H, generator=g).to(dtype)
    w = torch.randn(Vw, H, generator=g).to(dtype)
    b = torch.randn(Vw, generator=g)
    gs = torch.randn(n, generator=g)
    rows = Rows("cpu", dtype, CPU, LogitTransform())
    buf = torch.empty(n * Vw, dtype=torch.float32)
    x = rows.tile(buf, n, Vw)
    dh, dw, db = torch.empty(n, H), torch.empty(Vw, H), torch.zeros(Vw)
    hin = rows.rows_in(h)
    with torch.profiler.profile() as prof:
        rows.project(x, hin, w, b, 0)
        logits = buf.view(Vw, n).T.clone()
        rows.backprop(x, hin, w, 0, dh, dw, db, dw_fresh=True, g=gs)
    if dtype == torch.float32:
        names = [e.name for e in prof.events()]
        assert names.count("aten::clone") == 1 and "aten::contiguous" not in names
        assert names.count("aten::copy_") == 1, names  # the clone above
    ref = h.double() @ w.double().T + b.double()
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)
    qd = logits.double()
    hg = h.double() * gs.double()[:, None]
    torch.testing.assert_close(dh.double(), gs.double()[:, None] * (qd @ w.double()),
                               rtol=1e-4, atol=1e-3)  # fmt: skip
    torch.testing.assert_close(dw.double(), qd.T @ hg, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(db.double(), qd.T @ gs.double(), rtol=1e-4, atol=1e-4)
