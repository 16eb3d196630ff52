"""Property-based tests: random shapes, dtypes, masks, strides and extreme logits, every backend
against the float64 reference, values and gradients."""

import pytest
import torch
from conftest import EPS32, GRAD_TOL, cpu_backends
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import dpo_kernels
from dpo_kernels import common
from dpo_kernels.ops import reference

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
# Fewer examples for the Triton interpreter, which runs each program in Python.
EXAMPLES = {"reference": 60, "cpu": 150, "triton": 25}


@st.composite
def logprob_cases(draw, max_v=3000):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 6))
    V = draw(st.integers(1, max_v))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    scale = draw(st.sampled_from([1.0, 10.0, 1e3]))
    mask_kind = draw(st.sampled_from(["none", "random", "all_masked_row", "all_counted"]))
    layout = draw(st.sampled_from(["contiguous", "causal_slice", "transposed", "vocab_strided"]))
    neg_inf = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, T, V, dtype, scale, mask_kind, layout, neg_inf, seed


def build(B, T, V, dtype, scale, mask_kind, layout, neg_inf, seed):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    dt = DTYPES[dtype]
    if dt == torch.float16:
        scale = min(scale, 1e3)
    base = torch.randn(B, T + 1, 2 * V, generator=g, dtype=torch.float64) * scale
    if neg_inf and V > 1:
        base[torch.rand(base.shape, generator=g) < 0.2] = float("-inf")
    base = base.to(dt)
    logits = {
        "contiguous": base[:, :T, :V].contiguous(),
        "causal_slice": base[:, :-1, :V],
        "transposed": base[:, :T, :V].transpose(0, 1).contiguous().transpose(0, 1),
        "vocab_strided": base[:, :T, ::2],
    }[layout]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = -100
    if neg_inf:  # a counted label on an infinite logit gives -inf / NaN sums; keep them finite
        finite = torch.isfinite(logits.double()).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        labels[~finite] = -100
    mask = None
    if mask_kind == "random":
        mask = torch.rand(B, T, generator=g) < 0.7
    elif mask_kind == "all_masked_row":
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0] = False
    elif mask_kind == "all_counted":
        labels = labels.clamp(min=0)
    return logits, labels, mask


def check(backend, logits, labels, mask):
    B, T, _ = logits.shape
    z = logits.detach().clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, mask=mask, stats=True, backend=backend)
    z64 = logits.detach().double().requires_grad_()
    ref, counts = reference.sequence_logprobs(z64, labels, mask)
    assert torch.equal(out.counts, counts)
    finite = torch.isfinite(ref)
    eps = 2.3e-16 if logits.dtype == torch.float64 else EPS32
    scale = max(1.0, logits.double().nan_to_num(0, 0, 0).abs().max().item())
    tol = 16 * eps * T * scale + 1e-12
    assert torch.equal(torch.isfinite(out.logps), finite)
    err = (out.logps.double() - ref).abs()[finite]
    assert err.numel() == 0 or err.max().item() <= tol
    w = torch.randn(B, dtype=torch.float64)
    (out.logps * w.to(out.logps.dtype)).sum().backward()
    (ref * w).sum().backward()
    # p = exp(z - lse) carries a relative error of eps * |z - lse|: it grows with the logits' scale.
    g_tol = (4 * GRAD_TOL[logits.dtype] + 8 * eps * scale) * w.abs().max().item() + 1e-12
    assert z.grad.dtype == logits.dtype
    err = (z.grad.double() - z64.grad).abs()
    assert err.nan_to_num(0).max().item() <= g_tol and not torch.isnan(err).any()
    counted = common.counted_tokens(labels, mask, -100)
    assert torch.all(z.grad[~counted] == 0)  # tokens that do not count get exactly zero


