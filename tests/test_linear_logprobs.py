"""linear_sequence_logprobs on every CPU-runnable backend vs float64 logits and the reference op."""

import pytest
import torch
from conftest import (
    GRAD_TOL,
    HAS_TRITON,
    assert_no_worse_than_naive,
    cpu_backends,
    data_check,
    poison_empty,
    record_calls,
)
from test_logprobs import fwd_tol

import dpo_kernels
from dpo_kernels import common, make_spec
from dpo_kernels.ops import cpu as cpu_ops
from dpo_kernels.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TRANSFORMS = {
    "plain": {},
    "scale+softcap+temperature": dict(logit_scale=0.8, softcap=5.0, temperature=0.7),
}


def _tile_settings():
    """(module, token tile attribute, vocab block attribute) of every tiled backend."""
    settings = [(cpu_ops, "LINEAR_TOKEN_TILE", "LINEAR_VOCAB_BLOCK")]
    if HAS_TRITON:
        from dpo_kernels.ops import triton_linear_logprobs

        settings.append((triton_linear_logprobs, "TOKEN_TILE", "VOCAB_BLOCK"))
    return settings


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 3 tokens x 16 vocabulary entries: small shapes cross several tiles and blocks."""
    for module, token_tile, vocab_block in _tile_settings():
        monkeypatch.setattr(module, token_tile, 3)
        monkeypatch.setattr(module, vocab_block, 16)


def make_inputs(B, T, H, V, dtype, bias=True, masked_frac=0.3):
    """hidden as a strided view (the causal slice), weight and bias scaled so logits are O(3)."""
    full = torch.randn(B, T + 1, H, dtype=torch.float64)
    hidden = full.to(dtype)[:, :-1]
    weight = (torch.randn(V, H, dtype=torch.float64) * (3 / H**0.5)).to(dtype)
    b = (torch.randn(V, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < masked_frac / 2] = -100
    mask = torch.rand(B, T) > masked_frac / 2
    return hidden, weight, b, labels, mask


def logits_of(hidden, weight, bias, logit_scale=1.0, softcap=None, temperature=1.0):
    """The transform written out, in the inputs' dtype: [B, T, V]."""
    x = hidden @ weight.T
    if bias is not None:
        x = x + bias
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x * logit_scale / temperature


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


def run_ours(backend, hidden, weight, bias, labels, mask, w_seq, w_tok, **kw):
    h, w, b = leaves(hidden, weight, bias)
    out = dpo_kernels.linear_sequence_logprobs(
        h, w, labels, bias=b, mask=mask, backend=backend, **kw
    )
    acc = out.logps.dtype
    ((out.logps * w_seq.to(acc)).sum() + (out.token_logps * w_tok.to(acc)).sum()).backward()
    return out, grads(h, w, b)


def run_materialized(hidden, weight, bias, labels, mask, w_seq, w_tok, upcast, **kw):
    """Logits materialized, then log-softmax: in float64 (upcast) or naively in the input dtype."""
    inputs = (hidden, weight, bias)
    h, w, b = leaves(*(t.double() if upcast and t is not None else t for t in inputs))
    z = logits_of(h, w, b, **kw)
    if upcast:
        tok = reference.logprobs_forward(z, labels, mask, None, -100)[0]
    else:
        counted = common.counted_tokens(labels, mask, -100)
        lp = z.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        tok = torch.where(counted, lp, 0)
    logps = tok.sum(-1)
    ((logps * w_seq.to(logps.dtype)).sum() + (tok * w_tok.to(tok.dtype)).sum()).backward()
    return logps.detach(), tok.detach(), z.detach(), grads(h, w, b)


