"""Edge cases of issue 14, one test per row, on every backend, each against a float64 (or mpmath)
formula written here."""

import math

import mpmath as mp
import pytest
import torch
import torch.nn.functional as F
from conftest import GRAD_TOL, cpu_backends

from dpo_kernels import (
    common,
    cpo_loss,
    dpo_loss,
    kto_loss,
    linear_cpo_loss,
    linear_dpo_loss,
    linear_kto_loss,
    linear_orpo_loss,
    linear_pair_loss,
    linear_sequence_logprobs,
    linear_simpo_loss,
    orpo_loss,
    sequence_logprobs,
    simpo_loss,
)

BACKENDS = cpu_backends()
LOSS_BACKENDS = BACKENDS  # the reference runs the autograd formulas, the others the closed forms

# --------------------------------------------------------------------------------------------
# Row 1: every loss type is finite, and right, at margins of +-1e4 and beta from 1e-9 to 1e6.

mp.mp.dps = 40


def _sig(x):
    return 1 / (1 + mp.exp(-x))


def _logsig(x):
    return -mp.log(1 + mp.exp(-x))


def mp_losses(kind, pc, pr, rc, rr, nc, nr, beta, eps, tau=0.05):
    """Per-pair losses as TRL writes them (no stability tricks: mpmath has no overflow)."""
    P = len(pc)
    c = [pc[i] - rc[i] for i in range(P)]
    r = [pr[i] - rr[i] for i in range(P)]
    out = []
    if kind in ("aot", "aot_unpaired"):
        a, b = ([pc[i] - pr[i] for i in range(P)], [rc[i] - rr[i] for i in range(P)])
        if kind == "aot_unpaired":
            a, b = c, r
        d = [x - y for x, y in zip(sorted(a), sorted(b), strict=True)]
        return [-_logsig(beta * x) * (1 - eps) - _logsig(-beta * x) * eps for x in d]
    for i in range(P):
        ci, ri = c[i], r[i]
        u = beta * (ci - ri)
        if kind == "sigmoid":
            v = -_logsig(u)
        elif kind == "hinge":
            v = max(mp.mpf(0), 1 - u)
        elif kind == "ipo":
            v = (ci / nc[i] - ri / nr[i] - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            v = _sig(u) * (_logsig(u) - mp.log(1 - eps)) + _sig(-u) * (_logsig(-u) - mp.log(eps))
        elif kind == "nca_pair":
            v = -_logsig(beta * ci) - _logsig(-beta * ci) / 2 - _logsig(-beta * ri) / 2
        elif kind == "robust":
            v = (-(1 - eps) * _logsig(u) + eps * _logsig(-u)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            v = -_logsig(beta * ci) - _logsig(-beta * ri)
        elif kind == "sppo_hard":
            v = (ci - 1 / (2 * beta)) ** 2 + (ri + 1 / (2 * beta)) ** 2
        elif kind == "apo_zero":
            v = 1 - _sig(beta * ci) + _sig(beta * ri)
        elif kind == "apo_down":
            v = _sig(beta * ci) + 1 - _sig(beta * (ci - ri))
        elif kind == "discopop":
            t = mp.mpf(tau)
            v = -_logsig(u) * (1 - _sig(u / t)) + mp.exp(-u) * _sig(u / t)
        elif kind == "sft":
            v = -mp.fsum(pc) / mp.fsum(nc)
        elif kind == "sigmoid_norm":
            v = -_logsig(beta * (ci / nc[i] - ri / nr[i]))
        else:
            raise AssertionError(kind)
        out.append(v)
    return out


# Log-ratios (chosen, rejected) at +-1e4 and small: no ties (aot sorts them) and no hinge on its
# kink, so every loss is differentiable there.
C = [1e4, -1e4, 1e4 - 3, -1e4 + 1, 3.0, -7.0, 1e4 + 2, 0.5]
R = [-1e4, 1e4, 1e4 - 5, -1e4 + 2, -1e4 + 7, 1e4 - 1, 2.0, -0.25]


def extreme_pairs():
    P = len(C)
    rc = torch.tensor([-50.0 - i for i in range(P)], dtype=torch.float64)
    rr = torch.tensor([-60.0 - 2 * i for i in range(P)], dtype=torch.float64)
    pc = torch.tensor(C, dtype=torch.float64) + rc
    pr = torch.tensor(R, dtype=torch.float64) + rr
    nc = torch.arange(1, P + 1, dtype=torch.float64) * 3
    nr = torch.arange(1, P + 1, dtype=torch.float64) * 2 + 1
    return pc, pr, rc, rr, nc, nr


def mp_loss_and_grads(kind, pc, pr, rc, rr, nc, nr, beta, eps):
    """Mean loss and its derivatives in every pc[i], pr[i] (mpmath.diff), as floats."""
    args = [[mp.mpf(float(x)) for x in t] for t in (pc, pr, rc, rr, nc, nr)]
    beta, eps = mp.mpf(beta), mp.mpf(eps)
    P = len(args[0])

    def mean(pcv, prv):
        return mp.fsum(mp_losses(kind, pcv, prv, *args[2:], beta, eps)) / P

    loss = mean(args[0], args[1])
    grads = []
    for which in (0, 1):
        g = []
        for i in range(P):

            def f(t, which=which, i=i):
                v = [list(args[0]), list(args[1])]
                v[which][i] = t
                return mean(*v)

            g.append(float(mp.diff(f, args[which][i])))
        grads.append(g)
    return (
        float(loss),
        torch.tensor(grads[0], dtype=torch.float64),
        torch.tensor(grads[1], dtype=torch.float64),
    )


SMOOTHED = {"exo_pair": 0.1, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}


@pytest.mark.parametrize("kind", common.LOSS_TYPES)
def test_every_loss_type_right_at_extreme_margins(kind):
    pc, pr, rc, rr, nc, nr = extreme_pairs()
    eps = SMOOTHED.get(kind, 0.0)
    for beta in (1e-9, 1e-3, 0.1, 10.0, 1e6):
        loss64, gpc64, gpr64 = mp_loss_and_grads(kind, pc, pr, rc, rr, nc, nr, beta, eps)
        scale = max(1.0, abs(loss64))
        g_scale = max(1.0, gpc64.abs().max().item(), gpr64.abs().max().item())
        for backend in LOSS_BACKENDS:
            for dtype in (torch.float64, torch.float32):
                a = pc.to(dtype).detach().clone().requires_grad_()
                b = pr.to(dtype).detach().clone().requires_grad_()
                out = dpo_loss(
                    a, b, rc.to(dtype), rr.to(dtype), chosen_counts=nc, rejected_counts=nr,
                    beta=beta, loss_type=kind, label_smoothing=eps, backend=backend,
                )  # fmt: skip
                out.loss.backward()
                gb = torch.zeros_like(pr) if b.grad is None else b.grad.double()
                what = f"{kind} beta={beta} {backend} {dtype}"
                assert torch.isfinite(out.loss), what
                assert torch.isfinite(a.grad).all() and torch.isfinite(gb).all(), what
                # float32 rounds the inputs (1e4 + 50 carries 1e-3) and every step after.
                rtol = 1e-9 if dtype == torch.float64 else 2e-4
                assert abs(out.loss.item() - loss64) <= rtol * scale, (
                    what,
                    out.loss.item(),
                    loss64,
                )
                torch.testing.assert_close(
                    a.grad.double(), gpc64, rtol=rtol, atol=rtol * g_scale, msg=what
                )
                torch.testing.assert_close(gb, gpr64, rtol=rtol, atol=rtol * g_scale, msg=what)


def test_discopop_issue_example():
    """The issue's case: beta * margin = -1000, where exp(-u) * sigmoid(u / tau) was inf * 0."""
    u = 0.1 * ((-5050.0 + 50.0) - (4940.0 + 60.0))
    tau = 0.05
    expected = float(
        -_logsig(mp.mpf(u)) * (1 - _sig(mp.mpf(u) / tau)) + mp.exp(-u) * _sig(mp.mpf(u) / tau)
    )
    for backend in LOSS_BACKENDS:
        pc = torch.tensor([-5050.0], requires_grad=True)
        out = dpo_loss(
            pc, torch.tensor([4940.0]), torch.tensor([-50.0]), torch.tensor([-60.0]),
            loss_type="discopop", backend=backend,
        )  # fmt: skip
        out.loss.backward()
        assert out.loss.item() == pytest.approx(expected, rel=1e-6), backend
        assert pc.grad.item() == pytest.approx(-0.1, rel=1e-5), backend  # -beta * sigmoid(-u)


# --------------------------------------------------------------------------------------------
# Row 2: the fused LM head keeps bf16/fp16 logits in float32 up to the log-softmax.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_low_precision_logits_stay_float32(backend, dtype):
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    M, H, V = 24, 32, 80
    hidden = torch.randn(1, M, H, generator=g, dtype=torch.float64).to(dtype)
    # Logits of about +-60: one fp16 rounding of them moves a log-prob by ~0.03.
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 60 / H**0.5).to(dtype)
    labels = torch.randint(0, V, (1, M), generator=g)
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = linear_sequence_logprobs(h, w, labels, backend=backend)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    z64 = (h64 @ w64.T).log_softmax(-1)
    ref = z64.gather(-1, labels[..., None])[..., 0].sum(-1)
    rounded = (hidden.double() @ weight.double().T).to(dtype).double().log_softmax(-1)
    rounded_err = (rounded.gather(-1, labels[..., None])[..., 0].sum(-1) - ref).abs().item()
    err = (out.logps.double() - ref).abs().item()
    assert rounded_err > 1e-2  # the case tells float32 logits from rounded ones
    assert err <= 1e-3, (err, rounded_err)
    out.logps.sum().backward()
    ref.sum().backward()
    tol = GRAD_TOL[dtype] * 4 * max(1.0, h64.grad.abs().max().item(), w64.grad.abs().max().item())
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=tol, rtol=0)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=tol, rtol=0)


