"""linear_dpo_loss against a float64 reference: naive logits + log_softmax + the DPO loss.

Values within 1e-5 and gradients of hidden, weight and bias within 1e-4 (relative to their
largest entry) in float32, for every loss type, every route (chunks of pairs, a pair larger than
the budget, the two-pass route of the sorting losses) and every backend that runs on CPU (Triton
through the interpreter).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_DEVICE, cpu_backends, poison_empty

import dpo_kernels
from dpo_kernels import dpo_loss, linear_dpo_loss, linear_pair_loss, make_spec
from dpo_kernels.common import LOSS_TYPES

P, T, H, V = 3, 9, 16, 61  # odd lengths everywhere


def make_batch(P=P, T=T, H=H, V=V, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    hidden = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    # A prompt of a different length in every row; an ignore_index token and a masked one.
    mask = torch.ones(2 * P, T, dtype=torch.bool)
    for r in range(2 * P):
        mask[r, : 1 + r % 4] = False
    labels[1, T - 1] = -100
    labels[P + 1, T // 2] = -100
    mask[0, T - 2] = False
    ref_c = torch.randn(P, generator=g, dtype=torch.float64).to(torch.float32) * 3 - 40
    ref_r = torch.randn(P, generator=g, dtype=torch.float64).to(torch.float32) * 3 - 40
    return hidden, weight, b, labels, mask, ref_c, ref_r


def reference64(hidden, weight, bias, labels, mask, ref_c, ref_r, ignore_index=-100,
                logit_scale=1.0, softcap=None, temperature=1.0, chosen_counts=None,
                rejected_counts=None, **loss):  # fmt: skip
    """(loss, per-pair losses, dh, dW, db) in float64 with plain autograd."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    x = h @ w.T + (0 if b is None else b)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    z = logit_scale * x / temperature
    counted = (labels != ignore_index) & mask
    logp = F.log_softmax(z, -1).gather(-1, torch.where(counted, labels, 0)[..., None])[..., 0]
    sums = torch.where(counted, logp, 0.0).sum(-1)
    counts = counted.sum(-1)
    n = hidden.shape[0] // 2
    rc = None if ref_c is None else ref_c.double()
    rr = None if ref_r is None else ref_r.double()
    nc = counts[:n] if chosen_counts is None else chosen_counts
    nr = counts[n:] if rejected_counts is None else rejected_counts
    out = dpo_loss(sums[:n], sums[n:], rc, rr, chosen_counts=nc, rejected_counts=nr,
                   backend="reference", **loss)  # fmt: skip
    out.loss.backward()
    return out, h.grad, w.grad, None if b is None else b.grad


def run(hidden, weight, bias, labels, mask, ref_c, ref_r, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = linear_dpo_loss(h, w, labels, bias=b, mask=mask, ref_chosen_logps=ref_c,
                          ref_rejected_logps=ref_r, **kw)  # fmt: skip
    out.loss.backward()
    return out, h.grad, w.grad, None if b is None else b.grad


def assert_close(ours, ref, tol, what):
    scale = max(1.0, ref.abs().max().item()) if ref.dim() == 0 else ref.abs().max().item()
    err = (ours.double() - ref).abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: error {err:.3g} (scale {scale:.3g})"


def check(batch, loss_tol=1e-5, grad_tol=1e-4, **kw):
    bias, labels, mask = batch[2], batch[3], batch[4]
    opts = {k: v for k, v in kw.items() if k not in ("memory_budget", "backend")}
    ref, dh64, dw64, db64 = reference64(*batch, **opts)
    out, dh, dw, db = run(*batch, **kw)
    assert_close(out.loss, ref.loss, loss_tol, "loss")
    assert_close(out.losses, ref.losses, loss_tol, "per-pair losses")
    assert_close(out.chosen_rewards, ref.chosen_rewards, loss_tol, "chosen rewards")
    for key, value in ref.metrics.items():
        assert_close(out.metrics[key], value, loss_tol, key)
    assert_close(dh, dh64, grad_tol, "hidden grad")
    assert_close(dw, dw64, grad_tol, "weight grad")
    if bias is not None:
        assert_close(db, db64, grad_tol, "bias grad")
    # Tokens that do not count get exactly zero gradient.
    counted = (labels != -100) & mask
    assert torch.equal(dh[~counted], torch.zeros_like(dh[~counted]))
    return out


def loss_options(kind):
    extra = {"label_smoothing": 0.1} if kind in ("exo_pair", "robust", "aot") else {}
    return {"loss_type": kind, "beta": 0.3, **extra}


ONE_PAIR = 2 * T * V * 4  # bytes of the float32 logits of one pair (at most)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_every_loss_type(kind, backend):
    # A budget of two pairs: chunks of 2 and 1 pairs (P = 3).
    check(make_batch(), **loss_options(kind), memory_budget=2 * ONE_PAIR, backend=backend)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "sft", "aot_unpaired"])