def check_case(backend, hidden, weight, bias, labels, mask, **kw):
    B, T, _ = hidden.shape
    w_seq, w_tok = torch.randn(B, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    out, ours = run_ours(backend, hidden, weight, bias, labels, mask, w_seq, w_tok, **kw)
    ref_lp, ref_tok, z64, ref = run_materialized(
        hidden, weight, bias, labels, mask, w_seq, w_tok, upcast=True, **kw
    )
    naive_lp, naive_tok, _, naive = run_materialized(
        hidden, weight, bias, labels, mask, w_seq, w_tok, upcast=False, **kw
    )
    assert out.logps.dtype == common.acc_dtype(hidden.dtype)
    assert out.ref_logps is None and out.ref_token_logps is None
    assert torch.equal(out.counts, common.counted_tokens(labels, mask, -100).sum(-1))
    tol = fwd_tol(z64.to(hidden.dtype), T)
    assert_no_worse_than_naive(out.logps.detach(), naive_lp, ref_lp, tol, "logps")
    assert_no_worse_than_naive(out.token_logps.detach(), naive_tok, ref_tok, tol, "token_logps")
    for name, g, g_naive, g_ref, x in zip(
        ("hidden", "weight", "bias"), ours, naive, ref, (hidden, weight, bias), strict=True
    ):
        if x is None:
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, name
        gtol = 2 * GRAD_TOL[x.dtype] * g_ref.abs().max().item()
        assert_no_worse_than_naive(g, g_naive, g_ref, gtol, f"d{name}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_matches_reference(small_tiles, monkeypatch, backend, dtype, bias, transform):
    # 3-token tiles and 16-wide vocabulary blocks: V = 37 ends in a partial block. Fresh buffers
    # are NaN: dh and dw must be written by their first matmul before anything adds to them.
    poison_empty(monkeypatch)
    check_case(backend, *make_inputs(2, 7, 16, 37, dtype, bias), **TRANSFORMS[transform])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shipped_tiles_with_a_partial_vocab_block(backend, dtype):
    # The tile sizes the package ships with: three vocabulary blocks, the last one partial.
    block = max(getattr(m, attr) for m, _, attr in _tile_settings())
    inputs = make_inputs(2, 3, 32, 2 * block + 17, dtype)
    check_case(backend, *inputs, **TRANSFORMS["scale+softcap+temperature"])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gradcheck_float64(small_tiles, backend, transform):
    hidden, weight, bias, labels, mask = make_inputs(2, 3, 5, 19, torch.float64)
    w_tok = torch.randn(2, 3, dtype=torch.float64)

    def f(h, w, b):
        out = dpo_kernels.linear_sequence_logprobs(
            h, w, labels, bias=b, mask=mask, backend=backend, **TRANSFORMS[transform]
        )
        return out.logps, (out.token_logps * w_tok).sum()

    inputs = tuple(leaves(hidden, weight, bias))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph_matches_eager(backend):
    hidden, weight, bias, labels, mask = make_inputs(4, 5, 8, 50, torch.float32)

    def dpo_like(h, w, b):
        out = dpo_kernels.linear_sequence_logprobs(
            h, w, labels, bias=b, mask=mask, softcap=4.0, backend=backend
        )
        p = out.pairs()
        return -torch.nn.functional.logsigmoid(p.chosen_logps - p.rejected_logps).mean()

    torch._dynamo.reset()
    compiled = torch.compile(dpo_like, fullgraph=True)
    eager_in, comp_in = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    eager = dpo_like(*eager_in)
    comp = compiled(*comp_in)
    eager.backward()
    comp.backward()
    # The loss takes the difference of two sums of size ~20, each allowed an ulp or two (~2e-6)
    # of float32 rounding that differs between the compiled and eager graphs.
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-5)
    # The compiled logsigmoid's gradient may differ from eager's in the last bit; the matmuls of
    # the backward carry that into the input gradients.
    for got, want in zip(grads(*comp_in), grads(*eager_in), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_tokens_that_do_not_count_are_never_projected(small_tiles, backend):
    hidden, weight, bias, labels, mask = make_inputs(2, 6, 8, 20, torch.float32)
    labels[0, 2] = -100
    mask[1, 4] = False
    mask[1, 0] = True
    labels[1, 0] = 3
    hidden = hidden.clone()
    hidden[0, 2] = float("nan")  # not counted (ignore_index): never read
    hidden[1, 4] = float("inf")  # not counted (mask 0): never read
    h, w, b = leaves(hidden, weight, bias)
    out = dpo_kernels.linear_sequence_logprobs(h, w, labels, bias=b, mask=mask, backend=backend)
    assert torch.isfinite(out.logps).all()
    assert out.token_logps[0, 2] == 0 and out.token_logps[1, 4] == 0
    out.logps.sum().backward()
    assert torch.all(h.grad[0, 2] == 0) and torch.all(h.grad[1, 4] == 0)
    assert torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_nothing_counted_gives_zeros(backend):
    hidden, weight, bias, labels, _ = make_inputs(2, 3, 8, 20, torch.float32)
    h, w, b = leaves(hidden, weight, bias)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = dpo_kernels.linear_sequence_logprobs(h, w, labels, bias=b, mask=mask, backend=backend)
    assert torch.equal(out.logps, torch.zeros(2)) and torch.equal(out.counts, torch.zeros(2).long())
    out.logps.sum().backward()
    for g in (h.grad, w.grad, b.grad):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", cpu_backends())
def test_two_dimensional_hidden_is_one_sequence(backend):
    hidden, weight, bias, labels, mask = make_inputs(1, 9, 8, 30, torch.float32)
    flat = dpo_kernels.linear_sequence_logprobs(
        hidden[0], weight, labels[0], bias=bias, mask=mask[0], backend=backend
    )
    batched = dpo_kernels.linear_sequence_logprobs(
        hidden, weight, labels, bias=bias, mask=mask, backend=backend
    )
    assert flat.logps.shape == (1,) and flat.token_logps.shape == (1, 9)
    torch.testing.assert_close(flat.logps, batched.logps, rtol=0, atol=0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_inputs_get_no_gradient(small_tiles, backend, frozen):
    hidden, weight, bias, labels, mask = make_inputs(2, 5, 8, 37, torch.float32)
    h, w, b = leaves(hidden, weight, bias)
    (h if frozen == "hidden" else w).requires_grad_(False)
    kw = dict(bias=b, mask=mask, backend=backend)
    dpo_kernels.linear_sequence_logprobs(h, w, labels, **kw).logps.sum().backward()
    h2, w2, b2 = leaves(hidden, weight, bias)
    kw["bias"] = b2
    dpo_kernels.linear_sequence_logprobs(h2, w2, labels, **kw).logps.sum().backward()
    assert (h if frozen == "hidden" else w).grad is None
    for got, want in ((h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        if got is not None:
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
def test_bf16_weight_gradient_accumulates_in_float32(monkeypatch, backend):
    # 192 counted tokens. In 2-token tiles each weight entry sums 96 tile products: accumulated in
    # float32 and rounded once, that is within one bf16 rounding of a single 192-token tile; a bf16
    # running sum drifts by several roundings (about 2.5x this bound on these inputs).
    hidden, weight, _, labels, _ = make_inputs(4, 48, 8, 24, torch.bfloat16, masked_frac=0)

    def weight_grad(token_tile):
        for module, attr, _ in _tile_settings():
            monkeypatch.setattr(module, attr, token_tile)
        h, w = leaves(hidden, weight)
        dpo_kernels.linear_sequence_logprobs(h, w, labels, backend=backend).logps.sum().backward()
        assert w.grad.dtype == torch.bfloat16
        return w.grad.double()

    tiled, whole = weight_grad(2), weight_grad(192)
    assert (tiled - whole).abs().max() <= 2**-8 * whole.abs().max()


def test_cpu_tensors_run_the_cpp_kernels(monkeypatch):
    if not dpo_kernels.cpu_extension_available():
        pytest.skip("the C++ extension is not built")
    monkeypatch.delenv("DPO_KERNELS_BACKEND", raising=False)
    names = ("linear_logprobs_forward", "linear_logprobs_backward")
    calls = record_calls(monkeypatch, cpu_ops, *names)
    with torch.device("cpu"):  # (also where the suite runs on CUDA tensors)
        hidden, weight, _, labels, mask = make_inputs(2, 3, 8, 20, torch.float32)
        h, w = leaves(hidden, weight)
        dpo_kernels.linear_sequence_logprobs(h, w, labels, mask=mask).logps.sum().backward()
    assert calls == list(names)


def _bad_inputs():
    h, w, b, y, m = make_inputs(2, 3, 8, 20, torch.float32)
    big = y.clone()
    big[1, 2] = 20
    big_mask = torch.ones(2, 3, dtype=torch.bool)
    return [
        ("dtype mismatch", dict(weight=w.double()), TypeError, "hidden is torch.float32 but"),
        ("H mismatch", dict(weight=w[:, :7]), ValueError, "hidden has 8 features"),
        ("transposed weight", dict(weight=w.T), ValueError, "hidden has 8 features"),
        ("weight 1-D", dict(weight=w[0]), ValueError, "weight must be the LM head's"),
        ("weight 3-D", dict(weight=w[None]), ValueError, "weight must be the LM head's"),
        ("integer hidden", dict(hidden=y), TypeError, "hidden must be a floating-point"),
        ("hidden 4-D", dict(hidden=h[None]), ValueError, "hidden must be"),
        ("bias shape", dict(bias=b[:5]), ValueError, r"bias must have shape \(20,\)"),
        ("bias dtype", dict(bias=b.double()), TypeError, "bias is torch.float64"),
        ("label >= V", dict(labels=big, mask=big_mask), ValueError, r"labels\[1, 2\] = 20"),
        ("labels shape", dict(labels=y[:, :2]), ValueError, r"labels must have shape \(2, 3\)"),
        ("float labels", dict(labels=y.float()), TypeError, "labels must be an integer"),
        ("mask shape", dict(mask=m[:1]), ValueError, "mask must have the shape"),
        ("temperature 0", dict(temperature=0.0), ValueError, "temperature must be positive"),
        ("softcap <= 0", dict(softcap=-1.0), ValueError, "softcap must be a positive"),
        ("scale nan", dict(logit_scale=float("nan")), ValueError, "logit_scale must be a finite"),
    ], dict(hidden=h, weight=w, bias=b, labels=y, mask=m)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(i, id=c[0], marks=[data_check] if c[0] == "label >= V" else [])
        for i, c in enumerate(_bad_inputs()[0])
    ],
)
@pytest.mark.parametrize("backend", cpu_backends())
def test_bad_inputs_name_the_argument(backend, case):
    cases, good = _bad_inputs()
    _, change, exc, match = cases[case]
    args = good | change
    with pytest.raises(exc, match=match):
        dpo_kernels.linear_sequence_logprobs(
            args.pop("hidden"), args.pop("weight"), args.pop("labels"), backend=backend, **args
        )


STATS_TRANSFORMS = {
    "softcap": dict(softcap=20.0),
    "scale-temperature": dict(logit_scale=0.7, temperature=1.3),
    "all": dict(softcap=5.0, logit_scale=2.5, temperature=0.6),
}


@pytest.mark.parametrize("transform", list(STATS_TRANSFORMS))
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stats_match_the_logits_path(small_tiles, backend, dtype, transform):
    # Stats folded across vocabulary blocks (16 per block here) equal those of the materialized
    # float64 logits through the logits-path op, with each logit transform; a tie for the
    # maximum lands in two different blocks.
    tf = STATS_TRANSFORMS[transform]
    hidden, weight, bias, labels, mask = make_inputs(2, 5, 8, 40, dtype)
    weight[33] = weight[2]  # logits 2 and 33 tie in every row, in blocks 0 and 2
    if bias is not None:
        bias[33] = bias[2]
    labels[0, 1], mask[0, 1] = 33, True
    hidden[0, 1] = weight[2] * 50  # ... and are the maximum of that row: the label is not top-1
    out = dpo_kernels.linear_sequence_logprobs(
        hidden, weight, labels, bias=bias, mask=mask, stats=True, backend=backend, **tf
    )
    z = logits_of(hidden.double(), weight.double(), bias.double(), **tf)
    ref = dpo_kernels.sequence_logprobs(z, labels, mask=mask, stats=True, backend="reference")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for what in ("entropy", "mean_logits", "log_sum_sq"):
        a, b = getattr(out.stats, what), getattr(ref.stats, what)
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=what)
    assert torch.equal(out.stats.is_top1, ref.stats.is_top1)
    assert not out.stats.is_top1[0, 1]
    torch.testing.assert_close(out.logps.double(), ref.logps, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", cpu_backends())
def test_packed_hidden_equals_per_sequence(small_tiles, backend):
    hidden, weight, bias, labels, mask = make_inputs(1, 12, 8, 40, torch.float32)
    hidden = hidden[0].clone().requires_grad_()
    cu = torch.tensor([0, 4, 4, 9, 12], dtype=torch.int32)
    out = dpo_kernels.linear_sequence_logprobs(
        hidden, weight, labels[0], bias=bias, mask=mask[0], cu_seqlens=cu, backend=backend
    )
    out.logps.sum().backward()
    h2 = hidden.detach().clone().requires_grad_()
    sums = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        one = dpo_kernels.linear_sequence_logprobs(
            h2[a:b][None], weight, labels[0, a:b][None], bias=bias, mask=mask[0, a:b][None],
            backend=backend,
        )  # fmt: skip
        sums.append(one.logps[0])
    torch.stack(sums).sum().backward()
    torch.testing.assert_close(out.logps, torch.stack(sums).detach())
    torch.testing.assert_close(hidden.grad, h2.grad)
    counted = mask[0] & (labels[0] != -100)
    bounds = zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
    assert out.counts.tolist() == [int(counted[a:b].sum()) for a, b in bounds]


@pytest.mark.parametrize("backend", cpu_backends())
def test_autocast_leaves_the_fused_ops_alone(backend):
    """Under torch.autocast (bf16) the fused LM-head ops compute as without it: float32 inputs
    give float32 outputs and gradients, the same numbers (the reference backend's matmuls were
    autocast: logits rounded to bf16, outputs bf16, errors 5e-2)."""
    g = torch.Generator(torch.get_default_device()).manual_seed(5)
    P, T, H, V = 2, 4, 16, 37
    hidden, weight = torch.randn(2 * P, T, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    ops = {
        "logprobs": lambda h, w: (
            dpo_kernels.linear_sequence_logprobs(h, w, labels, backend=backend).logps
        ),
        "dpo": lambda h, w: dpo_kernels.linear_dpo_loss(h, w, labels, backend=backend).loss,
        "cpo": lambda h, w: dpo_kernels.linear_cpo_loss(h, w, labels, backend=backend).loss,
    }
    for name, op in ops.items():
        results = []
        for autocast in (False, True):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
                out = op(h, w)
            out.sum().backward()
            results.append((out.detach(), h.grad, w.grad))
        for plain, cast in zip(*results, strict=True):
            assert cast.dtype == torch.float32, name
            torch.testing.assert_close(cast, plain, rtol=1e-6, atol=1e-6, msg=name)


def _rounded_grads64(hidden, weight, bias, labels, mask, dtype, loss_of_sums):
    """Gradients of loss_of_sums(per-sequence sums) in float64, of hidden, weight and bias
    rounded to `dtype` first: what the fused ops give with compute_dtype=dtype, up to float32
    accumulation."""
    leaves = [t.detach().to(dtype).double().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = leaves
    lp = (h @ w.T + b).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    loss_of_sums(torch.where((labels != -100) & mask, lp, 0.0).sum(-1)).backward()
    return [t.grad for t in leaves]


def _assert_float32_grads(got, want, what):
    """Each gradient float32 (the inputs' dtype, not the compute dtype) and within float32
    accumulation of the float64 one (bf16 / fp16 rounding of a gradient: 4e-3 / 5e-4)."""
    for g, ref, name in zip(got, want, "hwb", strict=True):
        assert g.dtype == torch.float32, (what, name, g.dtype)
        err = ((g.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, (what, name, err)


def _linear_losses(labels, mask, backend):
    """(name, fused op(hidden, weight, bias, **kw) -> loss, the same loss of float64 sums):
    the token log-probs op, the linear_dpo op and a LinearLossFunction sibling (CPO)."""
    P = labels.shape[0] // 2
    n = ((labels != -100) & mask).sum(-1)
    coef = torch.linspace(-1.0, 2.0, labels.shape[0])
    return [
        ("logprobs", lambda h, w, b, **kw: (dpo_kernels.linear_sequence_logprobs(
            h, w, labels, bias=b, mask=mask, backend=backend, **kw).logps * coef).sum(),
         lambda s: (s * coef.double()).sum()),
        ("dpo", lambda h, w, b, **kw: dpo_kernels.linear_dpo_loss(
            h, w, labels, bias=b, mask=mask, beta=0.5, backend=backend, **kw).loss,
         lambda s: dpo_kernels.dpo_loss(s[:P], s[P:], beta=0.5, backend="reference").loss),
        ("cpo", lambda h, w, b, **kw: dpo_kernels.linear_cpo_loss(
            h, w, labels, bias=b, mask=mask, beta=0.5, backend=backend, **kw).loss,
         lambda s: dpo_kernels.cpo_loss(s[:P], s[P:], chosen_counts=n[:P],
                                        rejected_counts=n[P:], beta=0.5).loss),
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_compute_dtype_rounds_the_inputs_not_the_gradients(backend, dtype):
    """compute_dtype: float32 hidden, weight and bias go into the matmuls rounded to it, cast
    inside the op, and their gradients come back in float32 from the float32 accumulators, as
    float64 gives them on the rounded inputs (cast before the op, autograd hands them back
    rounded to the compute dtype: errors of 2e-3 in bf16). A hidden given in the compute dtype
    (as some models' final norm returns it) next to a float32 head gets its gradient in it."""
    hidden, weight, bias, labels, mask = make_inputs(4, 5, 16, 37, torch.float32)
    for name, op, of_sums in _linear_losses(labels, mask, backend):
        h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        op(h, w, b, compute_dtype=dtype).backward()
        want = _rounded_grads64(hidden, weight, bias, labels, mask, dtype, of_sums)
        _assert_float32_grads((h.grad, w.grad, b.grad), want, name)
    h, w = hidden.to(dtype).requires_grad_(), weight.clone().requires_grad_()
    dpo_kernels.linear_sequence_logprobs(
        h, w, labels, mask=mask, compute_dtype=dtype, backend=backend
    ).logps.sum().backward()
    assert (h.grad.dtype, w.grad.dtype) == (dtype, torch.float32)
    with pytest.raises(TypeError, match="compute_dtype must be None or a floating-point dtype"):
        dpo_kernels.linear_sequence_logprobs(h, w, labels, compute_dtype=torch.int32)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_head_under_autocast_keeps_float32_gradients(backend):
    """The fused LM head under bf16 autocast with a float32 head (TRL's bf16=True on a float32
    model): each route (log-probs, the DPO loss fused in the head, a sibling's loss) gives the
    head's and the hidden states' gradients in float32, as float64 gives them on the
    bf16-rounded inputs (the head's inputs were cast to bf16 before the ops, and the gradients
    came back rounded to bf16: errors of 1.5e-3 to 3e-3 here; stock TRL's head keeps them in
    float32)."""
    from dpo_kernels.fused_head import DPOHead, HeadCall, _run_head
    from dpo_kernels.linear_preference_losses import _linear_cpo

    hidden, weight, bias, labels, mask = make_inputs(4, 5, 16, 37, torch.float32)
    full = torch.cat([hidden, torch.randn(4, 1, 16)], 1)  # the backbone's output, every position
    head = torch.nn.Linear(16, 37)
    with torch.no_grad():
        head.weight.copy_(weight), head.bias.copy_(bias)
    P = labels.shape[0] // 2
    n = ((labels != -100) & mask).sum(-1)

    def cpo(h, w, b, y, m, transform):
        return _linear_cpo(h, w, y, bias=b, mask=m, beta=0.5, backend=backend, **transform)

    calls = [
        ("logprobs", HeadCall(labels, mask, backend=backend), lambda out: out.logps.sum(),
         lambda s: s.sum()),
        ("dpo", HeadCall(labels, mask, backend=backend, dpo=DPOHead(make_spec(beta=0.5))),
         lambda out: out.loss.loss,
         lambda s: dpo_kernels.dpo_loss(s[:P], s[P:], beta=0.5, backend="reference").loss),
        ("cpo", HeadCall(labels, mask, backend=backend, loss=cpo), lambda out: out[0].loss,
         lambda s: dpo_kernels.cpo_loss(s[:P], s[P:], chosen_counts=n[:P],
                                        rejected_counts=n[P:], beta=0.5).loss),
    ]  # fmt: skip
    tf = {"logit_scale": 1.0, "softcap": None}
    for name, call, loss_of, of_sums in calls:
        head.zero_grad(set_to_none=True)
        h = full.detach().clone().requires_grad_()
        with torch.autocast(h.device.type, dtype=torch.bfloat16):
            out = _run_head(head, h[:, :-1], call, tf, h)
        loss_of(out).backward()
        want = _rounded_grads64(hidden, weight, bias, labels, mask, torch.bfloat16, of_sums)
        _assert_float32_grads((h.grad[:, :-1], head.weight.grad, head.bias.grad), want, name)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_head_leaves_a_float64_head_alone_under_autocast(backend):
    """autocast does not cast float64: a float64 head and hidden states under bf16 autocast give
    the head's own float64 log-probs (the fused head cast them to bf16 before: off by 6e-3)."""
    from dpo_kernels.fused_head import HeadCall, _run_head

    hidden, weight, bias, labels, mask = make_inputs(4, 5, 16, 37, torch.float64)
    head = torch.nn.Linear(16, 37, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight), head.bias.copy_(bias)
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        want = head(hidden)  # the model's own logits: float64, not cast
        out = _run_head(head, hidden, HeadCall(labels, mask, backend=backend),
                        {"logit_scale": 1.0, "softcap": None}, hidden)  # fmt: skip
    assert want.dtype == torch.float64
    lp = want.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref = torch.where((labels != -100) & mask, lp, 0.0).sum(-1)
    torch.testing.assert_close(out.logps, ref, rtol=1e-12, atol=1e-12)


def test_fused_matmuls_run_with_autocast_off(monkeypatch):
    """The chunk runner's matmuls (project, backprop) run with autocast off: the CUDA route's
    float32-result matmuls are autocast-eligible ops, which autocast would recast."""
    from dpo_kernels import linear_dpo_rows

    seen = []
    device = torch.get_default_device().type
    for name in ("project", "backprop"):
        original = getattr(linear_dpo_rows.Rows, name)

        def spy(self, *args, _original=original, **kwargs):
            seen.append(torch.is_autocast_enabled(device))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(linear_dpo_rows.Rows, name, spy)
    h, w = torch.randn(4, 3, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        dpo_kernels.linear_dpo_loss(
            h, w, torch.randint(0, 11, (4, 3)), backend="cpu" if device == "cpu" else "triton"
        )
    assert seen and not any(seen)


@pytest.mark.parametrize("sync_free", [False, True], ids=["gathered", "every-row"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_custom_ops_fake_match_real_on_strided_inputs(backend, sync_free, monkeypatch):
    """torch.library.opcheck of the forward and backward ops with hidden T-major or H-major
    and the weight column-major: the fake implementations (what torch.compile plans with) must
    give the real outputs' shapes, dtypes and strides (inductor failed in the backward when they
    did not), with the counted rows gathered and in sync-free mode (every row, as a view of the
    input in its layout)."""
    from dpo_kernels import backend as backend_module

    monkeypatch.setattr(backend_module, "_SYNC_FREE", sync_free)
    B, T, H, V = 2, 3, 8, 11
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(H, V, generator=g).t()
    bias = torch.randn(2 * V, generator=g)[::2]
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    tf = common.LogitTransform(1.0, None, 1.0).pack()
    t_major = torch.randn(T, B, H, generator=g).transpose(0, 1)
    h_major = torch.randn(H, B, T, generator=g).permute(1, 2, 0)  # rows a view, H-stride B * T
    # (compute_dtype: the matmuls' dtype, the inputs cast to it inside the ops)
    for hidden, dt in ((t_major, None), (h_major, None), (h_major, torch.bfloat16)):
        fwd = (hidden, weight, bias, labels, mask, -100, tf, False, dt, backend)
        torch.library.opcheck(torch.ops.dpo_kernels.linear_token_logprobs.default, fwd)
        lse = torch.ops.dpo_kernels.linear_token_logprobs.default(*fwd)[1]
        grad = torch.randn(B, T, generator=g)
        bwd = (grad, hidden, weight, bias, labels, mask, lse, -100, tf, True, True, True, dt,
               backend)  # fmt: skip
        torch.library.opcheck(torch.ops.dpo_kernels.linear_token_logprobs_backward.default, bwd)