# --------------------------------------------------------------------------------------------
# Row 3: per-sequence sums are bitwise identical for any thread count.


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # interpreter: slow
def test_sequence_sums_independent_of_thread_count(backend):
    threads = torch.get_num_threads()
    try:
        for seed, shape in enumerate([(1, 70000, 8), (2, 40000, 3), (1, 9000, 5)]):
            g = torch.Generator(torch.get_default_device()).manual_seed(seed)
            x = torch.randn(*shape, generator=g) * 4
            y = torch.randint(0, shape[-1], shape[:2], generator=g)
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                z = x.clone().requires_grad_()
                out = sequence_logprobs(z, y, backend=backend)
                out.logps.sum().backward()
                results.append((out.logps, z.grad))
            for logps, grad in results[1:]:
                assert torch.equal(logps, results[0][0]), (shape, logps - results[0][0])
                assert torch.equal(grad, results[0][1])
            ref = x.double().log_softmax(-1).gather(-1, y[..., None])[..., 0].sum(-1)
            torch.testing.assert_close(results[0][0].double(), ref, rtol=1e-6, atol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_fused_head_runs_repeat_bitwise(backend):
    """The fused LM head (README, Reliability): the same result run after run at a thread count;
    its gradients come from ATen's multi-threaded matmuls, so other thread counts may change
    their last bits (not asserted)."""
    g = torch.Generator(torch.get_default_device()).manual_seed(8)
    h0, w0 = torch.randn(4, 64, 32, generator=g), torch.randn(300, 32, generator=g)
    y = torch.randint(0, 300, (4, 64), generator=g)
    results = []
    for _ in range(2):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = linear_dpo_loss(h, w, y, backend=backend, memory_budget=4096).loss
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Row 4: double backward through the loss is right (a gradient penalty), or raises.


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_dpo_loss_double_backward(backend):
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    P, beta = 5, 0.7
    pc, pr, rc, rr = (-30 * torch.rand(4, P, generator=g, dtype=torch.float64)).unbind()
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    loss = dpo_loss(a, b, rc, rr, beta=beta, backend=backend).loss
    ga, gb = torch.autograd.grad(loss, (a, b), create_graph=True)
    assert ga.requires_grad
    ((ga**2).sum() + (gb**2).sum()).backward()
    # The float64 formula: s = sigmoid(-u), dL/dpc = -beta s / P, d(s)/d(pc) = -beta s (1 - s).
    u = beta * ((pc - rc) - (pr - rr))
    s = torch.sigmoid(-u)
    g_pc = -beta * s / P
    torch.testing.assert_close(ga.detach(), g_pc)
    # penalty = 2 * sum g_pc^2; d/dpc = 4 g_pc * beta^2 s (1 - s) / P, and d/dpr the opposite
    expected = 4 * g_pc * beta**2 * s * (1 - s) / P
    torch.testing.assert_close(a.grad, expected)
    torch.testing.assert_close(b.grad, -expected)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_weighted_dpo_loss_double_backward(backend):
    """Per-pair weights (WPO): the loss is mean(w * l) + 0.5 * mean(w) * sft, so its second
    derivative is w times the pair loss's (not w**2), as plain autograd gives."""
    g = torch.Generator(torch.get_default_device()).manual_seed(2)
    P, beta = 6, 0.4
    pc, pr, rc, rr = (-30 * torch.rand(4, P, generator=g, dtype=torch.float64)).unbind()
    w = 0.1 + 3 * torch.rand(P, generator=g, dtype=torch.float64)
    nc = torch.randint(1, 9, (P,), generator=g).double()

    def naive(a, b):
        pair = -F.logsigmoid(beta * ((a - rc) - (b - rr)))
        return (w * pair).mean() + 0.5 * w.mean() * (-a.sum() / nc.sum())

    def ours(a, b):
        return dpo_loss(
            a, b, rc, rr, chosen_counts=nc, rejected_counts=nc, weights=w, beta=beta,
            loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], backend=backend,
        ).loss  # fmt: skip

    results = []
    for fn in (naive, ours):
        a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        loss = fn(a, b)
        ga, gb = torch.autograd.grad(loss, (a, b), create_graph=True)
        ((ga**2).sum() + (gb**2).sum()).backward()
        results.append((loss.detach(), ga.detach(), gb.detach(), a.grad, b.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)


def _naive_per_pair(kind, a, b, rc, rr, nc, nr, beta=0.1, eps=0.1, tau=0.05):
    """TRL's per-pair formulas as plain float64 autograd (double-differentiable)."""
    c, r = a - rc, b - rr
    u = beta * (c - r)
    if kind == "ipo":
        return (c / nc - r / nr - 1 / (2 * beta)) ** 2
    if kind == "sigmoid_norm":
        return -F.logsigmoid(beta * (c / nc - r / nr))
    if kind == "discopop":
        m = torch.sigmoid(u / tau)
        return -F.logsigmoid(u) * (1 - m) + torch.exp(-u) * m
    if kind == "aot":
        d = torch.sort(a - b)[0] - torch.sort(rc - rr)[0]
        return -F.logsigmoid(beta * d)
    assert kind == "exo_pair"
    return torch.sigmoid(u) * (F.logsigmoid(u) - math.log1p(-eps)) + torch.sigmoid(-u) * (
        F.logsigmoid(-u) - math.log(eps)
    )


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("kind", ["discopop", "ipo", "aot", "sigmoid_norm", "exo_pair"])
def test_dpo_loss_double_backward_matches_float64_autograd(kind, backend):
    """First derivatives taken with create_graph=True and the gradient of a penalty on them,
    against plain float64 autograd of TRL's formula (every backend recomputes this gradient
    through the same autograd path, so comparing backends with each other proves nothing);
    chosen and rejected counts differ, as do the pairs' log-ratios."""
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    P = 4
    pc, pr, rc, rr = (-30 * torch.rand(4, P, generator=g, dtype=torch.float64)).unbind()
    n = torch.tensor([3.0, 5.0, 2.0, 7.0], dtype=torch.float64)
    eps = 0.1 if kind == "exo_pair" else 0.0
    results = []
    for fn in ("naive", "ours"):
        a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        if fn == "naive":
            loss = _naive_per_pair(kind, a, b, rc, rr, n, n + 1).mean()
        else:
            loss = dpo_loss(
                a, b, rc, rr, chosen_counts=n, rejected_counts=n + 1, loss_type=kind,
                label_smoothing=eps, backend=backend,
            ).loss  # fmt: skip
        ga, gb = torch.autograd.grad(loss, (a, b), create_graph=True)
        ((ga**2).sum() + (gb**2).sum()).backward()
        results.append((loss.detach(), ga.detach(), gb.detach(), a.grad, b.grad))
    for got, want, what in zip(results[1], results[0], ("loss", "ga", "gb", "a", "b"),
                               strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12, msg=what)


def _closed_form_losses():
    """(name, fn(hidden, weight) -> loss) for every op whose backward hands out gradients made in
    the forward: the fused LM-head losses and the sibling losses from log-prob sums."""
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    P, T, V = 2, 5, 11
    y = torch.randint(0, V, (2 * P, T), generator=g)
    n = torch.full((2 * P,), float(T))
    ref = -30 * torch.rand(2 * P, generator=g)
    desirable = torch.tensor([True, False, True, False])

    def sums(h, w):  # [2P] log-prob sums through a differentiable plain-PyTorch head
        z = (h @ w.T).log_softmax(-1)
        return z.gather(-1, y.unsqueeze(-1)).squeeze(-1).sum(-1)

    def pair(fn, **kw):
        return lambda h, w, be: fn(*sums(h, w).chunk(2), backend=be, **kw).loss

    return {
        "linear_dpo_loss": lambda h, w, be: linear_dpo_loss(h, w, y, backend=be).loss,
        "linear_pair_loss": lambda h, w, be: linear_pair_loss(
            h, w, y, lambda c, r, nc, nr: -F.logsigmoid(c - r), backend=be
        )[0],
        "linear_cpo_loss": lambda h, w, be: linear_cpo_loss(h, w, y, backend=be).loss,
        "linear_simpo_loss": lambda h, w, be: linear_simpo_loss(h, w, y, backend=be).loss,
        "linear_orpo_loss": lambda h, w, be: linear_orpo_loss(h, w, y, backend=be).loss,
        "linear_kto_loss": lambda h, w, be: (
            linear_kto_loss(h, w, y, ref, desirable, kl=0.5, backend=be).loss
        ),
        "cpo_loss": pair(cpo_loss, chosen_counts=n[:P], rejected_counts=n[P:]),
        "simpo_loss": pair(simpo_loss, chosen_counts=n[:P], rejected_counts=n[P:]),
        "orpo_loss": pair(orpo_loss, chosen_counts=n[:P], rejected_counts=n[P:]),
        "kto_loss": lambda h, w, be: kto_loss(sums(h, w), ref, desirable, kl=0.5, backend=be).loss,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_closed_form_losses()))
