"""The sibling losses (ops/reference_siblings.py) as closed forms in vectorized torch: the loss and
its gradient with respect to the sums in one pass, derivatives written out (CPU, and CUDA
without Triton). Same interface as the reference and the Triton kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import FAMILIES, SiblingSpec
from .reference_siblings import log1mexp


def sibling_loss_and_grads(
    spec: SiblingSpec,
    a: torch.Tensor,
    b: torch.Tensor,
    na: torch.Tensor,
    nb: torch.Tensor,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss with its NLL term, per-example losses, dloss/da, dloss/db)."""
    N = a.shape[0]
    beta = spec.beta
    if spec.family == "cpo":
        avg = spec.loss_type in FAMILIES["cpo"].averaged
        ca, cb = na.clamp(min=1), nb.clamp(min=1)  # a count of 0 counts as 1 (reference)
        # x: the log-prob the loss sees (average for ipo / simpo); dx: dx / d(sum)
        xc, dxc = (a / ca, 1 / ca) if avg else (a, torch.ones_like(a))
        xr, dxr = (b / cb, 1 / cb) if avg else (b, torch.ones_like(b))
        if spec.alpha != 0.0:
            tc, tr = -spec.alpha * xc, -spec.alpha * xr
            ec, er = torch.exp(tc), torch.exp(tr)  # p^-alpha
            xc, xr = -torch.expm1(tc) / spec.alpha, -torch.expm1(tr) / spec.alpha
            dxc, dxr = dxc * ec, dxr * er
        z = xc - xr
        if spec.loss_type == "simpo":
            z = z - spec.simpo_gamma / beta
        eps = spec.label_smoothing
        if spec.loss_type in ("sigmoid", "simpo"):
            u = beta * z
            per = (1 - eps) * F.softplus(-u)
            if eps:  # eps = 0 adds nothing, not 0 * inf = NaN at an infinite margin
                per = per + eps * F.softplus(u)
            dz = beta * (-(1 - eps) * torch.sigmoid(-u) + eps * torch.sigmoid(u))
        elif spec.loss_type == "hinge":
            per = torch.relu(1 - beta * z)
            dz = -beta * (1 - beta * z > 0).to(a.dtype)
        else:  # ipo
            q = z - 1 / (2 * beta)
            per, dz = q * q, 2 * q
        ga, gb = dz * dxc / N, -dz * dxr / N
        loss = per.mean()
        if spec.cpo_alpha != 0:
            tokens = na.sum().clamp(min=1)
            loss = loss - spec.cpo_alpha * a.sum() / tokens
            ga = ga - spec.cpo_alpha / tokens
        return loss, per, ga, gb
    if spec.family == "orpo":
        ac, ar = a / na, b / nb
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        per = beta * F.softplus(-log_odds)  # -beta * logsigmoid
        # d log_odds / d ac = -1 / expm1(ac); d / d ar = 1 / expm1(ar)
        dlo = -beta * torch.sigmoid(-log_odds) / N
        return per.mean(), per, dlo * (-1 / torch.expm1(ac)) / na, dlo / torch.expm1(ar) / nb
    x = a - b
    d = na > 0.5
    one = torch.ones_like(x)  # python floats in torch.where would round to float32
    sign = torch.where(d, -beta * one, beta * one)
    if spec.loss_type == "kto":
        s = torch.sigmoid(-sign * (x - kl))  # desirable sigmoid(beta (x - kl)), else (kl - x)
        per = 1 - s
    else:
        s = torch.sigmoid(beta * x)
        per = torch.where(d, 1 - s, s)
    w = torch.where(d, spec.desirable_weight * one, spec.undesirable_weight * one)
    g = w * sign * s * (1 - s) / N
    per = w * per
    return per.mean(), per, g, -g
