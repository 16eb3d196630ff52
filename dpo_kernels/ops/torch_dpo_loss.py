"""The DPO loss family in closed form: loss and its gradient in one pass, no autograd graph.

For P pairs, with c = chosen - ref_chosen and r = rejected - ref_rejected (the log-ratios), each
loss type is an elementwise formula whose derivative is written out here, so the backward is two
multiplications. Vectorized torch; used for CPU tensors (the Triton kernel in triton_dpo_loss.py
is the same formulas in one launch on CUDA). The spec is ops/reference.py::dpo_losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..common import ALPHA_CLAMP_MAX, LOSSES, DPOLossSpec

sig = torch.sigmoid


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) to the last bit (F.softplus returns x itself above x = 20)."""
    return -F.logsigmoid(-x)


def _scores(x: torch.Tensor, spec: DPOLossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """f-divergence score of a log-ratio and its derivative."""
    kind = spec.f_divergence_type
    if kind == "forward_kl":
        e = torch.exp(-x)
        return 1 - e, e
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(x), sig(-x)
    if kind == "alpha_divergence" and abs(spec.f_alpha_divergence_coef - 1.0) >= 1e-6:
        a1 = spec.f_alpha_divergence_coef - 1.0
        t = a1 * x
        tc = t.clamp(max=ALPHA_CLAMP_MAX)  # expm1: no cancellation for a coefficient near 1
        return torch.expm1(tc) / a1, torch.where(t <= ALPHA_CLAMP_MAX, torch.exp(tc), 0.0)
    return x, torch.ones_like(x)


def dpo_loss_and_grads(
    pc: torch.Tensor,  # [P] policy chosen log-probs
    pr: torch.Tensor,  # [P] policy rejected
    rc: torch.Tensor,  # [P] reference chosen
    rr: torch.Tensor,  # [P] reference rejected
    nc: torch.Tensor,  # [P] chosen token counts (ipo, sigmoid_norm, sft)
    nr: torch.Tensor,  # [P] rejected token counts
    spec: DPOLossSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-pair loss [P], dloss/dpc [P], dloss/dpr [P]); loss = mean over pairs of the
    weighted sum over loss types."""
    P = pc.shape[0]
    beta, eps = spec.beta, spec.label_smoothing
    c, r = pc - rc, pr - rr
    sc, dsc = _scores(c, spec)
    sr, dsr = _scores(r, spec)
    chosen_tokens = nc.sum().clamp(min=1)
    nc, nr = nc.clamp(min=1), nr.clamp(min=1)
    loss = torch.zeros_like(c)
    gc = torch.zeros_like(c)  # d(sum of per-pair losses)/dc
    gr = torch.zeros_like(c)
    for kind, w in zip(spec.loss_types, spec.loss_weights, strict=True):
        argument = LOSSES[kind].argument
        if argument == "normalized":
            ell, dd = _normalized_loss(kind, sc / nc - sr / nr, beta)
            loss += w * ell
            gc += w * dd * dsc / nc
            gr -= w * dd * dsr / nr
            continue
        if argument == "margin":
            ell, du = _margin_loss(kind, beta * (sc - sr), spec)
            loss += w * ell
            gc += w * beta * du * dsc
            gr -= w * beta * du * dsr
            continue
        if argument == "sorted":
            ell, dc_, dr_ = _sorted_loss(kind, pc, pr, rc, rr, c, r, beta, eps)
        elif argument == "log_ratios":
            ell, dc_, dr_ = _logratio_loss(kind, c, r, beta)
        else:  # chosen_nll (sft): minus the mean log-prob of the batch's chosen tokens
            ell = (-pc.sum() / chosen_tokens).expand_as(c)
            # d(sum over pairs)/dpc_b = -P / tokens; c = pc - rc, so that is d/dc too.
            dc_, dr_ = torch.full_like(c, -P) / chosen_tokens, torch.zeros_like(c)
        loss += w * ell
        gc += w * dc_
        gr += w * dr_
    return loss.mean(), loss, gc / P, gr / P


def _normalized_loss(kind: str, d: torch.Tensor, beta: float):
    """Loss of d = score_c / n_c - score_r / n_r and its derivative in d."""
    if kind == "ipo":
        q = d - 1 / (2 * beta)
        return q * q, 2 * q
    if kind == "sigmoid_norm":
        return softplus(-beta * d), -beta * sig(-beta * d)
    raise ValueError(f"no closed form for loss type {kind!r}")


def _margin_loss(kind: str, u: torch.Tensor, spec: DPOLossSpec):
    """Loss of u = beta * (score_c - score_r) and its derivative in u."""
    eps = spec.label_smoothing
    if kind == "sigmoid":
        return softplus(-u), -sig(-u)
    if kind == "hinge":
        return torch.relu(1 - u), -(1 - u > 0).to(u.dtype)
    if kind == "robust":
        ell, du = (1 - eps) * softplus(-u), -(1 - eps) * sig(-u)
        if eps:  # eps = 0 adds nothing, not 0 * inf = NaN at an infinite margin
            ell, du = ell - eps * softplus(u), du - eps * sig(u)
        return ell / (1 - 2 * eps), du / (1 - 2 * eps)
    if kind == "exo_pair":
        qw, ql = sig(u), sig(-u)
        kl_w = F.logsigmoid(u) - math.log1p(-eps)
        kl_l = F.logsigmoid(-u) - math.log(eps)
        return qw * kl_w + ql * kl_l, qw * ql * (kl_w - kl_l)
    # discopop: a logistic and an exponential loss blended by m = sigmoid(u / tau), written with
    # no inf * 0 at large |u|: 1 - m = sigmoid(-u / tau), exp(-u) * m = exp(-u - softplus(-u / tau))
    tau = spec.discopop_tau
    m, m1 = sig(u / tau), sig(-u / tau)
    a, em = softplus(-u), torch.exp(-u - softplus(-u / tau))
    amm = torch.where(m * m1 == 0, 0.0, a * m * m1)  # 0, not inf * 0, at u = -inf
    return a * m1 + em, -sig(-u) * m1 - amm / tau + em * (m1 / tau - 1)


def _logratio_loss(kind, c, r, beta):
    """Losses of the raw log-ratios (no f-divergence): loss, d/dc, d/dr."""
    if kind == "nca_pair":
        ell = softplus(-beta * c) + 0.5 * softplus(beta * c) + 0.5 * softplus(beta * r)
        return ell, beta * (0.5 * sig(beta * c) - sig(-beta * c)), 0.5 * beta * sig(beta * r)
    if kind == "bco_pair":
        return (
            softplus(-beta * c) + softplus(beta * r),
            -beta * sig(-beta * c),
            beta * sig(beta * r),
        )
    if kind == "sppo_hard":
        a, b = c - 0.5 / beta, r + 0.5 / beta
        return a * a + b * b, 2 * a, 2 * b
    if kind == "apo_zero":
        sc, sr = sig(beta * c), sig(beta * r)
        return 1 - sc + sr, -beta * sc * (1 - sc), beta * sr * (1 - sr)
    if kind == "apo_down":
        sc, sd = sig(beta * c), sig(beta * (c - r))
        dd = beta * sd * (1 - sd)
        return sc + 1 - sd, beta * sc * (1 - sc) - dd, dd
    raise ValueError(f"no closed form for loss type {kind!r}")


def _sorted_loss(kind, pc, pr, rc, rr, c, r, beta, eps):
    """AOT: sigmoid loss between sorted log-ratio distributions; gradients scattered back."""
    if kind == "aot":
        x, y = pc - pr, rc - rr  # policy and reference chosen-minus-rejected
    else:
        x, y = c, r  # chosen and rejected log-ratios
    xs, ix = torch.sort(x, stable=True)
    ys, iy = torch.sort(y, stable=True)
    u = beta * (xs - ys)
    ell, du = (1 - eps) * softplus(-u), -beta * (1 - eps) * sig(-u)
    if eps:
        ell, du = ell + eps * softplus(u), du + beta * eps * sig(u)
    dx = torch.zeros_like(x).index_copy_(0, ix, du)
    if kind == "aot":  # x = pc - pr; y has no policy term
        return ell, dx, -dx
    dy = torch.zeros_like(y).index_copy_(0, iy, -du)
    return ell, dx, dy