def test_budget_smaller_than_one_pair(kind):
    # 40 logits of budget: tiles of a few tokens x part of the vocabulary, with recompute.
    check(make_batch(), **loss_options(kind), memory_budget=160)


@pytest.mark.parametrize("budget", [1, 200 * 4, ONE_PAIR, 10**9])
def test_any_budget_same_result(monkeypatch, budget):
    # Fresh buffers are NaN: the first pass over the vocabulary must write dw (and each tile's
    # first vocabulary block its dh), never add to what the allocator left.
    poison_empty(monkeypatch)
    batch = make_batch()
    check(batch, memory_budget=budget)


def test_projection_in_vocabulary_blocks():
    # H = 4096: the C++ projection (csrc/vocab_blocked_mm.cpp) cuts V = 300 into blocks of 64
    # rows of the head, the last one short, spread over the threads.
    check(make_batch(H=4096, V=300))


def test_mix_of_losses_reference_free_without_bias():
    batch = make_batch(bias=False)
    batch = (*batch[:5], None, None)
    check(batch, loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[1.0, 0.5, 0.2],
          memory_budget=ONE_PAIR)  # fmt: skip


@pytest.mark.parametrize("kind", ["sigmoid", "aot"])
def test_softcap_scale_temperature(kind):
    check(make_batch(), **loss_options(kind), logit_scale=1.7, softcap=3.0, temperature=0.8,
          memory_budget=ONE_PAIR)  # fmt: skip


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("kind", ["ipo", "sigmoid_norm"])
def test_given_counts_replace_the_counted_tokens(kind, backend):
    """chosen_counts / rejected_counts (TRL's unshifted completion lengths, FusedDPOTrainer
    passes them) are what the averaged losses divide by, not the counted tokens."""
    from dpo_kernels.linear_dpo import linear_dpo

    batch = make_batch()
    hidden, weight, bias, labels, mask, rc, rr = batch
    counted = ((labels != -100) & mask).sum(-1)
    nc, nr = counted[:P] + torch.tensor([1, 3, 2]), counted[P:] + torch.tensor([2, 1, 4])
    opts = loss_options(kind)
    ref, dh64, dw64, db64 = reference64(*batch, chosen_counts=nc, rejected_counts=nr, **opts)
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    out = linear_dpo(h, w, labels, spec=make_spec(**opts), bias=b, mask=mask,
                     ref_chosen_logps=rc, ref_rejected_logps=rr, chosen_counts=nc,
                     rejected_counts=nr, memory_budget=2 * ONE_PAIR,
                     backend=backend).loss  # fmt: skip
    out.loss.backward()
    assert_close(out.loss, ref.loss, 1e-5, "loss")
    assert_close(out.losses, ref.losses, 1e-5, "per-pair losses")
    for got, want, what in ((h.grad, dh64, "hidden"), (w.grad, dw64, "weight"),
                            (b.grad, db64, "bias")):  # fmt: skip
        assert_close(got, want, 1e-4, f"{what} grad")


def test_f_divergence_and_other_ignore_index():
    hidden, weight, bias, labels, mask, rc, rr = make_batch()
    labels = torch.where(labels == -100, 7777, labels)
    check((hidden, weight, bias, labels, mask, rc, rr), f_divergence_type="js_divergence",
          ignore_index=7777, memory_budget=ONE_PAIR)  # fmt: skip


