"""sequence_logprobs on every CPU-runnable backend against the float64 reference."""

import pytest
import torch
from conftest import EPS32, GRAD_TOL, assert_no_worse_than_naive, cpu_backends

import dpo_kernels
from dpo_kernels import common
from dpo_kernels.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EPS_ACC = {torch.float64: 2.3e-16}  # accumulation precision; float32 for the rest


def make_inputs(B, T, V, dtype, kind="normal", masked_frac=0.25):
    """Random logits of a kind, labels with some ignore_index, a mask; logits are a strided view."""
    full = torch.randn(B, T + 1, V, dtype=torch.float64) * 3
    if kind == "large":
        full = full * 3e3  # |z| ~ 1e4
    if kind == "neg_inf":
        full[torch.rand(full.shape) < 0.3] = float("-inf")
    logits = full.to(dtype)[:, :-1]  # the causal-LM slice: not contiguous
    labels = torch.randint(0, V, (B, T))
    if kind == "neg_inf":  # labels on finite logits; the -inf label case is its own test
        finite = torch.isfinite(logits.double())
        for b in range(B):
            for t in range(T):
                labels[b, t] = finite[b, t].nonzero()[0, 0] if finite[b, t].any() else -100
    labels[torch.rand(B, T) < masked_frac / 2] = -100
    mask = torch.rand(B, T) > masked_frac / 2
    return logits, labels, mask


def naive_sums(logits, labels, mask, ignore_index=-100):
    """The naive computation in the logits' own dtype (no upcast)."""
    counted = common.counted_tokens(labels, mask, ignore_index)
    lp = logits.log_softmax(-1).gather(-1, torch.where(counted, labels, 0).unsqueeze(-1))
    return torch.where(counted, lp.squeeze(-1), 0).sum(-1)


def fwd_tol(logits, T):
    eps = EPS_ACC.get(logits.dtype, EPS32)
    scale = max(1.0, logits.double().nan_to_num(0, 0, 0).abs().max().item())
    return 8 * eps * T * scale + 1e-12


def loss_of(out, w_seq, w_tok):
    return (out.logps * w_seq).sum() + (out.token_logps * w_tok).sum()


def check_case(backend, logits, labels, mask):
    B, T, _ = logits.shape
    z = logits.detach().clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, mask=mask, backend=backend)
    assert out.logps.dtype == common.acc_dtype(logits.dtype)
    z64 = logits.detach().double().requires_grad_()
    ref_logps, ref_counts = reference.sequence_logprobs(z64, labels, mask)
    zn = logits.detach().clone().requires_grad_()
    naive = naive_sums(zn, labels, mask)
    assert torch.equal(out.counts, ref_counts)
    tol = fwd_tol(logits, T)
    assert_no_worse_than_naive(out.logps, naive.detach(), ref_logps.detach(), tol, "fwd", tol)

    w_seq, w_tok = torch.randn(B, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    loss_of(out, w_seq.to(out.logps.dtype), w_tok.to(out.logps.dtype)).backward()
    ref_tok = torch.where(
        common.counted_tokens(labels, mask, -100),
        z64.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1),
        0,
    )
    ((ref_logps * w_seq).sum() + (ref_tok * w_tok).sum()).backward()
    (naive * w_seq.to(naive.dtype)).sum().backward()  # naive grad through the sequence sums only
    zt = logits.detach().clone().requires_grad_()
    counted = common.counted_tokens(labels, mask, -100)
    lp = zt.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (torch.where(counted, lp, 0) * w_tok.to(zt.dtype)).sum().backward()
    naive_grad = zn.grad.double() + zt.grad.double()
    gmax = (w_seq.abs().max() + w_tok.abs().max()).item()
    assert z.grad.dtype == logits.dtype and z.grad.shape == logits.shape
    gtol = 2 * GRAD_TOL[logits.dtype] * gmax
    assert_no_worse_than_naive(z.grad, naive_grad, z64.grad, gtol, "bwd", gtol)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(2, 5, 37), (3, 1, 300), (2, 4, 1000), (2, 3, 4096 + 17)],
    ids=["V37", "T1", "V1000", "V4113-multiblock"],
)
def test_matches_reference(backend, dtype, shape):
    check_case(backend, *make_inputs(*shape, dtype))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["large", "neg_inf"])
