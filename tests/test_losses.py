"""The fused DPO loss family against independent scalar formulas (TRL's definitions)."""

import math
import types

import pytest
import torch
from conftest import cpu_backends

import dpo_kernels
from dpo_kernels import DPOLoss, dpo_loss
from dpo_kernels.ops import reference


def softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def logsig(x):
    return -softplus(-x)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def score(x, fdiv, alpha=0.5):
    if fdiv == "forward_kl":
        return 1 - math.exp(-x)
    if fdiv == "js_divergence":
        return math.log(2) + logsig(x)
    if fdiv == "alpha_divergence":
        return (math.exp(min((alpha - 1) * x, 80.0)) - 1) / (alpha - 1)
    return x


def scalar_loss(kind, pc, pr, rc, rr, nc, nr, beta, eps, fdiv="reverse_kl", tau=0.05):
    """Mean loss of a batch (lists of floats), written pair by pair from TRL's definitions."""
    P = len(pc)
    c = [pc[i] - rc[i] for i in range(P)]
    r = [pr[i] - rr[i] for i in range(P)]
    sc = [score(x, fdiv) for x in c]
    sr = [score(x, fdiv) for x in r]
    out = []
    if kind in ("aot", "aot_unpaired"):
        a = sorted(pc[i] - pr[i] for i in range(P)) if kind == "aot" else sorted(c)
        b = sorted(rc[i] - rr[i] for i in range(P)) if kind == "aot" else sorted(r)
        for i in range(P):
            d = beta * (a[i] - b[i])
            out.append(-logsig(d) * (1 - eps) - logsig(-d) * eps)
        return sum(out) / P
    for i in range(P):
        d = beta * (sc[i] - sr[i])
        lc, lr = max(nc[i], 1), max(nr[i], 1)
        if kind == "sigmoid":
            v = -logsig(d)
        elif kind == "hinge":
            v = max(0.0, 1 - d)
        elif kind == "ipo":
            v = (sc[i] / lc - sr[i] / lr - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            v = sig(d) * (logsig(d) - math.log(1 - eps)) + sig(-d) * (logsig(-d) - math.log(eps))
        elif kind == "nca_pair":
            v = -logsig(beta * c[i]) - 0.5 * logsig(-beta * c[i]) - 0.5 * logsig(-beta * r[i])
        elif kind == "robust":
            v = (-(1 - eps) * logsig(d) + eps * logsig(-d)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            v = -logsig(beta * c[i]) - logsig(-beta * r[i])
        elif kind == "sppo_hard":
            v = (c[i] - 0.5 / beta) ** 2 + (r[i] + 0.5 / beta) ** 2
        elif kind == "apo_zero":
            v = 1 - sig(beta * c[i]) + sig(beta * r[i])
        elif kind == "apo_down":
            v = sig(beta * c[i]) + 1 - sig(beta * (c[i] - r[i]))
        elif kind == "discopop":
            m = sig(d / tau)
            v = -logsig(d) * (1 - m) + math.exp(-d) * m
        elif kind == "sft":
            v = -sum(pc) / max(sum(nc), 1)
        elif kind == "sigmoid_norm":
            v = -logsig(beta * (sc[i] / lc - sr[i] / lr))
        out.append(v)
    return sum(out) / P


def numeric_grad(f, xs, i, h=1e-6):
    up, down = list(xs), list(xs)
    up[i] += h
    down[i] -= h
    return (f(up) - f(down)) / (2 * h)


def make_pairs(P=6, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    pc = -20 - 30 * torch.rand(P, generator=g, dtype=torch.float64)
    pr = -20 - 30 * torch.rand(P, generator=g, dtype=torch.float64)
    rc = pc + 4 * torch.randn(P, generator=g, dtype=torch.float64)
    rr = pr + 4 * torch.randn(P, generator=g, dtype=torch.float64)
    nc = torch.randint(1, 40, (P,), generator=g).double()
    nr = torch.randint(1, 40, (P,), generator=g).double()
    return pc, pr, rc, rr, nc, nr


CASES = [
    ("sigmoid", 0.0, "reverse_kl"),
    ("hinge", 0.0, "reverse_kl"),
    ("ipo", 0.0, "reverse_kl"),
    ("exo_pair", 1e-3, "reverse_kl"),
    ("nca_pair", 0.0, "reverse_kl"),
    ("robust", 0.1, "reverse_kl"),
    ("bco_pair", 0.0, "reverse_kl"),
    ("sppo_hard", 0.0, "reverse_kl"),
    ("aot", 0.1, "reverse_kl"),
    ("aot_unpaired", 0.1, "reverse_kl"),
    ("apo_zero", 0.0, "reverse_kl"),
    ("apo_down", 0.0, "reverse_kl"),
    ("discopop", 0.0, "reverse_kl"),
    ("sft", 0.0, "reverse_kl"),
    ("sigmoid_norm", 0.0, "reverse_kl"),
    ("sigmoid", 0.0, "forward_kl"),
    ("sigmoid", 0.0, "js_divergence"),
    ("sigmoid", 0.0, "alpha_divergence"),
    ("ipo", 0.0, "js_divergence"),
    ("robust", 0.2, "alpha_divergence"),
    ("sigmoid_norm", 0.0, "forward_kl"),
]


def spec_loss(pc, pr, rc, rr, nc, nr, **config):
    """The spec, reference.dpo_losses, with autograd: what the "spec" rows below check (every
    backend, the reference one included, runs closed forms inside the fused op)."""
    per = reference.dpo_losses(pc, pr, rc, rr, nc, nr, dpo_kernels.make_spec(**config))
    return types.SimpleNamespace(loss=per.mean(), losses=per)


@pytest.mark.parametrize("backend", [*cpu_backends(), "spec"])
@pytest.mark.parametrize("kind,eps,fdiv", CASES, ids=[f"{k}-{f}" for k, _, f in CASES])
def test_each_loss_matches_the_scalar_formula(backend, kind, eps, fdiv):
    beta = 0.1 if kind not in ("sppo_hard",) else 0.5
    pc, pr, rc, rr, nc, nr = make_pairs()
    if kind == "hinge":  # keep away from the kink at 1 - u = 0
        beta = 0.3
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    config = dict(beta=beta, loss_type=kind, label_smoothing=eps, f_divergence_type=fdiv)
    if backend == "spec":
        out = spec_loss(pc_, pr_, rc, rr, nc, nr, **config)
    else:
        out = dpo_loss(
            pc_, pr_, rc, rr, chosen_counts=nc, rejected_counts=nr, backend=backend, **config
        )
    lists = [t.tolist() for t in (pc, pr, rc, rr, nc, nr)]

    def f_pc(x):
        return scalar_loss(kind, x, *lists[1:], beta, eps, fdiv)

    def f_pr(x):
        return scalar_loss(kind, lists[0], x, *lists[2:], beta, eps, fdiv)

    expect = f_pc(lists[0])
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(expect, rel=1e-10, abs=1e-12)
    assert out.losses.mean().item() == pytest.approx(expect, rel=1e-10, abs=1e-12)
    out.loss.backward()
    g_pc = [numeric_grad(f_pc, lists[0], i) for i in range(len(lists[0]))]
    g_pr = [numeric_grad(f_pr, lists[1], i) for i in range(len(lists[1]))]
    torch.testing.assert_close(
        pc_.grad, torch.tensor(g_pc, dtype=torch.float64), atol=1e-7, rtol=1e-5
    )
    g = pr_.grad if pr_.grad is not None else torch.zeros_like(pr)  # sft: no rejected term
    torch.testing.assert_close(g, torch.tensor(g_pr, dtype=torch.float64), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck_combined_losses(backend):
    pc, pr, rc, rr, nc, nr = make_pairs(5, seed=1)
    spec = dict(
        loss_type=["sigmoid", "ipo", "sft", "aot", "nca_pair", "discopop", "apo_down"],
        loss_weights=[1.0, 0.5, 0.2, 0.3, 0.7, 0.4, 0.6],
        label_smoothing=0.05,
        beta=0.2,
    )

    def f(a, b):
        return dpo_loss(
            a, b, rc, rr, chosen_counts=nc, rejected_counts=nr, backend=backend, **spec
        ).loss

    args = (pc.clone().requires_grad_(), pr.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", cpu_backends())
def test_combined_weights_are_the_weighted_sum(backend):
    pc, pr, rc, rr, nc, nr = make_pairs(7, seed=2)
    kw = dict(chosen_counts=nc, rejected_counts=nr, backend=backend, beta=0.2)
    both = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[0.7, 0.3], **kw)
    a = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", **kw)
    b = dpo_loss(pc, pr, rc, rr, loss_type="sft", **kw)
    torch.testing.assert_close(both.loss, 0.7 * a.loss + 0.3 * b.loss)


@pytest.mark.parametrize("backend", cpu_backends())
def test_float32_matches_float64(backend):
    pc, pr, rc, rr, nc, nr = make_pairs(9, seed=3)
    kw = dict(chosen_counts=nc, rejected_counts=nr, loss_type=["sigmoid", "ipo"], backend=backend)
    p64 = pc.clone().requires_grad_()
    p32 = pc.float().requires_grad_()
    o64 = dpo_loss(p64, pr, rc, rr, **kw)
    o32 = dpo_loss(p32, pr.float(), rc.float(), rr.float(), **kw)
    assert o32.loss.dtype == torch.float32
    o64.loss.backward()
    o32.loss.backward()
    torch.testing.assert_close(o32.loss.double(), o64.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-7)


def test_metrics_are_trl_rewards():
    pc, pr, rc, rr, _, _ = make_pairs(8, seed=4)
    out = dpo_loss(pc, pr, rc, rr, beta=0.3)
    cr, rj = 0.3 * (pc - rc), 0.3 * (pr - rr)
    m = out.metrics
    torch.testing.assert_close(m["rewards/chosen"].double(), cr.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["rewards/rejected"].double(), rj.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        m["rewards/margins"].double(), (cr - rj).mean(), rtol=1e-6, atol=1e-6
    )
    assert m["rewards/accuracies"].item() == pytest.approx((cr > rj).double().mean().item())
    torch.testing.assert_close(m["logps/chosen"].double(), pc.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["logps/rejected"].double(), pr.mean(), rtol=1e-6, atol=1e-6)
    assert not any(v.requires_grad for v in m.values())


@pytest.mark.parametrize("backend", cpu_backends())
def test_accuracy_counts_a_tie_as_wrong(backend):
    """TRL logs mean(chosen_rewards > rejected_rewards): a tied pair is not a correct one. Ties
    are what every run whose policy starts as its reference logs first (all rewards 0), and what
    beta = 0 gives throughout."""
    pc, pr, *_ = make_pairs(6, seed=7)
    same = dpo_loss(pc, pr, pc.clone(), pr.clone(), backend=backend)  # policy = reference
    assert same.metrics["rewards/accuracies"].item() == 0.0
    zero_beta = dpo_loss(pc, pr, pc - 5, pr + 5, beta=0.0, backend=backend)
    assert zero_beta.metrics["rewards/accuracies"].item() == 0.0
    # Exact ties in pairs 0-2 (dyadic values: the differences are exact), a win in 3-4, a loss in 5.
    pc = torch.tensor([-20.5, -31.25, -7.0, -10.0, -12.0, -30.0], dtype=torch.float64)
    pr = torch.tensor([-22.5, -33.25, -9.0, -30.0, -40.0, -10.0], dtype=torch.float64)
    rc, rr = pc + 1.5, pr + 1.5
    rc[3:], rr[3:] = pc[3:], pr[3:]
    pc2 = pc.clone()
    pc2[3:5] += 4.0  # chosen rewards 0.4 > rejected 0 in pairs 3 and 4
    pr2 = pr.clone()
    pr2[5] += 4.0  # pair 5: rejected ahead
    out = dpo_loss(pc2, pr2, rc, rr, backend=backend)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(2 / 6, rel=1e-7)


def test_reference_free_is_a_zero_reference():
    pc, pr, *_ = make_pairs(4, seed=5)
    free = dpo_loss(pc, pr)
    zero = dpo_loss(pc, pr, torch.zeros(4, dtype=pc.dtype), torch.zeros(4, dtype=pc.dtype))
    torch.testing.assert_close(free.loss, zero.loss)


def test_module_takes_sequence_logprobs_of_a_concatenated_batch():
    logits = torch.randn(6, 5, 30, requires_grad=True)
    ref_logits = torch.randn(6, 5, 30)
    labels = torch.randint(0, 30, (6, 5))
    out = dpo_kernels.sequence_logprobs(logits, labels, ref_logits=ref_logits)
    res = DPOLoss(beta=0.2, loss_type="ipo")(out)
    p = out.pairs()
    direct = dpo_loss(
        p.chosen_logps, p.rejected_logps, p.ref_chosen_logps, p.ref_rejected_logps,
        chosen_counts=p.chosen_counts, rejected_counts=p.rejected_counts, beta=0.2, loss_type="ipo",
    )  # fmt: skip
    torch.testing.assert_close(res.loss, direct.loss)
    res.loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="even batch"):
        DPOLoss()(dpo_kernels.sequence_logprobs(logits[:5], labels[:5]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="dpo"), "unknown loss_type"),
        (dict(loss_type=[]), "loss_type is empty"),
        (dict(beta=0.0, loss_type=["sigmoid", "ipo"]), r"beta must not be 0 .*\['ipo'\]"),
        (dict(beta=0.0, loss_type="sppo_hard"), "they divide by beta"),
        (dict(label_smoothing=float("nan")), "label_smoothing must be a finite number"),
        (dict(label_smoothing=0.5, loss_type="robust"), "divides by 1 - 2 \\* label_smoothing"),
        (dict(loss_type="exo_pair"), r"needs label_smoothing in \(0, 1\)"),
        (dict(loss_type="exo_pair", label_smoothing=1.0), r"needs label_smoothing in \(0, 1\)"),
        (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights has 1 entries"),
        (dict(f_divergence_type="kl"), "unknown f_divergence_type"),
        (dict(f_divergence_type="forward_kl", loss_type="bco_pair"), "works only with"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be finite and not 0"),
    ],
)
def test_bad_configuration(kwargs, match):
    pc, pr, rc, rr, *_ = make_pairs(3)
    with pytest.raises(ValueError, match=match):
        dpo_loss(pc, pr, rc, rr, **kwargs)
    with pytest.raises(ValueError, match=match):
        DPOLoss(**kwargs)


def test_bad_inputs():
    pc, pr, rc, rr, _, _ = make_pairs(4)
    with pytest.raises(ValueError, match="rejected_logps has 3 entries"):
        dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_logps has 3 entries"):
        dpo_loss(pc, pr, rc, rr[:3])
    with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps"):
        dpo_loss(pc, pr, rc, None)
    with pytest.raises(ValueError, match="pass chosen_counts and rejected_counts"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="must be 1-D"):
        dpo_loss(pc[:, None], pr[:, None])
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(pc[:0], pr[:0])
    with pytest.raises(TypeError, match="must be a tensor"):
        dpo_loss(pc, [1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph_matches_eager(backend):
    pc, pr, rc, rr, nc, nr = (t.float() for t in make_pairs(6, seed=6))
    loss_fn = DPOLoss(beta=0.2, loss_type=["sigmoid", "ipo"], backend=backend)

    def step(a, b):
        return loss_fn(a, b, rc, rr, nc, nr).loss

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    a1, b1 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    a2, b2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    eager, comp = step(a1, b1), compiled(a2, b2)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(a2.grad, a1.grad)
    torch.testing.assert_close(b2.grad, b1.grad)


def weighted_scalar_loss(types, weights_of_types, pair_w, lists, beta):
    """sum over types of mean_i(pair_w[i] * loss_i) from the scalar formulas (TRL's WPO weighting):
    sft is one value for every pair, so it is scaled by the mean pair weight."""
    P, total = len(lists[0]), 0.0
    for kind, tw in zip(types, weights_of_types, strict=True):
        if kind == "sft":
            total += tw * scalar_loss(kind, *lists, beta, 0.0) * sum(pair_w) / P
            continue
        for i in range(P):
            one = [[x[i]] for x in lists]
            total += tw * pair_w[i] * scalar_loss(kind, *one, beta, 0.0) / P
    return total


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    "types", [("sigmoid",), ("ipo", "sft", "bco_pair")], ids=["sigmoid", "ipo+sft+bco_pair"]
)
def test_pair_weights_scale_each_pair_loss(backend, types):
    pc, pr, rc, rr, nc, nr = make_pairs()
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    w = torch.rand(6, generator=g, dtype=torch.float64) * 2
    type_w = [1.0, 0.5, 0.25][: len(types)]
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = dpo_loss(
        pc_, pr_, rc, rr, chosen_counts=nc, rejected_counts=nr, beta=0.1, loss_type=list(types),
        loss_weights=type_w, weights=w, backend=backend,
    )  # fmt: skip
    lists = [t.tolist() for t in (pc, pr, rc, rr, nc, nr)]
    wl = w.tolist()
    expect = weighted_scalar_loss(types, type_w, wl, lists, 0.1)
    assert out.loss.item() == pytest.approx(expect, rel=1e-10)
    # The per-pair losses are the weighted ones, pair by pair (sft: its batch value times w[i]).
    sft = scalar_loss("sft", *lists, 0.1, 0.0)
    per = [
        sum(tw * wl[i] * (sft if kind == "sft" else scalar_loss(kind, *[[x[i]] for x in lists],
                                                                0.1, 0.0))
            for kind, tw in zip(types, type_w, strict=True))
        for i in range(6)
    ]  # fmt: skip
    torch.testing.assert_close(out.losses, torch.tensor(per, dtype=torch.float64), rtol=1e-10,
                               atol=1e-12)  # fmt: skip
    out.loss.backward()
    for grad, k in ((pc_.grad, 0), (pr_.grad, 1)):
        for i in range(6):

            def f(xs, k=k, i=i):
                ls = [list(x) for x in lists]
                ls[k] = xs
                return weighted_scalar_loss(types, type_w, wl, ls, 0.1)

            assert grad[i].item() == pytest.approx(numeric_grad(f, lists[k], i), rel=1e-5, abs=1e-9)


def test_pair_weights_refuse_sorting_losses_and_gradients():
    pc, pr, rc, rr, _, _ = make_pairs()
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(pc, pr, rc, rr, loss_type="aot", weights=torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="detach"):
        dpo_loss(pc, pr, rc, rr, weights=torch.ones(6, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="weights has 5 entries"):
        dpo_loss(pc, pr, rc, rr, weights=torch.ones(5, dtype=torch.float64))


# Options TRL trains with beyond the usual ranges: any finite beta (0 but where a loss divides by
# it) and label_smoothing (exo_pair's in (0, 1), robust's not 0.5).
ODD_OPTIONS = [(-0.3, 0.7), (0.0, -0.1), (-2.0, 0.0), (0.2, 0.6)]


@pytest.mark.parametrize("backend", [*cpu_backends(), "spec"])
@pytest.mark.parametrize("beta,eps", ODD_OPTIONS)
def test_each_loss_takes_the_options_trl_trains_with(backend, beta, eps):
    """Every loss type whose formula is finite at (beta, label_smoothing) against TRL's scalar
    formula, value and gradients; the others refused by name."""
    pc, pr, rc, rr, nc, nr = make_pairs()
    lists = [t.tolist() for t in (pc, pr, rc, rr, nc, nr)]
    for kind in dpo_kernels.common.LOSS_TYPES:
        config = dict(beta=beta, loss_type=kind, label_smoothing=eps)
        refused = ((beta == 0 and kind in ("ipo", "sppo_hard"))
                   or (kind == "exo_pair" and not 0 < eps < 1))  # fmt: skip
        if refused:
            with pytest.raises(ValueError, match=r"beta must not be 0|needs label_smoothing in"):
                dpo_kernels.make_spec(**config)
            continue
        pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        if backend == "spec":
            out = spec_loss(pc_, pr_, rc, rr, nc, nr, **config)
        else:
            out = dpo_loss(pc_, pr_, rc, rr, chosen_counts=nc, rejected_counts=nr,
                           backend=backend, **config)  # fmt: skip
        expect = scalar_loss(kind, *lists, beta, eps)
        assert out.loss.item() == pytest.approx(expect, rel=1e-10, abs=1e-12), kind
        out.loss.backward()
        for x, i in ((pc_, 0), (pr_, 1)):

            def f(v, i=i, kind=kind):
                args = list(lists)
                args[i] = v
                return scalar_loss(kind, *args, beta, eps)

            want = torch.tensor([numeric_grad(f, lists[i], j) for j in range(len(lists[i]))],
                                dtype=torch.float64)  # fmt: skip
            got = x.grad if x.grad is not None else torch.zeros_like(want)
            torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5, msg=kind)


@pytest.mark.parametrize("backend", [*cpu_backends(), "spec"])
@pytest.mark.parametrize("tau", [-0.3, -2.0])
def test_discopop_takes_any_nonzero_tau(backend, tau):
    """TRL reads discopop_tau in sigmoid(margin / tau) only: a negative tau trains too."""
    pc, pr, rc, rr, nc, nr = make_pairs()
    lists = [t.tolist() for t in (pc, pr, rc, rr, nc, nr)]
    config = dict(beta=0.4, loss_type="discopop", discopop_tau=tau)
    pc_ = pc.clone().requires_grad_()
    if backend == "spec":
        out = spec_loss(pc_, pr, rc, rr, nc, nr, **config)
    else:
        out = dpo_loss(pc_, pr, rc, rr, backend=backend, **config)
    expect = scalar_loss("discopop", *lists, 0.4, 0.0, tau=tau)
    assert out.loss.item() == pytest.approx(expect, rel=1e-10, abs=1e-12)
    out.loss.backward()

    def f(v):
        return scalar_loss("discopop", v, *lists[1:], 0.4, 0.0, tau=tau)

    want = torch.tensor([numeric_grad(f, lists[0], j) for j in range(len(lists[0]))],
                        dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(pc_.grad, want, atol=1e-7, rtol=1e-5)
    dpo_kernels.make_spec(loss_type="sigmoid", discopop_tau=0.0)  # unused: not checked, as TRL


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("coef", [1.000002, 0.99999, 1.001])
def test_alpha_divergence_near_one_in_float32(backend, coef):
    """(exp((coef - 1) x) - 1) / (coef - 1) just outside TRL's 1e-6 window around coef 1: float32
    inputs on every backend against the float64 spec, which a cancelling exp - 1 missed by 1%."""
    pc, pr, rc, rr, nc, nr = make_pairs()
    config = dict(beta=1.0, loss_type="sigmoid", f_divergence_type="alpha_divergence",
                  f_alpha_divergence_coef=coef)  # fmt: skip
    a, b = (t.float().requires_grad_() for t in (pc, pr))
    out = dpo_loss(a, b, rc.float(), rr.float(), backend=backend, **config)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    ref = spec_loss(a64, b64, rc.float().double(), rr.float().double(), nc, nr, **config)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=2e-5, atol=1e-6)
    want = torch.autograd.grad(ref.loss, (a64, b64))
    for got, w in zip(torch.autograd.grad(out.loss, (a, b)), want, strict=True):
        torch.testing.assert_close(got.double(), w, rtol=2e-5, atol=1e-7)