@pytest.mark.parametrize("kind", ["sigmoid", "aot", "sft"])
def test_triton_interpreter(kind):
    pytest.importorskip("triton")
    batch = make_batch(P=2, T=5, H=8, V=37)
    check(batch, **loss_options(kind), softcap=4.0, memory_budget=5 * 37 * 4, backend="triton")


def test_bfloat16_within_naive_error():
    hidden, weight, bias, labels, mask, rc, rr = make_batch(dtype=torch.bfloat16)
    ref, dh64, dw64, _ = reference64(hidden, weight, bias, labels, mask, rc, rr)
    out, dh, dw, _ = run(hidden, weight, bias, labels, mask, rc, rr, memory_budget=ONE_PAIR)
    assert out.loss.dtype == torch.float32 and dh.dtype == torch.bfloat16
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    assert_close(dh, dh64, 2**-7, "hidden grad")
    assert_close(dw, dw64, 2**-7, "weight grad")


def test_gradcheck_float64():
    hidden, weight, bias, labels, mask, rc, rr = make_batch(P=2, T=4, H=5, V=11)
    args = [t.double().requires_grad_() for t in (hidden, weight, bias)]

    def f(h, w, b):
        return linear_dpo_loss(h, w, labels, bias=b, mask=mask, ref_chosen_logps=rc.double(),
                               ref_rejected_logps=rr.double(), softcap=2.0,
                               memory_budget=4 * 11 * 8).loss  # fmt: skip

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_torch_compile_fullgraph_matches_eager(backend):
    """linear_dpo_loss is the `dpo_kernels::linear_dpo` custom op: a whole DPO step from hidden
    states compiles without a graph break, and matches eager and the float64 reference."""
    batch = make_batch()
    hidden, weight, bias, labels, mask, rc, rr = batch

    def step(h, w, b):
        out = linear_dpo_loss(h, w, labels, bias=b, mask=mask, ref_chosen_logps=rc,
                              ref_rejected_logps=rr, loss_type="sigmoid", beta=0.3,
                              softcap=3.0, memory_budget=ONE_PAIR, backend=backend)  # fmt: skip
        return 2.0 * out.loss + out.chosen_rewards.sum()  # an incoming gradient other than 1

    def leaves():
        return [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_in, comp_in = leaves(), leaves()
    eager, comp = step(*eager_in), compiled(*comp_in)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
    ref, dh64, dw64, db64 = reference64(*batch, loss_type="sigmoid", beta=0.3, softcap=3.0)
    assert_close(comp, 2.0 * ref.loss + ref.chosen_rewards.sum(), 1e-5, "compiled value")
    for got, want, name in zip([t.grad for t in comp_in], (dh64, dw64, db64), "hwb", strict=True):
        assert_close(got, 2.0 * want, 1e-4, f"compiled grad of {name}")


def test_custom_op_schema_fake_and_autograd():
    """torch.library.opcheck: the op's schema, its fake implementation (shapes and dtypes of all
    ten outputs, with and without stats and gradients) and its autograd registration."""
    hidden, weight, bias, labels, mask, rc, rr = make_batch(P=2, T=5, H=6, V=13)
    counts = ((labels != -100) & mask).sum(-1).float()
    spec = make_spec(0.2, "sigmoid", None, 0.0, "reverse_kl", 0.5, 0.05).pack()
    backend = "cpu" if TEST_DEVICE == "cpu" and dpo_kernels.cpu_extension_available() else "triton"
    for stats, wants, dt in ((False, [True, True, True], None),
                             (True, [True, False, False], None),
                             (False, [True, True, True], torch.bfloat16)):  # fmt: skip
        args = (hidden.requires_grad_(wants[0]), weight.requires_grad_(wants[1]),
                bias.requires_grad_(wants[2]), labels, mask, -100, rc, rr, counts[:2], counts[2:],
                *spec, [1.0, 0.0, 1.0], 2 * 5 * 13 * 4, backend, wants, stats, dt)  # fmt: skip
        torch.library.opcheck(torch.ops.dpo_kernels.linear_dpo.default, args)


def test_backward_allocates_nothing_head_sized():
    """The op's other outputs carry no gradient: the backward must not make zeros for them (the
    weight gradient's output alone is the size of the head), only scale what the forward made."""
    batch = make_batch(V=4001)
    hidden, weight, bias, labels, mask, rc, rr = batch
    w = weight.clone().requires_grad_()
    out = linear_dpo_loss(hidden.requires_grad_(), w, labels, bias=bias, mask=mask,
                          ref_chosen_logps=rc, ref_rejected_logps=rr)  # fmt: skip
    with torch.profiler.profile(profile_memory=True) as prof:
        (3.0 * out.loss).backward()
    allocated = sum(
        max(e.cpu_memory_usage, 0) for e in prof.events() if e.name.startswith("aten::")
    )
    assert allocated < weight.numel() * weight.element_size() / 4, allocated
    _, _, dw64, _ = reference64(*batch)
    assert_close(w.grad, 3.0 * dw64, 1e-4, "weight grad")


def test_incoming_gradient_scales_and_frozen_weight():
    hidden, weight, bias, labels, mask, rc, rr = make_batch()
    h = hidden.clone().requires_grad_()
    out = linear_dpo_loss(h, weight, labels, bias=bias, mask=mask, ref_chosen_logps=rc,
                          ref_rejected_logps=rr)  # fmt: skip
    (out.loss * 2.5).backward(retain_graph=True)
    _, dh64, _, _ = reference64(hidden, weight, bias, labels, mask, rc, rr)
    assert_close(h.grad, 2.5 * dh64, 1e-4, "scaled hidden grad")
    out.loss.backward()  # a retained graph: scaled relative to the first call
    assert_close(h.grad, 3.5 * dh64, 1e-4, "accumulated hidden grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retained_graph_backward_calls_accumulate(dtype):
    """Three backward calls through a retained graph (incoming 2, 3, 1), the weight's .grad
    zeroed in place after the first: each call adds its own scale times the gradient, none
    sees the others' (float32 is scaled in place, bf16 rounded into a new tensor; .grad must
    not share the saved gradient's storage, or the zeroing and autograd's += reach it)."""
    hidden, weight, bias, labels, mask, rc, rr = make_batch()
    _, dh64, dw64, _ = reference64(hidden, weight, bias, labels, mask, rc, rr)
    h, w = (t.clone().to(dtype).requires_grad_() for t in (hidden, weight))
    out = linear_dpo_loss(h, w, labels, bias=bias.to(dtype), mask=mask, ref_chosen_logps=rc,
                          ref_rejected_logps=rr)  # fmt: skip
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    (out.loss * 2.0).backward(retain_graph=True)
    w.grad.zero_()
    (out.loss * 3.0).backward(retain_graph=True)
    out.loss.backward()
    assert_close(h.grad.double(), 6.0 * dh64, tol, "hidden grad")
    assert_close(w.grad.double(), 4.0 * dw64, tol, "weight grad")


def test_retained_graph_through_views_of_leaves():
    """hidden = x.view(...) and weight = w_t.t(): each view's backward gives AccumulateGrad a
    view of the gradient the op returned, which becomes .grad without a copy. Through a retained
    graph that gradient must not be the op's saved one: the next backward's += (or a zeroing
    through .data) wrote it ("modified by an inplace operation" on the third call, a zero
    gradient after .data.zero_())."""
    hidden, weight, bias, labels, mask, rc, rr = make_batch()
    _, dh64, dw64, _ = reference64(hidden, weight, bias, labels, mask, rc, rr)
    x = hidden.detach().reshape(-1, hidden.shape[-1]).clone().requires_grad_()
    w_t = weight.detach().t().clone().requires_grad_()
    out = linear_dpo_loss(x.view(hidden.shape), w_t.t(), labels, bias=bias, mask=mask,
                          ref_chosen_logps=rc, ref_rejected_logps=rr)  # fmt: skip
    for k in (1.0, 2.0, -0.5):
        (out.loss * k).backward(retain_graph=True)
    assert_close(x.grad.double(), 2.5 * dh64.reshape(x.shape), 1e-4, "hidden grad")
    assert_close(w_t.grad.double(), 2.5 * dw64.t(), 1e-4, "weight grad")
    x.grad.data.zero_()
    w_t.grad = None
    out.loss.backward()  # the last call: the graph is freed, the gradients handed out in place
    assert_close(x.grad.double(), dh64.reshape(x.shape), 1e-4, "hidden grad after .data zeroing")
    assert_close(w_t.grad.double(), dw64.t(), 1e-4, "weight grad after a new .grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_backward_scale_in_blocks(dtype, monkeypatch):
    """The CPU backward's scale of a kept float32 gradient: rounded to the input's dtype from
    float32 products made a block at a time (a ragged last block), in place for float32."""
    from dpo_kernels import linear_dpo_chunks

    monkeypatch.setattr(linear_dpo_chunks, "_CAST_BLOCK", 1000)
    g = torch.randn(7, 357)
    for s in (1.0, 0.37, 65536.0):
        got = linear_dpo_chunks._scaled(g.clone(), torch.tensor(s), dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got, (g * s).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_tensors_forward_and_backward(dtype):
    """Shapes only (meta tensors, as a model built on the meta device sees them): the loss and
    the inputs' gradients in their shapes and dtypes, the backward's scale taken out of place
    (it read the incoming gradient's value on the host: `.item()` on a meta tensor raised)."""
    h = torch.empty(4, 6, 8, dtype=dtype, device="meta", requires_grad=True)
    w = torch.empty(11, 8, dtype=dtype, device="meta", requires_grad=True)
    b = torch.empty(11, dtype=dtype, device="meta", requires_grad=True)
    out = linear_dpo_loss(h, w, torch.zeros(4, 6, dtype=torch.long, device="meta"), bias=b,
                          backend="reference")  # fmt: skip
    (out.loss * 2).backward()
    for t in (h, w, b):
        assert t.grad.device.type == "meta" and t.grad.shape == t.shape and t.grad.dtype == dtype


def test_no_positions():
    """T = 0 (hidden with no storage of its own): nothing counted, the loss at zero margins."""
    out = linear_dpo_loss(torch.randn(4, 0, 8), torch.randn(13, 8),
                          torch.zeros(4, 0, dtype=torch.long))  # fmt: skip
    assert out.loss.item() == pytest.approx(math.log(2))


def scaled_fp16_grads(batch, loss, scale, **kw):
    """(hidden, weight) gradients of `loss` ("dpo": linear_dpo_loss at beta 3e-5; "pair":
    linear_pair_loss of 3e-6 * (pr - pc)) times `scale`, float16 inputs; and float64's."""
    hidden, weight, bias, labels, mask, rc, rr = batch

    def pair(pc, pr, nc, nr):
        return 3e-6 * (pr - pc)

    out = []
    for dtype in (torch.float16, torch.float64):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight))
        b = bias.to(dtype)
        if loss == "dpo":
            value = linear_dpo_loss(h, w, labels, bias=b, mask=mask, ref_chosen_logps=rc,
                                    ref_rejected_logps=rr, beta=3e-5, **kw).loss  # fmt: skip
        else:
            value = linear_pair_loss(h, w, labels, pair, bias=b, mask=mask, **kw)[0]
        (value * (scale if dtype == torch.float16 else 1.0)).backward()
        out.append((h.grad, w.grad))
    return out


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("loss", ["dpo", "pair"])
def test_float16_gradients_at_a_grad_scalers_scale(backend, loss):
    """float16 inputs, the loss times 65536 (torch.amp.GradScaler's initial scale, inf in
    float16) and a small loss factor (|dz| ~ 1e-7, float16's subnormals, as for many pairs at a
    small beta): the gradients made in the forward are kept in float32 and rounded once after
    the incoming scale, so they are as precise as float16 allows at that scale (kept in float16
    at scale 1 they sat in its subnormals: off by percents), and finite."""
    batch = make_batch(dtype=torch.float16)
    (dh, dw), (dh64, dw64) = scaled_fp16_grads(batch, loss, 65536.0, backend=backend)
    for ours, ref in ((dh, dh64), (dw, dw64)):
        assert ours.dtype == torch.float16 and ours.isfinite().all()
        assert ref.abs().max() < 2**-14  # unscaled: in float16's subnormals
        err = (ours.double() / 65536 - ref).norm() / ref.norm()
        assert err < 1e-3, err  # float16's rounding: 2^-11 relative


@pytest.mark.parametrize("programs", [1024, 3])
@pytest.mark.parametrize(
    "dtype, out",
    [(torch.bfloat16, None), (torch.float16, None), (torch.float32, None),
     (torch.float64, None), (torch.float32, torch.bfloat16), (torch.float32, torch.float16)],
)  # fmt: skip
def test_scale_kernel(dtype, out, programs, monkeypatch):
    """The CUDA backward's multiplication by the incoming gradient (ops/triton_scale.py, run by
    the interpreter here): x * s, s in the accumulation dtype (65536, a GradScaler's scale, is
    inf in float16), rounded once to the output's dtype: in place (x untouched when s is 1), or
    from float32 into a new bf16/fp16 tensor (x untouched); a ragged end, and a program per
    block or fewer programs than blocks (each then strides over several)."""
    pytest.importorskip("triton")
    from dpo_kernels.ops import triton_scale

    monkeypatch.setattr(triton_scale, "_PROGRAMS", programs)
    x = (torch.randn(3 * 4096 + 5, dtype=torch.float64) * 100).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = x / 1e3 if torch.float16 in (dtype, out) else x  # x * 65536 in float16's range
    to = out or dtype
    for s in (1.0, 2.5, 0.0, -1e-3, float("nan"), float("inf"), 65536.0):
        sv = torch.tensor([s], dtype=acc)
        before = x.clone()
        got = triton_scale.scale(before, sv, out)
        assert got.dtype == to and (got is before) == (out is None)
        if out is not None:
            torch.testing.assert_close(before, x, rtol=0, atol=0, equal_nan=True)  # untouched
        want = x if s == 1 and out is None else (x.to(acc) * sv).to(to)
        # The interpreter rounds float32 -> bf16 toward zero (numpy has no bf16): 1 ulp there.
        ulp = 2**-7 if to == torch.bfloat16 and TEST_DEVICE == "cpu" else 0.0
        torch.testing.assert_close(got, want, rtol=ulp, atol=0, equal_nan=True, msg=str(s))


def test_no_grad_gives_the_loss():
    batch = make_batch()
    ref = reference64(*batch)[0]
    hidden, weight, bias, labels, mask, rc, rr = batch
    with torch.no_grad():
        out = linear_dpo_loss(hidden, weight, labels, bias=bias, mask=mask,
                              ref_chosen_logps=rc, ref_rejected_logps=rr)  # fmt: skip
    assert_close(out.loss, ref.loss, 1e-5, "loss")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"hidden": torch.zeros(3, T, H)}, ValueError, r"\[2P, T, H\]"),
        ({"memory_budget": 0}, ValueError, "memory_budget"),
        ({"ref_chosen_logps": torch.zeros(P + 1)}, ValueError, "ref_chosen_logps"),
        ({"ref_rejected_logps": None}, ValueError, "both"),
        ({"loss_type": "nope"}, ValueError, "loss_type"),
    ],
)
def test_bad_input(change, error, match):
    hidden, weight, bias, labels, mask, rc, rr = make_batch()
    kw = {"hidden": hidden, "bias": bias, "mask": mask, "ref_chosen_logps": rc,
          "ref_rejected_logps": rr, **change}  # fmt: skip
    h = kw.pop("hidden")
    lab = labels if h.shape[0] == labels.shape[0] else labels[: h.shape[0]]
    kw["mask"] = mask[: h.shape[0]]
    with pytest.raises(error, match=match):
        linear_dpo_loss(h, weight, lab, **kw)