def test_extreme_logits(backend, dtype, kind):
    check_case(backend, *make_inputs(2, 4, 300, dtype, kind))


@pytest.mark.slow
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab_multiblock(backend, dtype):
    # Several vocab blocks per row for every dtype's block size; V not a multiple of any block.
    check_case(backend, *make_inputs(2, 3, 3 * 8192 + 5, dtype))


@pytest.mark.parametrize("backend", cpu_backends())
def test_fully_masked_sequence_and_label_at_minus_inf(backend):
    logits, labels, mask = make_inputs(3, 4, 50, torch.float32)
    mask[1] = False  # a sequence with nothing counted: sum 0, count 0, zero gradient
    labels[2, 1] = 7
    mask[2, 1] = True
    logits[2, 1, 7] = float("-inf")  # label logit -inf: that sequence's sum is -inf
    z = logits.clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, mask=mask, backend=backend)
    assert out.counts[1] == 0 and out.logps[1] == 0
    assert out.logps[2] == float("-inf")
    assert torch.isfinite(out.logps[0])
    out.logps[:2].sum().backward()
    assert torch.all(z.grad[1] == 0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_stays_in_its_sequence(backend):
    logits, labels, mask = make_inputs(3, 4, 64, torch.float32, masked_frac=0.0)
    mask[:] = True
    labels[:] = labels.clamp(min=0)
    clean = dpo_kernels.sequence_logprobs(logits, labels, mask=mask, backend=backend).logps
    bad = logits.clone()
    bad[1, 2, 5] = float("nan")  # counted token of sequence 1
    mask2 = mask.clone()
    mask2[2, 3] = False
    bad[2, 3, :] = float("nan")  # a token of sequence 2 that does not count: never read
    z = bad.clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, mask=mask2, backend=backend)
    assert torch.isnan(out.logps[1])
    assert torch.equal(out.logps[0], clean[0])
    assert torch.isfinite(out.logps[2])
    out.logps.sum().backward()
    assert torch.isfinite(z.grad[0]).all() and torch.isfinite(z.grad[2]).all()
    assert torch.all(z.grad[2, 3] == 0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.bfloat16])
def test_reference_logits_in_the_same_call(backend, ref_dtype):
    logits, labels, mask = make_inputs(4, 6, 300, torch.bfloat16)
    ref_logits = (torch.randn(4, 6, 300) * 2).to(ref_dtype)
    z = logits.clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(
        z, labels, mask=mask, ref_logits=ref_logits, backend=backend
    )
    alone = dpo_kernels.sequence_logprobs(ref_logits, labels, mask=mask, backend=backend)
    expect, _ = reference.sequence_logprobs(ref_logits.double(), labels, mask)
    torch.testing.assert_close(out.ref_logps, alone.logps, rtol=0, atol=0)
    torch.testing.assert_close(out.ref_logps.double(), expect, rtol=1e-5, atol=1e-4)
    assert not out.ref_logps.requires_grad
    pairs = out.pairs()
    torch.testing.assert_close(pairs.ref_chosen_logps, out.ref_logps[:2])
    torch.testing.assert_close(pairs.rejected_logps, out.logps[2:])
    torch.testing.assert_close(pairs.rejected_counts, out.counts[2:])
    # Gradient flows to the policy only, and equals the no-reference call's.
    out.logps.sum().backward()
    z2 = logits.clone().requires_grad_()
    dpo_kernels.sequence_logprobs(z2, labels, mask=mask, backend=backend).logps.sum().backward()
    assert torch.equal(z.grad, z2.grad)


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck_float64(backend):
    logits, labels, mask = make_inputs(2, 3, 7, torch.float64)
    z = logits.clone().requires_grad_()
    w = torch.randn(2, 3, dtype=torch.float64)

    def f(x):
        out = dpo_kernels.sequence_logprobs(x, labels, mask=mask, backend=backend)
        return out.logps, (out.token_logps * w).sum()

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_pairs_needs_an_even_batch():
    logits, labels, _ = make_inputs(3, 2, 10, torch.float32)
    with pytest.raises(ValueError, match="even batch"):
        dpo_kernels.sequence_logprobs(logits, labels, backend="reference").pairs()


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph_matches_eager(backend):
    logits, labels, mask = make_inputs(4, 5, 97, torch.float32)

    def dpo_like(z):
        out = dpo_kernels.sequence_logprobs(z, labels, mask=mask, backend=backend)
        p = out.pairs()
        return -torch.nn.functional.logsigmoid(p.chosen_logps - p.rejected_logps).mean()

    torch._dynamo.reset()
    compiled = torch.compile(dpo_like, fullgraph=True)
    z1 = logits.clone().requires_grad_()
    z2 = logits.clone().requires_grad_()
    eager = dpo_like(z1)
    comp = compiled(z2)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z2.grad, z1.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("backend", cpu_backends())
