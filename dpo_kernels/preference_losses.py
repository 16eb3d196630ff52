"""DPO's siblings: the CPO / SimPO / AlphaPO, ORPO and KTO losses, fused, with TRL's metrics.

Each family has one public function that takes per-sequence log-prob sums (and token counts, for
the losses that average over the completion) and returns the loss, the per-example losses, the
rewards and TRL's metrics. One table (`common.FAMILIES`) says what each family
needs; the loss and its gradient with respect to the sums come from one backend call, the
gradient written out (autograd only scales it): "triton" (one kernel launch), "cpu" (the closed
forms in vectorized torch) or "reference" (the spec's autograd formulas), chosen by `backend=` as
for `dpo_loss`. The formulas
follow TRL 1.16 (``trl.experimental.cpo.CPOTrainer.cpo_loss``,
``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss``, ``trl.KTOTrainer.kto_loss``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._autograd import guard_double_backward
from .backend import kernels, resolve_backend
from .common import FAMILIES, SiblingSpec, acc_dtype
from .ops.reference_siblings import log1mexp
from .validation import check_counts, number, refuse_without_values
from .validation import check_pair_inputs as _check_pair_inputs

CPO_LOSS_TYPES = (*FAMILIES["cpo"].loss_types, "alphapo")
# CPO loss types whose log-probs are averaged over the completion tokens (TRL's average_log_prob).
CPO_AVERAGED = FAMILIES["cpo"].averaged


class PreferenceLossOutput(NamedTuple):
    """What the sibling losses return: the loss (with gradient), the per-example losses and
    rewards, and the metrics TRL logs (all but the loss detached)."""

    loss: torch.Tensor  # scalar, carries gradient to the policy log-prob sums
    losses: torch.Tensor  # per-example loss (detached), before the mean (and any NLL term)
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached
    metrics: dict[str, torch.Tensor]  # TRL's names (detached scalars)


_SIBLINGS = "the sibling losses (cpo_loss, simpo_loss, orpo_loss, kto_loss)"


class _ClosedForm(torch.autograd.Function):
    """Returns a precomputed loss; its backward hands out precomputed gradients (one per input)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, *pairs: torch.Tensor) -> torch.Tensor:
        # pairs = (input_1, grad_1, input_2, grad_2, ...)
        ctx.dtypes = [x.dtype for x in pairs[0::2]]
        ctx.save_for_backward(*pairs[1::2], *pairs[0::2])
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        n = len(ctx.dtypes)
        grads, inputs = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        # The saved gradients are constants of the inputs (a second derivative through them
        # raises); the product with g stays differentiable in g.
        grads = guard_double_backward(grads, _SIBLINGS, *inputs)
        grads = [(g * grad).to(dtype) for grad, dtype in zip(grads, ctx.dtypes, strict=True)]
        return (None, *(x for grad in grads for x in (grad, None)))


def _spec(family: str, loss_type: str, **options) -> SiblingSpec:
    """A validated `SiblingSpec`: options are finite numbers (a TypeError or ValueError naming
    the option otherwise), as TRL trains with them (beta not 0 where the loss divides by it:
    `Family.divides_by_beta`), the loss type the family's."""
    fam = FAMILIES[family]
    if loss_type not in fam.loss_types:
        choices = CPO_LOSS_TYPES if family == "cpo" else fam.loss_types
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {', '.join(choices)}")
    options = {k: number(k, v) for k, v in options.items()}
    for k, v in options.items():
        if not math.isfinite(v):
            raise ValueError(f"{k} must be a finite number, got {v}")
    spec = SiblingSpec(family, loss_type, **options)
    if spec.beta == 0 and loss_type in fam.divides_by_beta:
        raise ValueError(f"beta must not be 0 with loss_type {loss_type!r}: it divides by beta")
    return spec


def _validate(spec: SiblingSpec, named: dict, counts_given: bool) -> int:
    """Checks the inputs of a spec against the family table; returns the batch size. Token
    counts may not be negative; orpo's may not be 0 either (an empty completion's average
    log-prob 0 has infinite odds), while 0 counts as 1 for CPO's averaged types (as for DPO)."""
    fam = FAMILIES[spec.family]
    unit = "pairs" if fam.paired else "completions"
    N = _check_pair_inputs(named, unit=unit)
    if N == 0:
        raise ValueError(f"{next(iter(named))} is empty: no {unit} to compute a loss over")
    nll = fam.nll and spec.cpo_alpha != 0
    if fam.paired and (spec.loss_type in fam.averaged or nll) and not counts_given:
        need = f"cpo_alpha={spec.cpo_alpha}" if nll and spec.family == "cpo" else None
        need = need or f"loss_type={spec.loss_type!r}"
        raise ValueError(
            f"{need} needs the completion lengths: pass chosen_counts and rejected_counts "
            "(SequenceLogprobs.counts gives them)"
        )
    if fam.paired and counts_given:
        counts = {k: named[k] for k in ("chosen_counts", "rejected_counts")}
        if spec.family == "orpo":
            why = (
                "orpo averages each completion's log-probs over its tokens and needs at least one "
                "(was a completion truncated to nothing by max_length?)"
            )
            check_counts(counts, 1, why)
        else:
            check_counts(counts, 0, "token counts cannot be negative")
    return N