@pytest.mark.parametrize(
    ("kind", "budget", "passes"),
    [("sigmoid", 2 * ONE_PAIR, 1), ("sft", ONE_PAIR, 1), ("sigmoid", 300, 2), ("aot", 10**9, 2)],
)
def test_logits_projected_once_within_budget(monkeypatch, kind, budget, passes):
    """The 3-matmul route projects every counted token's logits once; the recompute routes (a
    pair over the budget, the sorting losses) twice. No projection exceeds the budget."""
    from dpo_kernels import linear_dpo_rows

    seen = []
    project = linear_dpo_rows.Rows.project

    def spy(self, x, *args):
        seen.append(x.shape)
        return project(self, x, *args)

    monkeypatch.setattr(linear_dpo_rows.Rows, "project", spy)
    batch = make_batch()
    check(batch, **loss_options(kind), memory_budget=budget)
    labels, mask = batch[3], batch[4]
    counted = int(((labels != -100) & mask).sum())
    assert sum(n * nv for n, nv in seen) == passes * counted * V
    assert max(n * nv for n, nv in seen) * 4 <= budget


def test_strided_hidden():
    """hidden[:, :-1] of a causal LM's output: gradients in the right rows, none in the last."""
    hidden, weight, bias, labels, mask, rc, rr = make_batch()
    full = torch.cat([hidden, torch.randn(2 * P, 1, H)], 1).requires_grad_()
    out = linear_dpo_loss(full[:, :-1], weight, labels, bias=bias, mask=mask, ref_chosen_logps=rc,
                          ref_rejected_logps=rr, memory_budget=ONE_PAIR)  # fmt: skip
    out.loss.backward()
    _, dh64, _, _ = reference64(hidden, weight, bias, labels, mask, rc, rr)
    assert_close(full.grad[:, :-1], dh64, 1e-4, "hidden grad")
    assert torch.equal(full.grad[:, -1], torch.zeros(2 * P, H))