def test_closed_form_double_backward_raises(name, backend):
    """A gradient penalty through an op whose gradients are made in the forward raises, by
    .backward() and by autograd.grad of an upstream parameter (they were constants to autograd:
    the penalty's term was silently dropped). The fused LM-head losses raise at the
    create_graph backward itself; the sibling losses give the usual first derivatives there
    (and stay differentiable in the incoming gradient: a double-VJP jvp is right)."""
    fn = _closed_form_losses()[name]
    g = torch.Generator(torch.get_default_device()).manual_seed(4)
    x0, t0 = torch.randn(4, 5, 6, generator=g), torch.randn(6, 6, generator=g)
    w0 = torch.randn(11, 6, generator=g)

    def loss(theta, w):  # hidden states from an upstream layer with parameters theta
        return fn(torch.tanh(x0 @ theta), w, backend)

    expect = torch.autograd.grad(loss(t0.requires_grad_(), w0.requires_grad_()), (t0, w0))
    t, w = t0.detach().requires_grad_(), w0.detach().requires_grad_()
    message = r"double backward .* is not supported"
    if name.startswith("linear_"):
        with pytest.raises(RuntimeError, match=message):
            torch.autograd.grad(loss(t, w), (t, w), create_graph=True)
        return
    gt, gw = torch.autograd.grad(loss(t, w), (t, w), create_graph=True)
    torch.testing.assert_close((gt.detach(), gw.detach()), expect)
    penalty = gt.square().sum() + gw.square().sum()
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(penalty, t, retain_graph=True)
    with pytest.raises(RuntimeError, match=message):
        penalty.backward()
    # d(vjp)/d(incoming gradient) needs no second derivative of the loss: a jvp by double vjp,
    # against a central difference in float64
    x0, t0, w0 = x0.double(), t0.detach().double(), w0.double()
    v = torch.randn(6, 6, generator=g, dtype=torch.float64)
    _, got = torch.autograd.functional.jvp(lambda th: loss(th, w0), (t0,), (v,))
    with torch.no_grad():
        want = (loss(t0 + 1e-6 * v, w0) - loss(t0 - 1e-6 * v, w0)) / 2e-6
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_closed_form_losses()))
def test_closed_form_losses_under_inference_mode(name, backend):
    """The same value under torch.inference_mode as under no_grad (the reference backend's
    sibling losses raised: autograd cannot record inference tensors)."""
    fn = _closed_form_losses()[name]
    g = torch.Generator(torch.get_default_device()).manual_seed(6)
    h, w = torch.randn(4, 5, 6, generator=g), torch.randn(11, 6, generator=g)
    with torch.no_grad():
        want = fn(h, w, backend)
    with torch.inference_mode():
        got = fn(h, w, backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_double_backward_raises(backend):
    z = torch.randn(1, 3, 5, requires_grad=True)
    out = sequence_logprobs(z, torch.randint(0, 5, (1, 3)), backend=backend)
    (gz,) = torch.autograd.grad(out.logps.sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gz.sum().backward()


# --------------------------------------------------------------------------------------------
# Row 5: narrow integer labels on every backend, including values that alias ignore_index.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8, torch.int32])
def test_narrow_label_dtypes(backend, dtype):
    V = 200 if dtype != torch.int8 else 120
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    x = torch.randn(2, 4, V, generator=g)
    y = torch.randint(0, V, (2, 4), generator=g)
    y[0, 0] = 156 if dtype == torch.uint8 else 7  # uint8 156 is -100 modulo 256: it counts
    if dtype == torch.int16:
        y[1, 3] = -100  # ignored
    out = sequence_logprobs(x, y.to(dtype), backend=backend)
    counted = y != -100
    ref = x.double().log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    ref = torch.where(counted, ref, 0.0).sum(-1)
    assert out.counts.tolist() == counted.sum(-1).tolist()
    torch.testing.assert_close(out.logps.double(), ref, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Row 6: a +inf logit at a non-label position gives log p = -inf on every backend.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_plus_inf_logit_gives_minus_inf(backend, dtype):
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 2, 3], [4, 5, 6]])
    x[0, 0, 3] = math.inf  # not the label
    x[1, 2, 0] = x[1, 2, 1] = math.inf  # two of them
    z = x.to(dtype).requires_grad_()
    out = sequence_logprobs(z, y, backend=backend)
    ref = x.to(dtype).double().log_softmax(-1).gather(-1, y[..., None])[..., 0]
    ref[0, 0] = ref[1, 2] = -math.inf  # float64 log_softmax gives NaN there; -inf is the limit
    assert torch.equal(out.token_logps.double().isinf(), ref.isinf())
    torch.testing.assert_close(out.token_logps.double(), ref, rtol=1e-6, atol=1e-6)
    assert out.logps.tolist() == [-math.inf, -math.inf]
    # Rows without an infinity keep their usual gradient.
    out.token_logps[:, 1].sum().backward()
    p = x.to(dtype).double().softmax(-1)
    expected = torch.nn.functional.one_hot(y[:, 1], 7) - p[:, 1]
    torch.testing.assert_close(z.grad[:, 1].double(), expected, atol=GRAD_TOL[dtype], rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_logit_linear(backend):
    """The fused LM head's logits overflow to +inf (bias +inf): the same -inf answer."""
    hidden = torch.randn(1, 3, 4)
    weight = torch.randn(6, 4)
    bias = torch.zeros(6)
    bias[2] = math.inf
    out = linear_sequence_logprobs(hidden, weight, torch.tensor([[0, 1, 5]]), bias=bias,
                                   backend=backend)  # fmt: skip
    assert out.token_logps.isneginf().all()


# --------------------------------------------------------------------------------------------
# Row 7: a policy sum of -inf gives the limit's finite gradient on every backend.


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_minus_inf_policy_sum_has_finite_gradient(backend):
    beta, P = 0.1, 2
    pc = torch.tensor([-math.inf, -3.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0, -5.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-3.0, -3.0], dtype=torch.float64)
    rr = torch.tensor([-3.0, -3.0], dtype=torch.float64)
    for kind in ("sigmoid", "hinge", "bco_pair", "apo_zero"):
        pc.grad = pr.grad = None
        out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, backend=backend)
        out.loss.backward()
        u = beta * ((pc.detach() - rc) - (pr.detach() - rr))
        c = beta * (pc.detach() - rc)
        r = beta * (pr.detach() - rr)
        if kind == "sigmoid":  # d softplus(-u) / du = -sigmoid(-u) -> -1
            d_pc, d_pr = -beta * torch.sigmoid(-u), beta * torch.sigmoid(-u)
        elif kind == "hinge":
            d_pc = -beta * (u < 1).double()
            d_pr = -d_pc
        elif kind == "bco_pair":
            d_pc, d_pr = -beta * torch.sigmoid(-c), beta * torch.sigmoid(r)
        else:  # apo_zero
            d_pc = -beta * torch.sigmoid(c) * torch.sigmoid(-c)
            d_pr = beta * torch.sigmoid(r) * torch.sigmoid(-r)
        assert out.loss.item() == math.inf or kind == "apo_zero", kind
        torch.testing.assert_close(pc.grad, d_pc / P, msg=f"{kind} {backend}")
        torch.testing.assert_close(pr.grad, d_pr / P, msg=f"{kind} {backend}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("offset", [30.0, 1e4, 1e6])
def test_error_bound_at_large_logits(backend, offset):
    """The documented precision at large logits (README, Reliability): a token's log-prob is
    z[label] - lse with the log-sum-exp rounded once to float32 (as CCE and Liger do), so its
    error is at most about one float32 ulp of max|z| (logits + offset, float32), and so is each
    probability's relative error in the gradient; a sum of T tokens within T of them."""
    B, T, V = 2, 64, 32
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) + offset).float()
    labels = torch.randint(0, V, (B, T), generator=g)
    x = logits.clone().requires_grad_()
    out = sequence_logprobs(x, labels, backend=backend)
    out.logps.sum().backward()
    lp64 = torch.log_softmax(logits.double(), -1)
    want = lp64.gather(-1, labels[..., None])[..., 0]
    ulp = torch.finfo(torch.float32).eps * logits.abs().max().item()
    tok_err = (out.token_logps.double() - want).abs().max().item()
    assert tok_err <= ulp, (tok_err, ulp)
    assert (out.logps.double() - want.sum(-1)).abs().max().item() <= T * ulp
    grad64 = torch.nn.functional.one_hot(labels, V).double() - lp64.exp()
    assert (x.grad.double() - grad64).abs().max().item() <= 2 * ulp + 1e-6