def _run(spec, backend, a, b, na, nb, kl=None, grad_b: bool = True):
    """(loss attached to a (and b), per-example losses) from the backend's one call."""
    acc = acc_dtype(a.dtype)
    ad, bd = a.detach().to(acc), b.detach().to(acc)
    run = kernels(resolve_backend(backend, a.device)).sibling_loss_and_grads
    loss, per, ga, gb = run(spec, ad, bd, na.to(acc), nb.to(acc), kl)
    parts = (a, ga, b, gb) if grad_b else (a, ga)
    return _ClosedForm.apply(loss, *parts), per


def _paired_metrics(xc, xr, chosen_rewards, rejected_rewards) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(xc.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/rejected": xr.mean(),
        "logps/chosen": xc.mean(),
    }


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
    backend: str | None = None,
) -> PreferenceLossOutput:
    """CPO loss of P pairs (TRL CPOConfig names and defaults), with its NLL term on the chosen.

    chosen_logps, rejected_logps: [P] policy log-prob sums over the completion (carry gradient).
    chosen_counts, rejected_counts: [P] completion token counts; needed by ipo and simpo (which
        average the log-probs, as TRL does) and by cpo_alpha != 0 (the NLL is the mean over all
        chosen tokens: -sum(chosen_logps) / sum(chosen_counts)).
    loss_type "alphapo" is TRL's shorthand for loss_type="simpo" with cpo_alpha=0 (use alpha != 0
    for AlphaPO's reward shape r = (1 - p^-alpha) / alpha, with any loss type). SimPO is
    loss_type="simpo", cpo_alpha=0. label_smoothing applies to sigmoid and simpo only.
    backend: None (automatic), "triton", "cpu" or "reference", as for `dpo_loss`.
    """
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    spec = _spec("cpo", loss_type, beta=beta, label_smoothing=label_smoothing,
                 simpo_gamma=simpo_gamma, alpha=alpha, cpo_alpha=cpo_alpha)  # fmt: skip
    beta, alpha, cpo_alpha = spec.beta, spec.alpha, spec.cpo_alpha
    named = {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "chosen_counts": chosen_counts,
        "rejected_counts": rejected_counts,
    }
    counts_given = chosen_counts is not None and rejected_counts is not None
    _validate(spec, named, counts_given)
    acc = acc_dtype(chosen_logps.dtype)
    pc, pr = chosen_logps.detach().to(acc), rejected_logps.detach().to(acc)
    nc, nr = (chosen_counts, rejected_counts) if counts_given else (torch.ones_like(pc),) * 2
    nc, nr = nc.to(acc), nr.to(acc)
    loss, losses = _run(spec, backend, chosen_logps, rejected_logps, nc, nr)
    xc, xr = (pc / nc.clamp(min=1), pr / nr.clamp(min=1)) if loss_type in CPO_AVERAGED else (pc, pr)
    rc, rr = xc, xr
    if alpha != 0.0:
        rc, rr = -torch.expm1(-alpha * xc) / alpha, -torch.expm1(-alpha * xr) / alpha
    chosen_rewards, rejected_rewards = beta * rc, beta * rr
    metrics = _paired_metrics(xc, xr, chosen_rewards, rejected_rewards)
    metrics["nll_loss"] = -pc.sum() / nc.sum().clamp(min=1) if cpo_alpha != 0 else pc.new_zeros(())
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
    backend: str | None = None,
) -> PreferenceLossOutput:
    """SimPO: length-normalized sigmoid loss with target margin simpo_gamma, no reference, no NLL
    (TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0)."""
    return cpo_loss(
        chosen_logps, rejected_logps, chosen_counts=chosen_counts,
        rejected_counts=rejected_counts, beta=beta, label_smoothing=label_smoothing,
        loss_type="simpo", cpo_alpha=0.0, simpo_gamma=simpo_gamma, alpha=alpha, backend=backend,
    )  # fmt: skip


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    beta: float = 0.1,
    nll_loss: torch.Tensor | None = None,
    backend: str | None = None,
) -> PreferenceLossOutput:
    """ORPO: nll_loss - beta * mean(log sigmoid(log odds ratio)) (TRL ORPOConfig's beta is λ).

    chosen_logps, rejected_logps: [P] completion log-prob sums (carry gradient); the odds use their
        averages over chosen_counts / rejected_counts tokens, as TRL does.
    nll_loss: the SFT term, a scalar with its own gradient. TRL takes it over the whole chosen
        sequence (prompt and completion, every attended token), which the completion sums do not
        cover, so the caller computes it (e.g. -sum / count of `sequence_logprobs` over the chosen
        input ids); None for the odds-ratio term alone.
    losses: the per-pair -beta * log sigmoid(log odds ratio) (TRL's `losses` negated).
    """
    spec = _spec("orpo", "orpo", beta=beta)
    beta = spec.beta
    named = {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "chosen_counts": chosen_counts,
        "rejected_counts": rejected_counts,
    }
    _validate(spec, named, chosen_counts is not None and rejected_counts is not None)
    if nll_loss is not None and (not isinstance(nll_loss, torch.Tensor) or nll_loss.dim() != 0):
        raise ValueError("nll_loss must be a scalar tensor (the mean NLL of the chosen tokens)")
    acc = acc_dtype(chosen_logps.dtype)
    nc, nr = chosen_counts.to(acc), rejected_counts.to(acc)
    loss, losses = _run(spec, backend, chosen_logps, rejected_logps, nc, nr)
    ac = chosen_logps.detach().to(acc) / nc
    ar = rejected_logps.detach().to(acc) / nr
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    nll = loss.new_zeros(())
    if nll_loss is not None:
        nll = nll_loss
        loss = nll_loss.to(loss.dtype) + loss
    chosen_rewards, rejected_rewards = beta * ac, beta * ar
    metrics = _paired_metrics(ac, ar, chosen_rewards, rejected_rewards)
    metrics |= {
        "nll_loss": nll.detach(),
        "log_odds_ratio": torch.nn.functional.logsigmoid(log_odds).mean(),
        "log_odds_chosen": log_odds.mean(),
    }
    return PreferenceLossOutput(loss, losses, chosen_rewards, rejected_rewards, metrics)


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's KL estimate: mean of policy minus reference log-probs of the mismatched completions,
    clamped at 0, without gradient (one process; TRL gathers the mean across processes first)."""
    # bf16 / fp16 sums: their difference and mean in float32; float64 if either is (as torch
    # promotes stock's difference)
    acc = torch.promote_types(acc_dtype(kl_logps.dtype), acc_dtype(ref_kl_logps.dtype))
    return (kl_logps.detach().to(acc) - ref_kl_logps.detach().to(acc)).mean().clamp(min=0)


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
    backend: str | None = None,
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
    spec = _spec("kto", loss_type, beta=beta, desirable_weight=desirable_weight,
                 undesirable_weight=undesirable_weight)  # fmt: skip
    beta = spec.beta
    named = {
        "logps": logps,
        "ref_logps": ref_logps,
        "labels": labels,
        "kl_logps": kl_logps,
        "ref_kl_logps": ref_kl_logps,
    }
    _validate(spec, named, True)
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (True = desirable), got {labels.dtype}")
    acc = acc_dtype(logps.dtype)
    if loss_type == "kto":
        if kl is None:
            if kl_logps is None or ref_kl_logps is None:
                raise ValueError(
                    "loss_type='kto' needs the KL estimate: pass kl_logps and ref_kl_logps (the "
                    "mismatched completions' sums) or kl"
                )
            kl = kto_kl(kl_logps, ref_kl_logps)
        elif not isinstance(kl, torch.Tensor):
            kl = number("kl", kl)
            if not math.isfinite(kl):
                raise ValueError(f"kl must be a finite number, got {kl}")
        elif kl.numel() != 1 or not kl.is_floating_point():
            raise ValueError(
                f"kl must be a number or a scalar float tensor, got a {kl.dtype} tensor of shape "
                f"{tuple(kl.shape)}"
            )
        # dtype=acc: a Python float made at torch's default dtype (float32) would be rounded
        kl = torch.as_tensor(kl, dtype=acc, device=logps.device).detach().reshape(())
    else:  # apo_zero_unpaired: no KL term (TRL's KTOTrainer computes none)
        kl = logps.new_zeros((), dtype=acc)
    refuse_without_values(
        "kto_loss",
        labels,
        "returns the desirable and undesirable completions' rewards apart, "
        "whose sizes are read from the labels' values",
    )
    d = labels
    lab = d.to(acc)
    loss, losses = _run(spec, backend, logps, ref_logps, lab, lab, kl, grad_b=False)
    rewards = beta * (logps.detach().to(acc) - ref_logps.detach().to(acc))
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