@pytest.mark.parametrize("layout", ["time-major", "hidden-major", "one-row-expanded"])
def test_hidden_in_any_layout(layout):
    """The rows of the counted tokens are read by the storage's strides (one index_select over
    its rows where they allow, a gather otherwise): loss and gradients as for a contiguous
    batch, whatever the layout."""
    hidden, weight, bias, labels, mask, rc, rr = make_batch()
    if layout == "one-row-expanded":  # every row the same hidden states (stride 0 over rows)
        hidden = hidden[:1].expand(2 * P, -1, -1)
    ref, dh64, dw64, _ = reference64(hidden, weight, bias, labels, mask, rc, rr)
    base = hidden.detach().clone()
    if layout == "time-major":  # [T, 2P, H] storage: rows T apart is not a row stride
        base = base.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "hidden-major":  # H not the innermost dimension
        base = base.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    else:
        base = base[:1].expand(2 * P, -1, -1)
    leaf = base.detach().requires_grad_() if layout != "one-row-expanded" else None
    h = leaf if leaf is not None else hidden.detach()
    w = weight.clone().requires_grad_()
    out = linear_dpo_loss(h, w, labels, bias=bias, mask=mask, ref_chosen_logps=rc,
                          ref_rejected_logps=rr, memory_budget=ONE_PAIR)  # fmt: skip
    out.loss.backward()
    assert_close(out.loss, ref.loss, 1e-5, "loss")
    assert_close(w.grad, dw64, 1e-4, "weight grad")
    if leaf is not None:
        assert_close(leaf.grad, dh64, 1e-4, "hidden grad")