def test_forward_mode_ad_is_refused():
    """jvp / jacfwd / forward_ad dual tensors through a fused op raise, naming the argument
    (torch gave the custom ops' outputs a tangent of 0, silently)."""
    from torch.autograd import forward_ad
    from torch.func import jacfwd, jvp

    g = torch.Generator(torch.get_default_device()).manual_seed(7)
    z, h, w = (
        torch.randn(2, 3, 5, generator=g),
        torch.randn(2, 3, 4, generator=g),
        torch.randn(5, 4),
    )
    y, pc = torch.randint(0, 5, (2, 3), generator=g), -10 * torch.rand(2, generator=g)
    n = torch.full((2,), 3.0)
    calls = [
        (lambda z: sequence_logprobs(z, y).logps, z, "logits"),
        (lambda h: linear_sequence_logprobs(h, w, y).logps, h, "hidden"),
        (lambda w: linear_sequence_logprobs(h, w, y).logps, w, "weight"),
        (lambda h: linear_dpo_loss(h, w, y).loss, h, "hidden"),
        (lambda a: dpo_loss(a, pc - 1).loss, pc, "chosen_logps"),
        (lambda a: cpo_loss(pc, a, chosen_counts=n, rejected_counts=n).loss, pc, "rejected_logps"),
        (lambda a: kto_loss(a, pc, torch.tensor([True, False]), kl=0.0).loss, pc, "logps"),
        (lambda wt: dpo_loss(pc, pc - 1, weights=wt).loss, torch.ones(2), "weights"),
    ]
    for fn, x, name in calls:
        with pytest.raises(NotImplementedError, match=f"{name} carries a forward-mode tangent"):
            jvp(fn, (x,), (torch.ones_like(x),))
        with pytest.raises(NotImplementedError, match=name):
            jacfwd(fn)(x)
        with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=name):
            fn(forward_ad.make_dual(x, torch.ones_like(x)))
        with forward_ad.dual_level():  # a dual level without a tangent on our inputs is fine
            torch.testing.assert_close(fn(x), fn(x.clone()))


