"""CPO / SimPO / ORPO / KTO losses against float64 formulas written from TRL 1.16's source.

Each spec below is autograd on float64 tensors; the fused losses (closed-form gradients) must
match its value, gradient and metrics, in float64 and in float32.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends

from dpo_kernels import cpo_loss, kto_loss, orpo_loss, simpo_loss
from dpo_kernels.common import FAMILIES
from dpo_kernels.preference_losses import kto_kl


def _inputs(P, seed, dtype=torch.float64):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    nc = torch.randint(1, 9, (P,), generator=g)
    nr = torch.randint(1, 9, (P,), generator=g)
    # average log-probs in (-3, -0.05): sums = average * count
    pc = -(torch.rand(P, generator=g, dtype=torch.float64) * 2.95 + 0.05) * nc
    pr = -(torch.rand(P, generator=g, dtype=torch.float64) * 2.95 + 0.05) * nr
    return pc.to(dtype), pr.to(dtype), nc, nr


# --- CPO: trl/experimental/cpo/cpo_trainer.py, CPOTrainer.cpo_loss + get_batch_loss_metrics,
# with the NLL of concatenated_forward (CrossEntropyLoss mean over the chosen label tokens) and
# get_batch_logps(average_log_prob=loss_type in ["ipo", "simpo"]).
def cpo_spec(pc, pr, nc, nr, beta, eps, loss_type, cpo_alpha, gamma, alpha):
    if loss_type == "alphapo":  # CPOConfig.__post_init__
        loss_type, cpo_alpha = "simpo", 0.0
    avg = loss_type in ("ipo", "simpo")
    c = pc / nc if avg else pc
    r = pr / nr if avg else pr
    if alpha != 0.0:
        rc = (1 - torch.exp(c).pow(-alpha)) / alpha
        rr = (1 - torch.exp(r).pow(-alpha)) / alpha
    else:
        rc, rr = c, r
    logits = rc - rr
    if loss_type == "simpo":
        logits = logits - gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    nll = -pc.sum() / nc.sum() if cpo_alpha != 0 else torch.zeros((), dtype=pc.dtype)
    loss = losses.mean() + cpo_alpha * nll
    ch, rj = beta * rc, beta * rr
    metrics = {
        "rewards/chosen": ch.mean(),
        "rewards/rejected": rj.mean(),
        "rewards/accuracies": (ch > rj).double().mean(),
        "rewards/margins": (ch - rj).mean(),
        "logps/chosen": c.mean(),
        "logps/rejected": r.mean(),
        "nll_loss": nll,
    }
    return loss, metrics


def _check(out, loss_ref, metrics_ref, inputs, inputs64, tol):
    g = torch.autograd.grad(out.loss, inputs)
    g_ref = torch.autograd.grad(loss_ref, inputs64)
    torch.testing.assert_close(out.loss.double(), loss_ref.detach(), rtol=tol, atol=tol)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    assert set(out.metrics) == set(metrics_ref)
    for k, v in metrics_ref.items():
        torch.testing.assert_close(out.metrics[k].double(), v.detach().double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
@pytest.mark.parametrize(
    "beta,eps,cpo_alpha,gamma,alpha",
    [(0.1, 0.0, 1.0, 0.5, 0.0), (0.5, 0.2, 0.0, 1.2, 0.0), (2.0, 0.1, 0.7, 0.3, 0.25)],
)
def test_cpo_matches_trl_formula(dtype, loss_type, beta, eps, cpo_alpha, gamma, alpha):
    pc, pr, nc, nr = _inputs(9, seed=hash((loss_type, beta)) % 1000, dtype=dtype)
    pc.requires_grad_(), pr.requires_grad_()
    out = cpo_loss(
        pc, pr, chosen_counts=nc, rejected_counts=nr, beta=beta, label_smoothing=eps,
        loss_type=loss_type, cpo_alpha=cpo_alpha, simpo_gamma=gamma, alpha=alpha,
    )  # fmt: skip
    pc64, pr64 = (t.detach().double().requires_grad_() for t in (pc, pr))
    loss_ref, m = cpo_spec(pc64, pr64, nc.double(), nr.double(), beta, eps, loss_type,
                           cpo_alpha, gamma, alpha)  # fmt: skip
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    _check(out, loss_ref, m, (pc, pr), (pc64, pr64), tol)


def test_simpo_is_cpo_simpo_without_nll():
    pc, pr, nc, nr = _inputs(7, seed=3)
    pc.requires_grad_()
    out = simpo_loss(pc, pr, chosen_counts=nc, rejected_counts=nr, beta=2.0, simpo_gamma=0.8)
    pc64 = pc.detach().clone().requires_grad_()
    loss_ref, m = cpo_spec(pc64, pr, nc.double(), nr.double(), 2.0, 0.0, "simpo", 0.0, 0.8, 0.0)
    _check(out, loss_ref, m, (pc,), (pc64,), 1e-10)


# --- ORPO: trl/experimental/orpo/orpo_trainer.py, ORPOTrainer.odds_ratio_loss (with log1mexp)
# and get_batch_loss_metrics: loss = nll - mean(beta * logsigmoid(log_odds)) over averaged logps.
def orpo_spec(pc, pr, nc, nr, beta, nll):
    c, r = pc / nc, pr / nr
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    ratio = F.logsigmoid(log_odds)
    loss = nll - (beta * ratio).mean()
    ch, rj = beta * c, beta * r
    return loss, {
        "rewards/chosen": ch.mean(),
        "rewards/rejected": rj.mean(),
        "rewards/accuracies": (ch > rj).double().mean(),
        "rewards/margins": (ch - rj).mean(),
        "logps/chosen": c.mean(),
        "logps/rejected": r.mean(),
        "nll_loss": nll,
        "log_odds_ratio": ratio.mean(),
        "log_odds_chosen": log_odds.mean(),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.1, 1.0, 0.0, -0.7])  # any beta: it weighs a term, as in TRL
@pytest.mark.parametrize("with_nll", [True, False])
def test_orpo_matches_trl_formula(dtype, beta, with_nll):
    pc, pr, nc, nr = _inputs(8, seed=11, dtype=dtype)
    pc.requires_grad_(), pr.requires_grad_()
    w = torch.randn(3, dtype=dtype, requires_grad=True)
    nll = (w**2).sum() if with_nll else None
    out = orpo_loss(pc, pr, chosen_counts=nc, rejected_counts=nr, beta=beta, nll_loss=nll)
    pc64, pr64, w64 = (t.detach().double().requires_grad_() for t in (pc, pr, w))
    nll64 = (w64**2).sum() if with_nll else torch.zeros((), dtype=torch.float64)
    loss_ref, m = orpo_spec(pc64, pr64, nc.double(), nr.double(), beta, nll64)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    inputs, inputs64 = ((pc, pr, w), (pc64, pr64, w64)) if with_nll else ((pc, pr), (pc64, pr64))
    _check(out, loss_ref, m, inputs, inputs64, tol)


def test_orpo_log1mexp_near_zero():
    # averages just below 0 (log1mexp's expm1 branch) keep a finite loss and gradient
    pc = torch.tensor([-1e-4, -0.5], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0, -1e-3], dtype=torch.float64)
    n = torch.tensor([1, 1])
    out = orpo_loss(pc, pr, chosen_counts=n, rejected_counts=n, beta=0.1)
    (g,) = torch.autograd.grad(out.loss, pc)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()
    pc64 = pc.detach().clone().requires_grad_()
    ref, _ = orpo_spec(pc64, pr, n.double(), n.double(), 0.1, torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(g, torch.autograd.grad(ref, pc64)[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orpo_averages_just_below_zero_on_every_backend(backend, dtype):
    # Averages in (-1e-7, 0), where exp rounds to 1 in float32: the gradient stays finite and
    # matches float64 (the reference's log1mexp took the derivative of its other branch too).
    pc = torch.tensor([-4e-9 * 4, -2.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-10.0, -1e-7 * 5], dtype=dtype, requires_grad=True)
    nc, nr = torch.tensor([4, 1]), torch.tensor([2, 5])
    out = orpo_loss(pc, pr, chosen_counts=nc, rejected_counts=nr, beta=0.1, backend=backend)
    got = torch.autograd.grad(out.loss, (pc, pr))
    pc64, pr64 = (t.detach().double().requires_grad_() for t in (pc, pr))
    ref, _ = orpo_spec(
        pc64, pr64, nc.double(), nr.double(), 0.1, torch.zeros((), dtype=torch.float64)
    )
    want = torch.autograd.grad(ref, (pc64, pr64))
    tol = 1e-9 if dtype == torch.float64 else 2e-3  # the float32 inputs' rounding near 0
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all(), g
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=1e-12)


# --- KTO: trl/trainer/kto_trainer.py, KTOTrainer._compute_loss: kl = mean(KL_logps -
# ref_KL_logps).clamp(min=0) (no gradient); chosen 1 - sigmoid(beta (logratio - kl)), rejected
# 1 - sigmoid(beta (kl - logratio)); apo_zero_unpaired 1 - sigmoid(beta logratio) and
# sigmoid(beta logratio); losses weighted then nanmean; metrics are means over each group.
def kto_spec(lp, ref, labels, kl_lp, ref_kl, beta, loss_type, wd, wu):
    if loss_type == "kto":
        kl = (kl_lp - ref_kl).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=lp.dtype)
    c = lp[labels] - ref[labels]
    r = lp[~labels] - ref[~labels]
    if loss_type == "kto":
        cl, rl = 1 - torch.sigmoid(beta * (c - kl)), 1 - torch.sigmoid(beta * (kl - r))
    else:
        cl, rl = 1 - torch.sigmoid(beta * c), torch.sigmoid(beta * r)
    loss = torch.cat((wd * cl, wu * rl)).nanmean()
    m = {"kl": kl}
    if labels.any():
        m["rewards/chosen"] = (beta * c).sum() / labels.sum()
        m["logps/chosen"] = lp[labels].sum() / labels.sum()
    if (~labels).any():
        m["rewards/rejected"] = (beta * r).sum() / (~labels).sum()
        m["logps/rejected"] = lp[~labels].sum() / (~labels).sum()
    if labels.any() and (~labels).any():
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    return loss, m


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize(
    "beta,wd,wu,label_mix",
    [(0.1, 1.0, 1.0, "mixed"), (0.5, 1.33, 0.7, "mixed"), (1.0, 2.0, 1.0, "all_desirable"),
     (0.3, 1.0, 1.5, "all_undesirable")],
)  # fmt: skip
def test_kto_matches_trl_formula(dtype, loss_type, beta, wd, wu, label_mix):
    g = torch.Generator(torch.get_default_device()).manual_seed(5)
    N = 10
    lp = (-torch.rand(N, generator=g, dtype=torch.float64) * 20).to(dtype).requires_grad_()
    ref = -torch.rand(N, generator=g, dtype=torch.float64).to(dtype) * 20
    kl_lp = -torch.rand(N, generator=g, dtype=torch.float64).to(dtype) * 20
    # shift the mismatched policy sums up so that the KL is positive in one case, clamped in other
    ref_kl = kl_lp - (torch.randn(N, generator=g, dtype=torch.float64).to(dtype) + 0.3 * beta * 10)
    labels = {
        "mixed": torch.rand(N, generator=g) < 0.5,
        "all_desirable": torch.ones(N, dtype=torch.bool),
        "all_undesirable": torch.zeros(N, dtype=torch.bool),
    }[label_mix]
    out = kto_loss(
        lp, ref, labels, kl_logps=kl_lp, ref_kl_logps=ref_kl, beta=beta, loss_type=loss_type,
        desirable_weight=wd, undesirable_weight=wu,
    )  # fmt: skip
    lp64 = lp.detach().double().requires_grad_()
    loss_ref, m = kto_spec(lp64, ref.double(), labels, kl_lp.double(), ref_kl.double(), beta,
                           loss_type, wd, wu)  # fmt: skip
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    _check(out, loss_ref, m, (lp,), (lp64,), tol)


def test_kto_kl_clamped_and_passed_directly():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    labels = torch.tensor([True, False])
    neg = kto_loss(lp, ref, labels, kl_logps=ref - 1, ref_kl_logps=ref)  # KL < 0 -> 0
    assert neg.metrics["kl"].item() == 0.0
    direct = kto_loss(lp, ref, labels, kl=0.0)
    torch.testing.assert_close(neg.loss, direct.loss)
    # float32 policy sums, float64 reference sums: the difference in float64, as torch promotes
    pol = torch.tensor([-30.0, -40.0])
    ref64 = torch.tensor([-30.0 - 1e-7, -40.0 - 3e-7], dtype=torch.float64)
    assert kto_kl(pol, ref64).dtype == torch.float64
    torch.testing.assert_close(kto_kl(pol, ref64), (pol.double() - ref64).mean().clamp(min=0))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda a, n: cpo_loss(a, a, loss_type="dpo"), "loss_type"),
        (lambda a, n: cpo_loss(a, a, loss_type="ipo", cpo_alpha=0.0), "chosen_counts"),
        (lambda a, n: cpo_loss(a, a), "cpo_alpha"),
        (
            lambda a, n: cpo_loss(
                a, a, loss_type="ipo", beta=0.0, cpo_alpha=0.0, chosen_counts=n, rejected_counts=n
            ),
            "beta must not be 0",
        ),
        (lambda a, n: cpo_loss(a, a, label_smoothing=math.nan, cpo_alpha=0.0), "label_smoothing"),
        (lambda a, n: cpo_loss(a, a[:2], cpo_alpha=0.0), "rejected_logps"),
        (lambda a, n: orpo_loss(a, a, chosen_counts=n, rejected_counts=n, beta=math.inf), "beta"),
        (lambda a, n: kto_loss(a, a, n > 0, kl=0.0, beta=math.inf), "beta"),
        (lambda a, n: kto_loss(a, a, n > 0), "kl_logps"),
        (lambda a, n: kto_loss(a, a, n), "bool"),
        (lambda a, n: kto_loss(a, a, n > 0, loss_type="bco", kl=0.0), "loss_type"),
    ],
)
def test_bad_arguments_named(call, match):
    a = torch.tensor([-1.0, -2.0, -3.0])
    n = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=match):
        call(a, n)


def test_alpha_reward_shape():
    # AlphaPO: r = (1 - p^-alpha) / alpha tends to log p as alpha -> 0
    pc, pr, nc, nr = _inputs(5, seed=2)
    a = cpo_loss(pc, pr, chosen_counts=nc, rejected_counts=nr, cpo_alpha=0.0, alpha=1e-7)
    b = cpo_loss(pc, pr, chosen_counts=nc, rejected_counts=nr, cpo_alpha=0.0, alpha=0.0)
    assert math.isclose(a.loss.item(), b.loss.item(), rel_tol=1e-5)


# --- every backend (reference = the package's autograd spec, cpu = torch closed forms, triton =
# the one-launch kernel, interpreted on CPU) against the specs above, every loss type and option.
CPO_CASES = [
    (t, dict(beta=b, label_smoothing=e, cpo_alpha=ca, simpo_gamma=g, alpha=a))
    for t in (*FAMILIES["cpo"].loss_types, "alphapo")
    for b, e, ca, g, a in ((0.5, 0.1, 0.7, 0.3, 0.25), (2.0, 0.0, 0.0, 1.1, 0.0))
] + [  # alpha near 0 (AlphaPO tends to SimPO): (1 - p^-alpha) / alpha must not cancel
    (t, dict(beta=2.0, label_smoothing=0.0, cpo_alpha=0.0, simpo_gamma=0.5, alpha=a))
    for t, a in (("alphapo", 1e-5), ("alphapo", 1e-8), ("alphapo", -1e-7), ("sigmoid", 1e-6))
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backends_match_spec(backend, dtype):
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    pc, pr, nc, nr = _inputs(5, seed=7, dtype=dtype)
    for loss_type, o in CPO_CASES:
        a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        out = cpo_loss(a, b, chosen_counts=nc, rejected_counts=nr, loss_type=loss_type,
                       backend=backend, **o)  # fmt: skip
        a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
        ref, m = cpo_spec(a64, b64, nc.double(), nr.double(), o["beta"], o["label_smoothing"],
                          loss_type, o["cpo_alpha"], o["simpo_gamma"], o["alpha"])  # fmt: skip
        _check(out, ref, m, (a, b), (a64, b64), tol)
    for beta in (0.1, 1.5):
        a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        out = orpo_loss(a, b, chosen_counts=nc, rejected_counts=nr, beta=beta, backend=backend)
        a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
        ref, m = orpo_spec(
            a64, b64, nc.double(), nr.double(), beta, torch.zeros((), dtype=a64.dtype)
        )
        _check(out, ref, m, (a, b), (a64, b64), tol)
    labels = torch.tensor([True, False, False, True, False])
    kl_lp, ref_kl = pr.detach() * 2, pr.detach() * 2 - 0.7
    for loss_type in FAMILIES["kto"].loss_types:
        a = pc.clone().requires_grad_()
        out = kto_loss(a, pr, labels, kl_logps=kl_lp, ref_kl_logps=ref_kl, beta=0.4,
                       loss_type=loss_type, desirable_weight=1.3, undesirable_weight=0.6,
                       backend=backend)  # fmt: skip
        a64 = a.detach().double().requires_grad_()
        ref, m = kto_spec(a64, pr.double(), labels, kl_lp.double(), ref_kl.double(), 0.4,
                          loss_type, 1.3, 0.6)  # fmt: skip
        _check(out, ref, m, (a,), (a64,), tol)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "sigmoid"])
def test_cpo_completion_without_tokens(backend, loss_type):
    # A completion with no counted token (sum 0, count 0): the averaged types divide by
    # max(count, 1), as dpo_loss does (TRL's CPOTrainer divides 0 by 0: NaN); the NLL stays the
    # mean over the batch's chosen tokens, and is 0 when there are none.
    pc, pr, nc, nr = _inputs(4, seed=3)
    pc[1], nc[1], pr[2], nr[2] = 0.0, 0, 0.0, 0
    for ncs in (nc, torch.zeros_like(nc)):  # ... and no chosen token in the whole batch
        a = (pc if ncs is nc else torch.zeros_like(pc)).float().requires_grad_()
        b = pr.float().requires_grad_()
        out = cpo_loss(a, b, chosen_counts=ncs, rejected_counts=nr, loss_type=loss_type,
                       beta=0.5, cpo_alpha=0.7, simpo_gamma=0.3, backend=backend)  # fmt: skip
        a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
        ref, m = cpo_spec(a64, b64, ncs.double().clamp(min=1), nr.double().clamp(min=1), 0.5,
                          0.0, loss_type, 0.0, 0.3, 0.0)  # fmt: skip
        m["nll_loss"] = -a64.sum() / ncs.double().sum().clamp(min=1)
        _check(out, ref + 0.7 * m["nll_loss"], m, (a, b), (a64, b64), 2e-5)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="triton is not installed")
def test_triton_sibling_kernel_walks_several_blocks():
    # N > 1024: the kernel loops over blocks (and the NLL pass sums over all of them)
    pc, pr, nc, nr = _inputs(1500, seed=4, dtype=torch.float32)
    o = dict(chosen_counts=nc, rejected_counts=nr, loss_type="ipo", cpo_alpha=0.5)
    for backend in ("triton", "reference"):
        a = pc.clone().requires_grad_()
        out = cpo_loss(a, pr, backend=backend, **o)
        (g,) = torch.autograd.grad(out.loss, a)
        if backend == "triton":
            got = (out.loss, out.losses, g)
    torch.testing.assert_close(got[0], out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], out.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], g, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("family", ["cpo", "orpo", "kto"])
def test_compiled_with_a_graph_break_matches_eager(family):
    # The sibling losses are autograd functions, not custom ops: torch.compile breaks the graph
    # around them (README, "Compiled") and the result and gradient are eager's.
    pc, pr, nc, nr = _inputs(4, seed=11, dtype=torch.float32)
    calls = {
        "cpo": lambda a: cpo_loss(a, pr, chosen_counts=nc, rejected_counts=nr).loss,
        "orpo": lambda a: orpo_loss(a, pr, chosen_counts=nc, rejected_counts=nr).loss,
        "kto": lambda a: kto_loss(a, pr, nc > 4, kl=0.1).loss,
    }
    fn = calls[family]
    torch._dynamo.reset()
    a1, a2 = pc.clone().requires_grad_(), pc.clone().requires_grad_()
    eager, comp = fn(a1), torch.compile(fn)(a2)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(a2.grad, a1.grad)


@pytest.mark.parametrize("backend", cpu_backends())
def test_cpo_infinite_margin_is_the_same_on_every_backend(backend):
    # Pair 1's rejected reward is -inf: a -inf log-prob sum, or AlphaPO's p^-alpha past float32's
    # range (alpha 2 at an average log-prob of -60). With label_smoothing 0 that pair's loss is 0
    # on every backend (0 * inf made the loss NaN on reference and cpu only, finite on triton);
    # with label_smoothing > 0 it is inf everywhere.
    pc, pr, nc, nr = _inputs(4, seed=5, dtype=torch.float32)
    minus_inf = pr.clone().index_fill_(0, torch.tensor([1]), -math.inf)
    overflow = pr.clone().index_put_((torch.tensor([1]),), -60.0 * nr[1].float())
    for loss_type, eps, alpha, rejected in [
        ("sigmoid", 0.0, 0.0, minus_inf),
        ("simpo", 0.0, 0.0, minus_inf),
        ("alphapo", 0.0, 2.0, overflow),
        ("sigmoid", 0.2, 0.0, minus_inf),
    ]:
        outs = []
        for be in ("reference", backend):
            a, b = pc.clone().requires_grad_(), rejected.clone().requires_grad_()
            o = cpo_loss(a, b, chosen_counts=nc, rejected_counts=nr, loss_type=loss_type,
                         label_smoothing=eps, alpha=alpha, cpo_alpha=0.0, backend=be)  # fmt: skip
            o.loss.backward()
            outs.append((o.loss.detach(), o.losses, a.grad, b.grad))
        (loss, per, ga, gb), other = outs
        assert per[1] == (math.inf if eps else 0.0), (loss_type, per)
        assert per[[0, 2, 3]].isfinite().all() and (per[[0, 2, 3]] > 0).all()
        torch.testing.assert_close(loss, per.mean())  # finite at eps 0, inf otherwise
        for got, want in zip(other, (loss, per, ga, gb), strict=True):
            torch.testing.assert_close(got, want, equal_nan=True)
