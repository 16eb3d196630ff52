"""Property-based tests: random shapes, dtypes, masks, strides and extreme logits, every backend
against the float64 reference, values and gradients."""

import pytest
import torch
from conftest import EPS32, GRAD_TOL, cpu_backends
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import dpo_kernels
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
    counted = reference.counted_tokens(labels, mask, -100)
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
    kinds = draw(
        st.lists(st.sampled_from(reference.LOSS_TYPES), min_size=1, max_size=3, unique=True)
    )
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