@pytest.mark.parametrize("backend", cpu_backends())
def test_pair_without_counted_tokens(backend):
    """A pair whose chosen and rejected rows count no token (all prompt): sums of 0, no gradient
    in its rows, the other pairs unaffected."""
    batch = make_batch(P=2, T=5, H=8, V=37)
    mask = batch[4].clone()
    mask[0] = False
    mask[2] = False
    batch = (*batch[:4], mask, *batch[5:])
    check(batch, loss_type=["sigmoid", "ipo"], memory_budget=6 * 37 * 4, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("budget", [2 * ONE_PAIR, 300])  # chunks of pairs; tiles with recompute
@pytest.mark.parametrize("transform", [False, True], ids=["identity", "softcap"])
def test_logprobs_and_stats_of_the_same_pass(backend, budget, transform):
    """`linear_dpo(stats=True)`: per-token log-probs, entropy, mean logit, top-1 flags and
    log sum_v p_v^2 against float64 formulas on the logits, with softcap and scale; a tie for the
    maximum (two equal weight rows) resolves to the first index."""
    from dpo_kernels import make_spec
    from dpo_kernels.linear_dpo import linear_dpo

    hidden, weight, bias, labels, mask, rc, rr = make_batch()
    weight[7] = weight[3]
    bias[7] = bias[3] = 6.0  # the argmax of most tokens
    labels[0, 5], labels[P, 6] = 7, 3  # whichever is the argmax, one of them ties
    opts = dict(logit_scale=1.5, softcap=4.0, temperature=0.8) if transform else {}
    hidden.requires_grad_(), weight.requires_grad_()  # the gradient route folds the stats
    out = linear_dpo(hidden, weight, labels, spec=make_spec(beta=0.2), bias=bias, mask=mask,
                     ref_chosen_logps=rc, ref_rejected_logps=rr, stats=True, memory_budget=budget,
                     backend=backend, **opts)  # fmt: skip
    x = hidden.detach().double() @ weight.detach().double().T + bias.double()
    z = 1.5 * 4.0 * torch.tanh(x / 4.0) / 0.8 if transform else x
    logp = z.log_softmax(-1)
    counted = (labels != -100) & mask
    tok = torch.where(counted, logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    p = logp.exp()
    want = {
        "entropy": -(p * logp).sum(-1),
        "mean_logits": z.mean(-1),
        "log_sum_sq": (p * p).sum(-1).log(),
    }
    lp = out.logprobs
    torch.testing.assert_close(lp.token_logps.double(), tok, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.logps.double(), tok.sum(-1), atol=1e-4, rtol=1e-5)
    assert torch.equal(lp.counts, counted.sum(-1))
    for name, ref in want.items():
        got = getattr(lp.stats, name).double()
        torch.testing.assert_close(got[counted], ref[counted], atol=1e-5, rtol=1e-5)
        assert bool((got[~counted] == 0).all())
    top1 = (z.argmax(-1) == labels) & counted
    assert bool(top1[0, 5] != top1[P, 6])  # label 7 loses the tie, label 3 wins it
    assert torch.equal(lp.stats.is_top1, top1)
    ref, dh64, dw64, _ = reference64(hidden, weight, bias, labels, mask, rc, rr, beta=0.2, **opts)
    torch.testing.assert_close(out.loss.loss.double(), ref.loss, atol=1e-5, rtol=1e-5)
    out.loss.loss.backward()
    for got, want in ((hidden.grad, dh64), (weight.grad, dw64)):
        assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize(
    ("kind", "budget"), [("cpo", 2 * ONE_PAIR), ("simpo", 2 * ONE_PAIR), ("cpo", 300)]
)
def test_linear_pair_loss_cpo_and_simpo(backend, kind, budget):
    """`linear_pair_loss` with CPO's (sigmoid, cpo_alpha NLL) and SimPO's per-pair losses: loss
    and gradients against the float64 naive logits through `cpo_loss` / `simpo_loss`."""
    from dpo_kernels.linear_dpo import linear_pair_loss
    from dpo_kernels.preference_losses import cpo_loss, simpo_loss

    hidden, weight, bias, labels, mask, _, _ = make_batch()
    beta, gamma = 0.3, 0.5
    if kind == "cpo":

        def per_pair(pc, pr, nc, nr):
            return -F.logsigmoid(beta * (pc - pr))

        nll, fn = (
            1.0,
            lambda pc, pr, nc, nr: cpo_loss(
                pc, pr, chosen_counts=nc, rejected_counts=nr, beta=beta, cpo_alpha=1.0
            ),
        )
    else:

        def per_pair(pc, pr, nc, nr):
            return -F.logsigmoid(beta * (pc / nc - pr / nr) - gamma)

        nll, fn = (
            0.0,
            lambda pc, pr, nc, nr: simpo_loss(
                pc, pr, chosen_counts=nc, rejected_counts=nr, beta=beta, simpo_gamma=gamma
            ),
        )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, lp = linear_pair_loss(h, w, labels, per_pair, nll_weight=nll, bias=bias, mask=mask,
                                memory_budget=budget, backend=backend)  # fmt: skip
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = h64 @ w64.T + bias.double()
    counted = (labels != -100) & mask
    logp = F.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    sums, n = torch.where(counted, logp, 0.0).sum(-1), counted.sum(-1).double()
    ref = fn(sums[:P], sums[P:], n[:P], n[P:]).loss
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(lp.logps.double(), sums.detach(), atol=1e-4, rtol=1e-5)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()
