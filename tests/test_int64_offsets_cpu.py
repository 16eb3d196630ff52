"""The C++ CPU kernels past 2**31 elements of storage (int64 offsets), on real tensors: a
vocabulary of 128256 and enough rows that the last ones sit past element 2**31 (a planted int32
row offset segfaults here). About 9 GB at peak per test and 20 s each; skipped, saying so, where
less memory is available. Only the rows that count are filled and compared with float64.
"""

import pytest
import torch


def _available_gib() -> float:
    """MemAvailable, or less where a cgroup (v2) limit leaves less (a container)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0.0
    free = kib * 1024
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free / 2**30


pytestmark = pytest.mark.skipif(
    _available_gib() < 12, reason="needs about 9 GB of free memory (12 GiB available, to be safe)"
)

V = 128256
ROW_AT_2_31 = 2**31 // V  # flat row whose elements straddle element 2**31


def _ops():
    from dpo_kernels.ops import cpu

    if not cpu.AVAILABLE:
        pytest.skip("C++ kernels not built")
    return cpu


def test_logprobs_rows_past_2_31_elements():
    cpu = _ops()
    T = ROW_AT_2_31 // 2 + 4  # [2, T + 1, V] storage, logits[:, :-1]: rows past 2**31 elements
    full = torch.empty(2, T + 1, V, dtype=torch.bfloat16)
    z = full[:, :-1]
    assert full.numel() > 2**31 + V
    labels = torch.randint(0, V, (2, T))
    mask = torch.zeros(2, T, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    rows = [(0, 0), (1, T - 4), (1, T - 3), (1, T - 2), (1, T - 1)]
    # the storage offsets of these rows run past 2**31 elements
    assert max(b * (T + 1) * V + t * V for b, t in rows) + V > 2**31
    for b, t in rows:
        z[b, t] = (torch.randn(V, generator=g) * 3).to(torch.bfloat16)
        mask[b, t] = True
    labels[1, T - 1] = V - 1
    tok, lse, *_ = cpu.logprobs_forward(z, labels, mask, None, -100, True)
    grad = torch.randn(2, T)
    dz = cpu.logprobs_backward(grad, z, labels, mask, lse, -100)
    for b, t in rows:
        x = z[b, t].double()
        ref_lse = torch.logsumexp(x, 0)
        y = labels[b, t]
        assert abs(lse[b, t].item() - ref_lse.item()) < 1e-4, (b, t)
        assert abs(tok[b, t].item() - (x[y] - ref_lse).item()) < 1e-4, (b, t)
        ref_g = -grad[b, t].double() * torch.exp(x - ref_lse)
        ref_g[y] += grad[b, t].double()
        err = (dz[b, t].double() - ref_g).abs().max().item()
        assert err < 1e-2 * max(1.0, ref_g.abs().max().item()), (b, t, err)
    # uncounted rows at the end of storage are zero
    assert dz[1, T - 5].abs().max().item() == 0
    assert tok[1, T - 5].item() == 0


def test_linear_rows_past_2_31_elements():
    cpu = _ops()
    from dpo_kernels.common import LogitTransform
    from dpo_kernels.linear_dpo_rows import Fold

    n = ROW_AT_2_31 + 2  # float32 x [n, V]: its last rows past 2**31 elements (8.6 GB)
    x = torch.empty(n, V)
    assert x.numel() > 2**31
    g = torch.Generator().manual_seed(1)
    last = [0, n - 3, n - 2, n - 1]
    y = torch.zeros(n, dtype=torch.long)
    for r in last:
        x[r] = torch.randn(V, generator=g) * 3
        y[r] = V - 1 - r % 7
    f = Fold(n, torch.float32, torch.device("cpu"), True, "cpu")
    tf = LogitTransform(softcap=30.0)
    cpu.fold_rows(x, y, f, 0, tf)
    lse = f.lse()
    ref = {r: 30.0 * torch.tanh(x[r].double() / 30.0) for r in last}
    for r in last:
        zr = ref[r]
        ref_lse = torch.logsumexp(zr, 0).item()
        assert abs(lse[r].item() - ref_lse) < 1e-4, r
        assert abs(f.target[r].item() - zr[y[r]].item()) < 1e-4, r
        assert f.arg[r].item() == int(zr.argmax()), r
    grad = torch.randn(n)
    cpu.grad_rows(x, y, grad, lse, tf)  # x <- its gradient, in place
    for r in last:
        zr = ref[r]
        t = zr / 30.0  # tanh(x / c)
        p = torch.exp(zr - torch.logsumexp(zr, 0))
        onehot = torch.zeros(V, dtype=torch.float64)
        onehot[y[r]] = 1
        want = grad[r].double() * (onehot - p) * (1 - t * t)
        err = (x[r].double() - want).abs().max().item()
        assert err < 1e-5, (r, err)
