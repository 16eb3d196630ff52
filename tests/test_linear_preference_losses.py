"""The fused-head sibling losses (linear_cpo/simpo/orpo/kto_loss) against float64 references.

Reference: logits materialized in float64 -> log_softmax -> per-sequence sums -> the loss written
here from TRL 1.16's source. Loss within 1e-5, gradients of hidden, weight and bias within 1e-4
of their largest entry (float32 inputs), on the chunk route and with a memory_budget smaller
than one pair (the tile route with recompute).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_kernels import linear_cpo_loss, linear_kto_loss, linear_orpo_loss, linear_simpo_loss
from dpo_kernels.linear_dpo import logits_bytes

P, T, H, V = 3, 7, 8, 37
TINY = logits_bytes(2, V)  # smaller than one pair's counted tokens: the tile route
ONE = logits_bytes(12, V)  # about one pair a chunk: the 3-matmul route over several chunks


def make_batch(rows=2 * P, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64).float()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).float()
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).float()
    labels = torch.randint(0, V, (rows, T), generator=g)
    mask = torch.ones(rows, T, dtype=torch.bool)
    for r in range(rows):
        mask[r, : 1 + r % 3] = False  # prompts of different lengths
    labels[1, T - 1] = -100
    return hidden, weight, bias, labels, mask


def sums64(h64, w64, b64, labels, mask):
    """float64 naive reference: full logits, log_softmax, per-sequence sums and counts."""
    z = h64 @ w64.T + b64
    counted = (labels != -100) & mask
    logp = F.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(counted, logp, 0.0).sum(-1), counted.sum(-1).double()


def cpo_ref(pc, pr, nc, nr, beta, ls, loss_type, cpo_alpha, gamma, alpha):
    """trl.experimental.cpo.CPOTrainer.cpo_loss (+ concatenated_forward's average_log_prob for
    ipo/simpo and its NLL over the chosen tokens, scaled by cpo_alpha in get_batch_loss_metrics)."""
    xc, xr = (pc / nc, pr / nr) if loss_type in ("ipo", "simpo") else (pc, pr)
    if alpha != 0:
        xc, xr = (1 - torch.exp(xc) ** -alpha) / alpha, (1 - torch.exp(xr) ** -alpha) / alpha
    logits = xc - xr
    if loss_type == "simpo":
        logits = logits - gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses.mean() + cpo_alpha * (-pc.sum() / nc.sum())


def orpo_ref(pc, pr, nc, nr, beta):
    """trl.experimental.orpo.ORPOTrainer.odds_ratio_loss on average log-probs, plus the NLL (here
    over the chosen counted tokens)."""
    ac, ar = pc / nc, pr / nr
    log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
    return -pc.sum() / nc.sum() - (beta * F.logsigmoid(log_odds)).mean()


def kto_ref(logps, ref, des, kl, beta, loss_type, dw, uw):
    """trl.KTOTrainer._compute_loss (the kto and apo_zero_unpaired branches), mean over all."""
    lr = logps - ref
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (lr - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - lr))
    else:
        chosen, rejected = 1 - torch.sigmoid(beta * lr), torch.sigmoid(beta * lr)
    return torch.where(des, dw * chosen, uw * rejected).mean()


def check(fused, ref_fn, rows=2 * P, seed=0, **kw):
    hidden, weight, bias, labels, mask = make_batch(rows, seed)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = fused(h, w, labels, bias=b, mask=mask, **kw)
    out.loss.backward()
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    s, n = sums64(h64, w64, b64, labels, mask)
    ref = ref_fn(s, n)
    ref.backward()
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()
    return out, s.detach(), n


CPO_CASES = [
    ("sigmoid", 1.0, 0.0, 0.0),
    ("sigmoid", 0.0, 0.2, 0.0),
    ("hinge", 1.0, 0.0, 0.0),
    ("ipo", 0.5, 0.0, 0.0),
    ("simpo", 0.0, 0.1, 0.0),
    ("simpo", 1.0, 0.0, 0.3),  # AlphaPO reward shape with the NLL
]


@pytest.mark.parametrize("budget", [None, TINY])
@pytest.mark.parametrize(("loss_type", "cpo_alpha", "ls", "alpha"), CPO_CASES)
def test_linear_cpo(loss_type, cpo_alpha, ls, alpha, budget):
    beta, gamma = 0.4, 0.6
    out, s, n = check(
        linear_cpo_loss,
        lambda s, n: cpo_ref(
            s[:P], s[P:], n[:P], n[P:], beta, ls, loss_type, cpo_alpha, gamma, alpha
        ),
        beta=beta,
        label_smoothing=ls,
        loss_type=loss_type,
        cpo_alpha=cpo_alpha,
        simpo_gamma=gamma,
        alpha=alpha,
        memory_budget=budget,
    )
    xc = s[:P] / n[:P] if loss_type in ("ipo", "simpo") else s[:P]
    if alpha == 0:
        torch.testing.assert_close(out.chosen_rewards.double(), beta * xc, rtol=1e-5, atol=1e-5)
    nll = -s[:P].sum() / n[:P].sum() if cpo_alpha else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(out.metrics["nll_loss"].double(), nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["logps/chosen"].double(), xc.mean(), rtol=1e-5, atol=0)


def test_linear_cpo_alphapo_is_simpo_without_nll():
    beta, gamma = 2.0, 0.5
    check(
        linear_cpo_loss,
        lambda s, n: cpo_ref(s[:P], s[P:], n[:P], n[P:], beta, 0.0, "simpo", 0.0, gamma, 0.0),
        beta=beta,
        loss_type="alphapo",
    )


@pytest.mark.parametrize("budget", [None, TINY])
def test_linear_simpo(budget):
    beta, gamma = 2.5, 0.8
    out, s, n = check(
        linear_simpo_loss,
        lambda s, n: cpo_ref(s[:P], s[P:], n[:P], n[P:], beta, 0.0, "simpo", 0.0, gamma, 0.0),
        beta=beta,
        simpo_gamma=gamma,
        memory_budget=budget,
    )
    margins = beta * (s[:P] / n[:P] - s[P:] / n[P:])
    torch.testing.assert_close(
        out.metrics["rewards/margins"].double(), margins.mean(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "budget,beta", [(None, 0.3), (ONE, 0.3), (TINY, 0.3), (None, 0.0), (TINY, -0.5)]
)
def test_linear_orpo(budget, beta):
    out, s, n = check(
        linear_orpo_loss,
        lambda s, n: orpo_ref(s[:P], s[P:], n[:P], n[P:], beta),
        beta=beta,
        memory_budget=budget,
    )
    torch.testing.assert_close(
        out.metrics["nll_loss"].double(), -s[:P].sum() / n[:P].sum(), rtol=1e-5, atol=0
    )


def test_linear_orpo_without_nll():
    beta = 0.2
    check(
        linear_orpo_loss,
        lambda s, n: orpo_ref(s[:P], s[P:], n[:P], n[P:], beta) + s[:P].sum() / n[:P].sum(),
        beta=beta,
        nll=False,
    )


KTO_CASES = [("kto", 1.0, 1.0), ("kto", 1.3, 0.7), ("apo_zero_unpaired", 0.8, 1.5)]


@pytest.mark.parametrize("budget", [None, ONE, TINY])
@pytest.mark.parametrize(("loss_type", "dw", "uw"), KTO_CASES)
def test_linear_kto(loss_type, dw, uw, budget):
    N, beta = 6, 0.5
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    ref = torch.randn(N, generator=g, dtype=torch.float64).float() * 2 - 20
    des = torch.tensor([True, False, False, True, True, False])
    kl_logps = torch.randn(N, generator=g, dtype=torch.float64).float() - 18
    ref_kl = torch.randn(N, generator=g, dtype=torch.float64).float() - 20
    kl = (kl_logps.double() - ref_kl.double()).mean().clamp(min=0)
    assert kl > 0  # the KL term is exercised
    out, s, _ = check(
        lambda h, w, lab, **kw: linear_kto_loss(h, w, lab, ref, des, **kw),
        lambda s, n: kto_ref(s, ref.double(), des, kl, beta, loss_type, dw, uw),
        rows=N,
        beta=beta,
        loss_type=loss_type,
        desirable_weight=dw,
        undesirable_weight=uw,
        kl_logps=kl_logps,
        ref_kl_logps=ref_kl,
        memory_budget=budget,
    )
    rewards = beta * (s - ref.double())
    torch.testing.assert_close(out.chosen_rewards.double(), rewards[des], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_rewards.double(), rewards[~des], rtol=1e-5, atol=1e-5)
    if loss_type == "kto":
        torch.testing.assert_close(out.metrics["kl"].double(), kl, rtol=1e-6, atol=1e-6)


def test_linear_kto_kl_given_directly():
    N, beta, kl = 4, 0.3, 0.7
    ref = torch.full((N,), -18.0)
    des = torch.tensor([False, True, True, False])
    check(
        lambda h, w, lab, **kw: linear_kto_loss(h, w, lab, ref, des, **kw),
        lambda s, n: kto_ref(s, ref.double(), des, kl, beta, "kto", 1.0, 1.0),
        rows=N,
        beta=beta,
        kl=kl,
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda h, w, lab: linear_cpo_loss(h, w, lab, loss_type="dpo"), "unknown loss_type"),
        (
            lambda h, w, lab: linear_cpo_loss(h, w, lab, loss_type="ipo", beta=0.0),
            "beta must not be 0",
        ),
        (
            lambda h, w, lab: linear_simpo_loss(h, w, lab, label_smoothing=math.inf),
            "label_smoothing",
        ),
        (lambda h, w, lab: linear_orpo_loss(h[:-1], w, lab[:-1]), r"\[2P, T, H\]"),
        (lambda h, w, lab: linear_cpo_loss(h, w, lab, memory_budget=0), "memory_budget"),
        (lambda h, w, lab: linear_cpo_loss(h, w[:, :-1], lab), "weight"),
        (
            lambda h, w, lab: linear_kto_loss(h, w, lab, torch.zeros(6), torch.ones(6)),
            "bool",
        ),
        (
            lambda h, w, lab: linear_kto_loss(h, w, lab, torch.zeros(5), torch.ones(6, dtype=bool)),
            "ref_logps",
        ),
        (
            lambda h, w, lab: linear_kto_loss(h, w, lab, torch.zeros(6), torch.ones(6, dtype=bool)),
            "KL estimate",
        ),
        (
            lambda h, w, lab: linear_kto_loss(
                h[:-1], w, lab[:-1], torch.zeros(5), torch.ones(5, dtype=bool), kl=0.0
            ),
            "even N",
        ),
    ],
)
def test_bad_inputs_raise(call, match):
    hidden, weight, _, labels, _ = make_batch()
    with pytest.raises(ValueError, match=match):
        call(hidden, weight, labels)