@pytest.mark.parametrize("backend", cpu_backends())
def test_logprobs_properties(backend):
    max_v = 3000 if backend != "triton" else 600

    @settings(
        max_examples=EXAMPLES[backend],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
    @given(logprob_cases(max_v))
    @example((1, 1, 1, "fp32", 1.0, "none", "contiguous", False, 0))  # V=1: every log-prob is 0
    @example((2, 3, 2, "bf16", 1e3, "all_masked_row", "vocab_strided", True, 1))
    @example((1, 2, 5, "fp16", 1e3, "random", "causal_slice", True, 7))
    # Found by hypothesis: an all -inf row that does not count made the reference's gradient NaN.
    @example((2, 2, 2, "bf16", 1.0, "none", "contiguous", True, 1))
    def run(case):
        logits, labels, mask = build(*case)
        assume(logits.shape[-1] >= 1)
        check(backend, logits, labels, mask)

    run()


@st.composite
def loss_cases(draw):
    P = draw(st.integers(1, 12))
    kinds = draw(st.lists(st.sampled_from(common.LOSS_TYPES), min_size=1, max_size=3, unique=True))
    weights = [draw(st.floats(0.1, 2.0)) for _ in kinds]
    beta = draw(st.sampled_from([0.01, 0.1, 0.5, 2.0]))
    eps = draw(st.sampled_from([0.0, 0.1, 0.3])) if "exo_pair" not in kinds else 0.1
    spread = draw(st.sampled_from([0.1, 5.0, 50.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return P, kinds, weights, beta, eps, spread, seed


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
def test_loss_properties(backend):
    @settings(max_examples=80, deadline=None, derandomize=True)
    @given(loss_cases())
    def run(case):
        P, kinds, weights, beta, eps, spread, seed = case
        g = torch.Generator(torch.get_default_device()).manual_seed(seed)
        pc, pr = -50 * torch.rand(2, P, generator=g, dtype=torch.float64)
        rc = pc + spread * torch.randn(P, generator=g, dtype=torch.float64)
        rr = pr + spread * torch.randn(P, generator=g, dtype=torch.float64)
        nc, nr = torch.randint(0, 30, (2, P), generator=g).double()
        spec = dpo_kernels.make_spec(
            beta=beta, loss_type=kinds, loss_weights=weights, label_smoothing=eps
        )
        res = []
        for name in (backend, "reference"):
            a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
            out = dpo_kernels.dpo_loss(
                a, b, rc, rr, chosen_counts=nc, rejected_counts=nr, spec=spec, backend=name
            )
            out.loss.backward()
            zero = torch.zeros_like(pc)
            res.append((out.loss, a.grad, zero if b.grad is None else b.grad))
        (l1, a1, b1), (l2, a2, b2) = res
        assert torch.isfinite(l1) == torch.isfinite(l2)
        torch.testing.assert_close(l1, l2, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a1, a2, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(b1, b2, rtol=1e-8, atol=1e-12)

    run()


# --------------------------------------------------------------------------------------------
# Every backend against every other on the same inputs, extreme values included: +-inf, +-1e30,
# denormals, NaN, extreme hyper-parameters. Where the answer is not finite, all must give the same
# infinity or NaN; elsewhere the same number up to rounding.


def assert_agree(a, b, rtol, atol, what):
    """Elementwise: NaN where the other is NaN, the same infinities, close finite values."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, what
    assert torch.equal(a.isnan(), b.isnan()), (what, a, b)
    inf = a.isinf() | b.isinf()
    assert torch.equal(a[inf], b[inf]), (what, a, b)
    fin = torch.isfinite(a) & torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _specials(dtype):
    tiny = torch.finfo(DTYPES[dtype]).tiny
    return [
        float("inf"), float("-inf"), float("nan"), 1e30, -1e30, tiny / 4, -tiny / 4, 0.0,
    ]  # fmt: skip


@st.composite
def extreme_logit_cases(draw, max_v=40):
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, 3))
    V = draw(st.integers(1, max_v))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    scale = draw(st.sampled_from([1.0, 1e3, 1e30]))
    specials = draw(st.lists(st.sampled_from(_specials(dtype)), min_size=1, max_size=3))
    frac = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, T, V, dtype, scale, specials, frac, seed


def build_extreme(B, T, V, dtype, scale, specials, frac, seed):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    x = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    pick = torch.randint(0, len(specials), x.shape, generator=g)
    where = torch.rand(x.shape, generator=g) < frac
    x = torch.where(where, torch.tensor(specials, dtype=torch.float64)[pick], x)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.25] = -100
    return x.to(DTYPES[dtype]), labels


def _logprob_results(backend, logits, labels, w):
    z = logits.clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, stats=True, backend=backend)
    (out.token_logps * w.to(out.token_logps.dtype)).sum().backward()
    return out, z.grad


@pytest.mark.parametrize("other", [b for b in cpu_backends() if b != "reference"])
def test_logprobs_backends_agree_on_extreme_values(other):
    @settings(
        max_examples=40 if other == "triton" else 120,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
    @given(extreme_logit_cases())
    def run(case):
        logits, labels = build_extreme(*case)
        B, T, V = logits.shape
        w = torch.randn(B, T, dtype=torch.float64)
        ref, ref_grad = _logprob_results("reference", logits, labels, w)
        out, grad = _logprob_results(other, logits, labels, w)
        finite = logits.double()[torch.isfinite(logits.double())]
        scale = max(1.0, finite.abs().max().item() if finite.numel() else 1.0)
        eps = torch.finfo(common.acc_dtype(logits.dtype)).eps
        tol = 16 * eps * scale * V * T
        assert torch.equal(out.counts, ref.counts)
        assert_agree(out.token_logps, ref.token_logps, 1e-5, tol, f"token_logps {case}")
        assert_agree(out.logps, ref.logps, 1e-5, tol, f"logps {case}")
        assert_agree(out.stats.entropy, ref.stats.entropy, 1e-5, tol, f"entropy {case}")
        assert_agree(out.stats.mean_logits, ref.stats.mean_logits, 1e-5, tol, f"mean {case}")
        assert torch.equal(out.stats.is_top1, ref.stats.is_top1), case
        sq, ref_sq = out.stats.log_sum_sq, ref.stats.log_sum_sq
        assert_agree(sq, ref_sq, 1e-5, tol, f"log_sum_sq {case}")
        assert grad.dtype == logits.dtype
        g_tol = (4 * GRAD_TOL[logits.dtype] + 8 * eps * scale) * w.abs().max().item()
        assert_agree(grad, ref_grad, 0, g_tol, f"grad {case}")

    run()


@st.composite
def extreme_loss_cases(draw):
    P = draw(st.integers(1, 6))
    kinds = draw(st.lists(st.sampled_from(common.LOSS_TYPES), min_size=1, max_size=3, unique=True))
    weights = [draw(st.sampled_from([0.5, 1.0, 3.0])) for _ in kinds]
    beta = draw(st.sampled_from([1e-9, 1e-3, 0.1, 2.0, 1e6]))
    eps = draw(st.sampled_from([0.0, 1e-3, 0.1, 0.49]))
    if "exo_pair" in kinds and eps == 0.0:
        eps = 1e-3
    fdiv = "reverse_kl"
    if set(kinds) <= common.loss_types_where("f_divergence"):
        fdiv = draw(st.sampled_from(common.F_DIVERGENCES))
    alpha = draw(st.sampled_from([-1.0, 0.5, 0.999, 2.0]))
    tau = draw(st.sampled_from([1e-3, 0.05, 1.0, 20.0]))
    values = draw(st.sampled_from(["moderate", "large", "specials"]))
    dtype = draw(st.sampled_from(["fp64", "fp32"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return P, kinds, weights, beta, eps, fdiv, alpha, tau, values, dtype, seed


def build_loss_inputs(P, values, dtype, seed):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    x = -50 * torch.rand(4, P, generator=g, dtype=torch.float64)
    if values == "large":
        x = x * 200 + 1e4 * torch.randn(4, P, generator=g, dtype=torch.float64)
    elif values == "specials":
        tiny = torch.finfo(DTYPES[dtype]).tiny / 4
        specials = torch.tensor(
            [float("inf"), float("-inf"), 1e30, -1e30, tiny, 0.0], dtype=torch.float64
        )
        pick = torch.randint(0, len(specials), x.shape, generator=g)
        x = torch.where(torch.rand(x.shape, generator=g) < 0.3, specials[pick], x)
    n = torch.randint(0, 30, (2, P), generator=g).double()
    return (*x.to(DTYPES[dtype]), *n)


@pytest.mark.parametrize("other", [b for b in cpu_backends() if b != "reference"])
def test_loss_backends_agree_on_extreme_values(other):
    @settings(
        max_examples=40 if other == "triton" else 100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
    @given(extreme_loss_cases())
    def run(case):
        P, kinds, weights, beta, eps, fdiv, alpha, tau, values, dtype, seed = case
        pc, pr, rc, rr, nc, nr = build_loss_inputs(P, values, dtype, seed)
        spec = dpo_kernels.make_spec(
            beta=beta, loss_type=kinds, loss_weights=weights, label_smoothing=eps,
            f_divergence_type=fdiv, f_alpha_divergence_coef=alpha, discopop_tau=tau,
        )  # fmt: skip
        res = []
        for name in ("reference", other):
            a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
            out = dpo_kernels.dpo_loss(
                a, b, rc, rr, chosen_counts=nc, rejected_counts=nr, spec=spec, backend=name
            )
            out.loss.backward()
            gb = torch.zeros_like(pr) if b.grad is None else b.grad
            res.append((out.loss, out.losses, a.grad, gb))
        eps_d = torch.finfo(pc.dtype).eps
        finite = torch.cat([t[torch.isfinite(t)] for t in (pc, pr, rc, rr)]).double()
        scale = max(1.0, finite.abs().max().item() if finite.numel() else 1.0)
        rtol, atol = 64 * eps_d, 64 * eps_d * scale
        (loss, losses, d_pc, d_pr), (o_loss, o_losses, o_pc, o_pr) = res
        assert_agree(o_loss, loss, rtol, atol, f"loss {case}")
        assert_agree(o_losses, losses, rtol, atol, f"losses {case}")
        # Where a pair's loss overflows (inf, or NaN from inf - inf), its gradient is a limit of
        # overflowed terms and is not specified; elsewhere it must agree.
        ok = torch.isfinite(losses)
        assert_agree(o_pc[ok], d_pc[ok], rtol, atol, f"d_pc {case}")
        assert_agree(o_pr[ok], d_pr[ok], rtol, atol, f"d_pr {case}")

    run()


@st.composite
def extreme_linear_cases(draw):
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    H, V = draw(st.integers(1, 8)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    scale = draw(st.sampled_from([1.0, 30.0, 1e3]))
    softcap = draw(st.sampled_from([None, 1e-3, 30.0, 1e6]))
    temperature = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    logit_scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, T, H, V, dtype, scale, softcap, temperature, logit_scale, bias, seed


@pytest.mark.parametrize("other", [b for b in cpu_backends() if b != "reference"])
def test_linear_backends_agree_on_extreme_transforms(other):
    @settings(
        max_examples=30 if other == "triton" else 100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
    @given(extreme_linear_cases())
    def run(case):
        B, T, H, V, dtype, scale, softcap, temperature, logit_scale, has_bias, seed = case
        g = torch.Generator(torch.get_default_device()).manual_seed(seed)
        dt = DTYPES[dtype]
        h = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale).to(dt)
        w = torch.randn(V, H, generator=g, dtype=torch.float64).to(dt)
        b = torch.randn(V, generator=g, dtype=torch.float64).to(dt) if has_bias else None
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[torch.rand(B, T, generator=g) < 0.25] = -100
        kw = dict(softcap=softcap, temperature=temperature, logit_scale=logit_scale, stats=True)
        wt = torch.randn(B, T, dtype=torch.float64)
        res = []
        for name in ("reference", other):
            leaves = [None if t is None else t.clone().requires_grad_() for t in (h, w, b)]
            out = dpo_kernels.linear_sequence_logprobs(
                leaves[0], leaves[1], labels, bias=leaves[2], backend=name, **kw
            )
            (out.token_logps * wt.to(out.token_logps.dtype)).sum().backward()
            res.append((out, [None if t is None else t.grad for t in leaves]))
        (ref, ref_grads), (out, grads) = res
        # Bound on the logits' error: the projection in another order, times logit_scale / T.
        eps = torch.finfo(common.acc_dtype(dt)).eps
        x = h.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
        factor = logit_scale / temperature
        zmax = x.max().item() * factor if softcap is None else softcap * factor
        ztol = 8 * eps * H * (x.max().item() + 1) * factor + 8 * eps * zmax
        tol = 4 * ztol * T + 1e-12
        assert torch.equal(out.counts, ref.counts)
        assert_agree(out.token_logps, ref.token_logps, 1e-5, tol, f"token_logps {case}")
        assert_agree(out.stats.entropy, ref.stats.entropy, 1e-5, 4 * tol * V, f"entropy {case}")
        assert_agree(out.stats.mean_logits, ref.stats.mean_logits, 1e-5, tol, f"mean {case}")
        sq, ref_sq = out.stats.log_sum_sq, ref.stats.log_sum_sq
        assert_agree(sq, ref_sq, 1e-5, 4 * tol * V, f"log_sum_sq {case}")
        for name, gr, go in zip(("hidden", "weight", "bias"), ref_grads, grads, strict=True):
            if gr is None:
                continue
            g_tol = (8 * GRAD_TOL[dt] + 4 * ztol) * max(1.0, gr.abs().max().item()) * V * T
            assert_agree(go, gr, 0, g_tol, f"d{name} {case}")

    run()
