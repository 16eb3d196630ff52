"""DPO's siblings: the CPO / SimPO / AlphaPO, ORPO and KTO losses, fused, with TRL's metrics.

Each family has one public function that takes per-sequence log-prob sums (and token counts, for
the losses that average over the completion) and returns the loss, the per-example losses, the
rewards and TRL's metrics. The loss and its gradient with respect to the sums are computed in one
pass with the derivative written out (torch backend, vectorized over the batch); autograd only
scales that gradient. The formulas follow TRL 1.16 (``trl.experimental.cpo.CPOTrainer.cpo_loss``,
``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss``, ``trl.KTOTrainer._compute_loss``); the
float64 specifications live in tests/test_preference_losses.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .validation import check_pair_inputs as _check_pair_inputs

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
# CPO loss types whose log-probs are averaged over the completion tokens (TRL's average_log_prob).
CPO_AVERAGED = frozenset(("ipo", "simpo"))


class PreferenceLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, carries gradient to the policy log-prob sums
    losses: torch.Tensor  # per-example loss (detached), before the mean (and any NLL term)
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached
    metrics: dict[str, torch.Tensor]  # TRL's names (detached scalars)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _ClosedForm(torch.autograd.Function):
    """Returns a precomputed loss; its backward hands out precomputed gradients (one per input)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, *pairs: torch.Tensor) -> torch.Tensor:
        # pairs = (input_1, grad_1, input_2, grad_2, ...)
        grads = pairs[1::2]
        ctx.dtypes = [x.dtype for x in pairs[0::2]]
        ctx.save_for_backward(*grads)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out: list[torch.Tensor | None] = [None]
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            out += [(g * grad).to(dtype), None]
        return tuple(out)


def _attach(loss: torch.Tensor, *inputs_and_grads: torch.Tensor) -> torch.Tensor:
    return _ClosedForm.apply(loss, *inputs_and_grads)


# --------------------------------------------------------------------------------------------
# CPO (and SimPO, AlphaPO)


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> PreferenceLossOutput:
    """CPO loss of P pairs (TRL CPOConfig names and defaults), with its NLL term on the chosen.

    chosen_logps, rejected_logps: [P] policy log-prob sums over the completion (carry gradient).
    chosen_counts, rejected_counts: [P] completion token counts; needed by ipo and simpo (which
        average the log-probs, as TRL does) and by cpo_alpha != 0 (the NLL is the mean over all
        chosen tokens: -sum(chosen_logps) / sum(chosen_counts)).
    loss_type "alphapo" is TRL's shorthand for loss_type="simpo" with cpo_alpha=0 (use alpha != 0
    for AlphaPO's reward shape r = (1 - p^-alpha) / alpha, with any loss type). SimPO is
    loss_type="simpo", cpo_alpha=0. label_smoothing applies to sigmoid and simpo only.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; choose from {', '.join(CPO_LOSS_TYPES)}"
        )
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    P = _check_pair_inputs(
        {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "chosen_counts": chosen_counts,
            "rejected_counts": rejected_counts,
        }
    )
    if P == 0:
        raise ValueError("chosen_logps is empty: no pairs to compute a loss over")
    averaged = loss_type in CPO_AVERAGED
    if (averaged or cpo_alpha != 0) and (chosen_counts is None or rejected_counts is None):
        need = f"loss_type={loss_type!r}" if averaged else f"cpo_alpha={cpo_alpha}"
        raise ValueError(
            f"{need} needs the completion lengths: pass chosen_counts and rejected_counts "
            "(SequenceLogprobs.counts gives them)"
        )
    acc = _acc(chosen_logps)
    pc, pr = chosen_logps.detach().to(acc), rejected_logps.detach().to(acc)
    if chosen_counts is not None and rejected_counts is not None:
        nc, nr = chosen_counts.to(acc), rejected_counts.to(acc)
    else:
        nc = nr = torch.ones_like(pc)
    # x: the log-prob the loss sees (average for ipo / simpo); dx: dx / d(sum)
    xc, dxc = (pc / nc, 1 / nc) if averaged else (pc, torch.ones_like(pc))
    xr, dxr = (pr / nr, 1 / nr) if averaged else (pr, torch.ones_like(pr))
    if alpha != 0.0:
        ec, er = torch.exp(-alpha * xc), torch.exp(-alpha * xr)  # p^-alpha
        rc, rr = (1 - ec) / alpha, (1 - er) / alpha
        dxc, dxr = dxc * ec, dxr * er
    else:
        rc, rr = xc, xr
    z = rc - rr
    if loss_type == "simpo":
        z = z - simpo_gamma / beta
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        u = beta * z
        losses = (1 - eps) * F.softplus(-u) + eps * F.softplus(u)
        dz = beta * (-(1 - eps) * torch.sigmoid(-u) + eps * torch.sigmoid(u))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
        dz = -beta * (1 - beta * z > 0).to(acc)
    else:  # ipo
        q = z - 1 / (2 * beta)
        losses, dz = q * q, 2 * q
    gc, gr = dz * dxc / P, -dz * dxr / P
    loss = losses.mean()
    nll = pc.new_zeros(())
    if cpo_alpha != 0:
        tokens = nc.sum()
        nll = -pc.sum() / tokens
        loss = loss + cpo_alpha * nll
        gc = gc - cpo_alpha / tokens
    loss = _attach(loss, chosen_logps, gc, rejected_logps, gr)
    chosen_rewards, rejected_rewards = beta * rc, beta * rr
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(acc).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/rejected": xr.mean(),
        "logps/chosen": xc.mean(),
        "nll_loss": nll,
    }
    return PreferenceLossOutput(loss, losses, chosen_rewards, rejected_rewards, metrics)


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    beta: float = 2.0,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO: length-normalized sigmoid loss with target margin simpo_gamma, no reference, no NLL
    (TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0)."""
    return cpo_loss(
        chosen_logps,
        rejected_logps,
        chosen_counts=chosen_counts,
        rejected_counts=rejected_counts,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        cpo_alpha=0.0,
        simpo_gamma=simpo_gamma,
        alpha=alpha,
    )