def test_no_autocast_on_devices_without_autocast():
    """The fused ops' autocast guard is a no-op where a device has no autocast (meta, lazy):
    torch.autocast(device_type="meta") raises."""
    with common.no_autocast(torch.empty(0, device="meta")):  # raised before
        pass
    cpu = torch.empty(0, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), common.no_autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("alpha", [0.1, -0.1])
def test_alphapo_reward_of_long_completions(backend, loss_type, alpha):
    """CPO's AlphaPO reward (1 - p^-alpha) / alpha on the summed log-probs of sigmoid / hinge:
    a sum below about -104 underflows exp(sum) in float32, and TRL's exp(sum).pow(-alpha) is then
    inf (alpha > 0) or has an infinite derivative (alpha < 0); p^-alpha = exp(-alpha * sum) is
    finite there. Every backend against float64 autograd of that form."""
    pc = torch.tensor([-150.0, -20.0, -130.0])
    pr = torch.tensor([-30.0, -120.0, -110.0])
    kw = dict(loss_type=loss_type, alpha=alpha, beta=0.1, cpo_alpha=0.5)
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = cpo_loss(a, b, chosen_counts=torch.ones(3), rejected_counts=torch.ones(3),
                   backend=backend, **kw)  # fmt: skip
    out.loss.backward()
    a64, b64 = pc.double().requires_grad_(), pr.double().requires_grad_()
    c, r = ((1 - torch.exp(-alpha * x)) / alpha for x in (a64, b64))
    u = 0.1 * (c - r)
    per = -F.logsigmoid(u) if loss_type == "sigmoid" else torch.relu(1 - u)
    loss64 = per.mean() - 0.5 * a64.sum() / 3
    loss64.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    torch.testing.assert_close(out.losses.double(), per.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), loss64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kto_kl_estimate_of_low_precision_sums(dtype):
    """kto_loss's KL estimate from bf16 / fp16 kl_logps: the difference and mean in float32, not
    rounded to the inputs' dtype (the mean of 6 sums rounded to bf16 was off by 2e-4 here, 100x
    the float32 computation; the loss with it)."""
    kl_logps = torch.tensor([-1.6, -4.54, -3.22, -3.63, -4.05, -4.07]).to(dtype)
    ref_kl = torch.tensor([-1.65, -5.34, -3.64, -3.47, -4.0, -3.54]).to(dtype)
    logps = torch.tensor([-3.07, -4.58, -1.68, -3.83, -5.26, -2.34]).to(dtype)
    ref = torch.tensor([-3.59, -4.88, -0.64, -2.32, -4.85, -2.29]).to(dtype)
    labels = torch.tensor([True, False, False, True, True, False])
    out = kto_loss(logps, ref, labels, kl_logps=kl_logps, ref_kl_logps=ref_kl, beta=3.0)
    kl64 = (kl_logps.double() - ref_kl.double()).mean().clamp(min=0)
    assert abs(out.metrics["kl"].item() - kl64.item()) < 1e-6
    x = logps.double() - ref.double()
    per = torch.where(labels, 1 - torch.sigmoid(3 * (x - kl64)), 1 - torch.sigmoid(3 * (kl64 - x)))
    torch.testing.assert_close(out.losses.double(), per, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_dpo_rewards_of_float64_sums_stay_float64(backend):
    """dpo_loss with float64 sums: the rewards and metrics in float64 like the loss (they were
    rounded to float32: 3e-7 off at rewards of 15)."""
    pc = torch.tensor([-152.123456789012, -3.5], dtype=torch.float64)
    pr = torch.tensor([-2.000000001, -7.25], dtype=torch.float64)
    rc = torch.tensor([-1.0000000003, -3.4], dtype=torch.float64)
    rr = torch.tensor([-2.5, -7.0], dtype=torch.float64)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, backend=backend)
    assert out.chosen_rewards.dtype == torch.float64
    assert torch.equal(out.chosen_rewards, 0.1 * (pc - rc))
    assert torch.equal(out.rejected_rewards, 0.1 * (pr - rr))
    margins = (0.1 * (pc - rc) - 0.1 * (pr - rr)).mean()
    assert out.metrics["rewards/margins"].item() == margins.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("softcap, scale", [(1e4, 1.0), (1e4, 100.0), (1e3, 0.5)])
