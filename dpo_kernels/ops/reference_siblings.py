"""The sibling losses of DPO (CPO / SimPO / AlphaPO, ORPO, KTO) as one family: their specification
(plain autograd formulas, written from TRL 1.16's source; float64 in, float64 out). Their table,
FAMILIES, and spec type, SiblingSpec, are in dpo_kernels/common.py.

Every backend computes `(loss, per-example losses, dloss/da, dloss/db)` of one spec, where a and
b are per-sequence log-prob sums: (chosen, rejected) for the paired losses, (policy, reference) of
labelled completions for KTO; na, nb are the completion token counts (paired) or, for KTO, the
labels as 1.0 (desirable) / 0.0. Backends: "reference" (this module, autograd), the torch closed
forms (ops/torch_sibling_losses.py: CPU, and CUDA without Triton) and one Triton kernel
(ops/triton_sibling_losses.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..common import FAMILIES, SiblingSpec

_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 for accuracy. Each branch sees only the x it
    is taken for: the other's infinite derivative (log1p at exp(x) = 1, near x = 0) would make
    the gradient 0 * inf = NaN."""
    low = x < _LOG_HALF
    return torch.where(
        low,
        torch.log1p(-torch.exp(torch.where(low, x, _LOG_HALF))),
        torch.log(-torch.expm1(torch.where(low, _LOG_HALF, x))),
    )


def sibling_losses(
    spec: SiblingSpec,
    a: torch.Tensor,
    b: torch.Tensor,
    na: torch.Tensor,
    nb: torch.Tensor,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss with its NLL term, per-example losses) as autograd formulas."""
    beta = spec.beta
    if spec.family == "cpo":
        # trl/experimental/cpo/cpo_trainer.py: CPOTrainer.cpo_loss on get_batch_logps(
        # average_log_prob=loss_type in ("ipo", "simpo")), plus cpo_alpha * the NLL of
        # concatenated_forward (mean over the chosen label tokens).
        avg = spec.loss_type in FAMILIES["cpo"].averaged
        c, r = (a / na.clamp(min=1), b / nb.clamp(min=1)) if avg else (a, b)  # as DPO's
        if spec.alpha != 0.0:
            # TRL's (1 - exp(c).pow(-alpha)) / alpha with p^-alpha as exp(-alpha * c): exp(c)
            # underflows to 0 below a sum of about -104 (float32), and 0^-alpha is inf (or 0
            # for alpha < 0, with an infinite derivative: NaN gradients); expm1: no cancellation
            # for a small alpha
            c = -torch.expm1(-spec.alpha * c) / spec.alpha
            r = -torch.expm1(-spec.alpha * r) / spec.alpha
        z = c - r
        if spec.loss_type == "simpo":
            z = z - spec.simpo_gamma / beta
        eps = spec.label_smoothing
        if spec.loss_type in ("sigmoid", "simpo"):
            per = -F.logsigmoid(beta * z) * (1 - eps)
            if eps:  # eps = 0 adds nothing, not 0 * inf = NaN at an infinite margin (as dpo_loss)
                per = per - F.logsigmoid(-beta * z) * eps
        elif spec.loss_type == "hinge":
            per = torch.relu(1 - beta * z)
        else:  # ipo
            per = (z - 1 / (2 * beta)) ** 2
        loss = per.mean()
        if spec.cpo_alpha != 0:
            loss = loss + spec.cpo_alpha * (-a.sum() / na.sum().clamp(min=1))
        return loss, per
    if spec.family == "orpo":
        # trl/experimental/orpo/orpo_trainer.py: ORPOTrainer.odds_ratio_loss on averaged logps;
        # get_batch_loss_metrics subtracts its mean (the NLL comes from the caller).
        c, r = a / na, b / nb
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        per = -beta * F.logsigmoid(log_odds)
        return per.mean(), per
    # trl/trainer/kto_trainer.py: KTOTrainer.kto_loss (kto: KL from the mismatched completions,
    # no gradient; apo_zero_unpaired: no KL), weighted per label, mean over all completions.
    x = a - b
    d = na > 0.5
    one = torch.ones_like(x)  # python floats in torch.where would round to float32
    if spec.loss_type == "kto":
        k = kl.detach()
        per = torch.where(d, 1 - torch.sigmoid(beta * (x - k)), 1 - torch.sigmoid(beta * (k - x)))
    else:
        per = torch.where(d, 1 - torch.sigmoid(beta * x), torch.sigmoid(beta * x))
    w = torch.where(d, spec.desirable_weight * one, spec.undesirable_weight * one)
    per = w * per
    return per.mean(), per


def sibling_loss_and_grads(spec, a, b, na, nb, kl=None):
    """The reference backend: (loss, per, dloss/da, dloss/db) through autograd, on copies of
    the [N] inputs (under torch.inference_mode they are inference tensors, which autograd may
    not record)."""
    with torch.inference_mode(False), torch.enable_grad():
        a_, b_ = (t.detach().clone().requires_grad_() for t in (a, b))
        na, nb, kl = (t if t is None else t.detach().clone() for t in (na, nb, kl))
        loss, per = sibling_losses(spec, a_, b_, na, nb, kl)
        ga, gb = torch.autograd.grad(loss, (a_, b_), allow_unused=True)
    gb = torch.zeros_like(b) if gb is None else gb
    return loss.detach(), per.detach(), ga, gb