# --------------------------------------------------------------------------------------------
# ORPO

_LOG_HALF = -math.log(2.0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 for accuracy."""
    return torch.where(x < _LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    beta: float = 0.1,
    nll_loss: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """ORPO: nll_loss - beta * mean(log sigmoid(log odds ratio)) (TRL ORPOConfig's beta is λ).

    chosen_logps, rejected_logps: [P] completion log-prob sums (carry gradient); the odds use their
        averages over chosen_counts / rejected_counts tokens, as TRL does.
    nll_loss: the SFT term, a scalar with its own gradient. TRL takes it over the whole chosen
        sequence (prompt and completion, every attended token), which the completion sums do not
        cover, so the caller computes it (e.g. -sum / count of `sequence_logprobs` over the chosen
        input ids); None for the odds-ratio term alone.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    P = _check_pair_inputs(
        {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "chosen_counts": chosen_counts,
            "rejected_counts": rejected_counts,
        }
    )
    if P == 0:
        raise ValueError("chosen_logps is empty: no pairs to compute a loss over")
    acc = _acc(chosen_logps)
    nc, nr = chosen_counts.to(acc), rejected_counts.to(acc)
    ac = chosen_logps.detach().to(acc) / nc
    ar = rejected_logps.detach().to(acc) / nr
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    ratio = F.logsigmoid(log_odds)
    losses = beta * ratio
    # d log_odds / d ac = 1 / (1 - e^ac) = -1 / expm1(ac); d / d ar = 1 / expm1(ar)
    dlo = -beta * torch.sigmoid(-log_odds) / P  # d(-mean(beta * ratio)) / d log_odds
    gc = dlo * (-1 / torch.expm1(ac)) / nc
    gr = dlo * (1 / torch.expm1(ar)) / nr
    loss = _attach(-losses.mean(), chosen_logps, gc, rejected_logps, gr)
    nll = loss.new_zeros(())
    if nll_loss is not None:
        if not isinstance(nll_loss, torch.Tensor) or nll_loss.dim() != 0:
            raise ValueError("nll_loss must be a scalar tensor (the mean NLL of the chosen tokens)")
        nll = nll_loss
        loss = nll_loss.to(loss.dtype) + loss
    chosen_rewards, rejected_rewards = beta * ac, beta * ar
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(acc).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/rejected": ar.mean(),
        "logps/chosen": ac.mean(),
        "nll_loss": nll.detach(),
        "log_odds_ratio": ratio.mean(),
        "log_odds_chosen": log_odds.mean(),
    }
    return PreferenceLossOutput(loss, losses, chosen_rewards, rejected_rewards, metrics)


# --------------------------------------------------------------------------------------------
# KTO


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's KL estimate: mean of policy minus reference log-probs of the mismatched completions,
    clamped at 0, without gradient (one process; TRL gathers the mean across processes first)."""
    return (kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLossOutput:
    """KTO loss of N unpaired completions (TRL KTOConfig names and defaults).

    logps, ref_logps: [N] policy (carries gradient) and reference completion log-prob sums.
    labels: [N] bool, True for a desirable completion.
    kl_logps, ref_kl_logps: [N] sums of the mismatched completions (TRL's KL_* batch, the
        completions rotated by one within the batch) for loss_type="kto"; or pass `kl` directly
        (e.g. already averaged over processes). The KL term carries no gradient, as in TRL.
    loss = mean over all N of desirable_weight * (1 - sigmoid(beta * (logratio - kl))) for the
    desirable and undesirable_weight * (1 - sigmoid(beta * (kl - logratio))) for the undesirable;
    apo_zero_unpaired: 1 - sigmoid(beta * logratio) and sigmoid(beta * logratio), no KL.
    Metrics: kl, rewards/chosen|rejected, logps/chosen|rejected (means over each group, present
    only when the group is not empty), rewards/margins (when both are present).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; choose from {', '.join(KTO_LOSS_TYPES)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    N = _check_pair_inputs(
        {
            "logps": logps,
            "ref_logps": ref_logps,
            "labels": labels,
            "kl_logps": kl_logps,
            "ref_kl_logps": ref_kl_logps,
        },
        unit="completions",
    )
    if N == 0:
        raise ValueError("logps is empty: no completions to compute a loss over")
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (True = desirable), got {labels.dtype}")
    acc = _acc(logps)
    if loss_type == "kto":
        if kl is None:
            if kl_logps is None or ref_kl_logps is None:
                raise ValueError(
                    "loss_type='kto' needs the KL estimate: pass kl_logps and ref_kl_logps (the "
                    "mismatched completions' sums) or kl"
                )
            kl = kto_kl(kl_logps, ref_kl_logps)
        kl = torch.as_tensor(kl, device=logps.device).detach().to(acc).reshape(())
    else:
        kl = logps.new_zeros((), dtype=acc)
    x = logps.detach().to(acc) - ref_logps.detach().to(acc)
    d = labels
    one = torch.ones_like(x)
    if loss_type == "kto":
        s = torch.where(d, torch.sigmoid(beta * (x - kl)), torch.sigmoid(beta * (kl - x)))
        per = 1 - s
        # d/dx: desirable -beta s(1-s); undesirable +beta s(1-s)
        g = torch.where(d, -beta * one, beta * one) * s * (1 - s)
    else:
        s = torch.sigmoid(beta * x)
        per = torch.where(d, 1 - s, s)
        g = torch.where(d, -beta * one, beta * one) * s * (1 - s)
    w = torch.where(d, desirable_weight * one, undesirable_weight * one)
    losses = w * per
    loss = _attach(losses.mean(), logps, w * g / N)
    rewards = beta * x
    chosen_rewards, rejected_rewards = rewards[d], rewards[~d]
    metrics: dict[str, torch.Tensor] = {"kl": kl}
    lp = logps.detach().to(acc)
    if d.any():
        metrics["rewards/chosen"] = chosen_rewards.mean()
        metrics["logps/chosen"] = lp[d].mean()
    if (~d).any():
        metrics["rewards/rejected"] = rejected_rewards.mean()
        metrics["logps/rejected"] = lp[~d].mean()
    if d.any() and (~d).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return PreferenceLossOutput(loss, losses, chosen_rewards, rejected_rewards, metrics)