def test_softcap_much_larger_than_the_logits(backend, dtype, softcap, scale):
    """z = c * tanh(x / c) with c >> |x| (a weak cap): Triton's tanh from exp, (1 - e) / (1 + e),
    lost its relative precision at small x / c, so the logits were off by ~c ulps (log-prob sums
    6e-4 off at c = 1e4, 0.1 with logit_scale 100, where naive float32 is 3e-6 and 2e-4 off).
    Log-probs and gradients against float64 and the naive computation in the same dtype."""
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    h = torch.randn(2, 8, 16, generator=g, dtype=torch.float64)
    w = torch.randn(64, 16, generator=g, dtype=torch.float64) * 0.2
    labels = torch.randint(0, 64, (2, 8), generator=g)
    gout = torch.randn(2, generator=g, dtype=torch.float64)

    def naive(h, w):
        z = scale * softcap * torch.tanh(h @ w.T / softcap)
        return torch.log_softmax(z, -1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)

    hr, wr = (t.to(dtype).double().requires_grad_() for t in (h, w))
    ref = naive(hr, wr)
    ref.backward(gout)
    hn, wn = (t.to(dtype).requires_grad_() for t in (h, w))
    nv = naive(hn, wn)
    nv.backward(gout.to(dtype))
    ho, wo = (t.to(dtype).requires_grad_() for t in (h, w))
    out = linear_sequence_logprobs(ho, wo, labels, softcap=softcap, logit_scale=scale,
                                   backend=backend)  # fmt: skip
    out.logps.backward(gout.to(out.logps.dtype))
    for ours, nai, r64 in ((out.logps, nv, ref), (ho.grad, hn.grad, hr.grad),
                           (wo.grad, wn.grad, wr.grad)):  # fmt: skip
        err = (ours.double() - r64.detach()).abs().max().item()
        naive_err = (nai.double() - r64.detach()).abs().max().item()
        tol = 8 * torch.finfo(dtype).eps * r64.detach().abs().max().item()
        assert err <= 4 * naive_err + tol, f"{err:.3g} > 4 x naive {naive_err:.3g}"


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize(
    "family, options",
    [
        ("dpo", dict(loss_type="hinge")),
        ("dpo", dict(loss_type="sigmoid", f_divergence_type="alpha_divergence")),
        ("dpo", dict(loss_type="hinge", f_divergence_type="forward_kl")),
        ("cpo", dict(loss_type="hinge", cpo_alpha=0.0)),
    ],
)
def test_nan_sum_gives_nan_loss_on_every_backend(backend, family, options):
    """A NaN policy sum (or a margin of inf - inf: forward_kl at log-ratios of -1e4 on both
    sides) makes that pair's loss NaN, as TRL's formulas do. Triton's tl.maximum / tl.minimum
    drop NaN by default: its hinge gave 0 for that pair (a finite batch loss) and its
    alpha-divergence clamp a finite 1e34."""
    pc = torch.tensor([float("nan"), -3.0, -1e4])
    pr = torch.tensor([-2.0, -4.0, -2e4])
    if family == "dpo":
        out = dpo_loss(pc, pr, beta=0.1, backend=backend, **options)
    else:
        out = cpo_loss(pc, pr, beta=0.1, backend=backend, **options)
    ref = (dpo_loss if family == "dpo" else cpo_loss)(
        pc.double(), pr.double(), beta=0.1, backend="reference", **options
    )
    assert torch.equal(out.losses.isnan(), ref.losses.isnan()), (out.losses, ref.losses)
    assert out.losses[0].isnan() and out.loss.isnan()
    torch.testing.assert_close(out.losses[1].double(), ref.losses[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_exo_pair_gradient_at_large_positive_margins(backend):
    """exo_pair's gradient qw * ql * (kl_w - kl_l) at margins u of 18 to 25: the Triton kernel
    took ql as 1 - sigmoid(u), which is 0 in float32 above u ~ 17, so the gradient was 0 there
    (the torch closed forms use sigmoid(-u)). Against float64 autograd of TRL's formula."""
    eps, beta = 0.3, 10.0
    margins = torch.tensor([1.8, 2.0, 2.2, 2.5], dtype=torch.float64)
    pr = torch.tensor([-10.0, -20.0, -30.0, -40.0], dtype=torch.float64)
    pc = pr + margins
    a, b = pc.float().requires_grad_(), pr.float().requires_grad_()
    out = dpo_loss(a, b, beta=beta, loss_type="exo_pair", label_smoothing=eps, backend=backend)
    out.loss.backward()
    a64, b64 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    u = beta * (a64 - b64)
    per = torch.sigmoid(u) * (F.logsigmoid(u) - math.log1p(-eps)) + torch.sigmoid(-u) * (
        F.logsigmoid(-u) - math.log(eps)
    )
    per.mean().backward()
    assert (a.grad != 0).all()
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=0)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=0)