def test_offsets_beyond_int32(backend):
    """Rows that start more than 2**31 elements into the storage, at V = 262144."""
    V = 262144
    row_stride = 2**31 + 3 * V  # second sequence starts past 2**31 elements
    storage = torch.empty(row_stride + V, dtype=torch.bfloat16)  # untouched pages cost nothing
    logits = storage.as_strided((2, 1, V), (row_stride, V, 1))
    logits[0, 0] = torch.randn(V)
    logits[1, 0] = torch.randn(V) * 2
    labels = torch.tensor([[V - 1], [V - 2]])
    z = logits.detach().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, backend=backend)
    dense = logits.detach().clone()
    expect, _ = reference.sequence_logprobs(dense.double(), labels)
    torch.testing.assert_close(out.logps.double(), expect, rtol=1e-6, atol=1e-5)
    out.logps.sum().backward()
    zd = dense.double().requires_grad_()
    reference.sequence_logprobs(zd, labels)[0].sum().backward()
    torch.testing.assert_close(z.grad.double(), zd.grad, rtol=0, atol=2**-8)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("V", [37, 4096 + 300], ids=["V37", "V4396-multiblock"])
def test_token_stats_match_the_reference(backend, dtype, V):
    logits, labels, mask = make_inputs(3, 5, V, dtype, kind="neg_inf" if V == 37 else "normal")
    labels[0, 0] = logits[0, 0].double().argmax()  # at least one label that is the argmax
    mask[0, 0] = True
    # A tie for the maximum, label on the second one: not the first argmax.
    logits[1, 1, 3] = logits[1, 1, 5] = logits[1, 1].double().max() + 1
    labels[1, 1], mask[1, 1] = 5, True
    out = dpo_kernels.sequence_logprobs(logits, labels, mask=mask, stats=True, backend=backend)
    z = logits.double()
    counted = common.counted_tokens(labels, mask, -100)
    lse = torch.where(counted, z.logsumexp(-1), 0)
    ent, mean, top1, _ = reference.token_stats(z, lse, torch.where(counted, labels, 0), counted)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.stats.entropy.double(), ent, rtol=tol, atol=tol)
    torch.testing.assert_close(out.stats.mean_logits.double(), mean, rtol=tol, atol=tol)
    assert torch.equal(out.stats.is_top1, top1)
    assert out.stats.is_top1[0, 0] and not out.stats.is_top1[1, 1]
    assert not out.stats.entropy.requires_grad
    plain = dpo_kernels.sequence_logprobs(logits, labels, mask=mask, backend=backend)
    assert plain.stats is None and torch.equal(plain.logps, out.logps)
