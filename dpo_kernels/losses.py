"""The DPO loss family (TRL DPOTrainer's formulas and defaults), fused, with its metrics.

`dpo_loss(...)` and the `DPOLoss` module take the four per-sequence log-prob sums (policy and
reference, chosen and rejected), validate the configuration, and run one fused op that returns the
loss and its gradient with respect to the policy log-probs. The loss is a mean over pairs (so
gradient accumulation over micro-batches must average, as it does for any per-pair mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .common import (
    F_DIVERGENCES,
    LOSS_TYPES,
    LOSSES,
    DPOLossSpec,
    PairLogprobs,
    SequenceLogprobs,
    acc_dtype,
    loss_types_where,
)
from .dpo_loss_op import dpo_pair_loss
from .validation import check_counts, check_pair_inputs, number, refuse_tangent


class DPOLossOutput(NamedTuple):
    """What `dpo_loss` returns: the loss (with gradient), the per-pair losses and rewards, and the
    metrics TRL logs (all but the loss detached)."""

    loss: torch.Tensor  # scalar, carries gradient to the policy log-probs
    losses: torch.Tensor  # [P] per-pair loss (detached)
    chosen_rewards: torch.Tensor  # [P] beta * (chosen - ref_chosen), detached
    rejected_rewards: torch.Tensor  # [P]
    metrics: dict[str, torch.Tensor]  # TRL's names: rewards/*, logps/* (detached means)


def check_spec(spec: object) -> None:
    """A prepared loss configuration must come from `make_spec` (it is validated there)."""
    if not isinstance(spec, DPOLossSpec):
        raise TypeError(
            f"spec must be a DPOLossSpec from make_spec(...), got {type(spec).__name__}; for a "
            "loss type by name pass loss_type= instead"
        )


def make_spec(
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> DPOLossSpec:
    """A validated loss configuration; raises ValueError naming the bad argument."""
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
        got = [type(t).__name__ for t in types] if isinstance(types, (list, tuple)) else None
        raise TypeError(
            "loss_type must be a string or a list of strings, got "
            f"{got or type(loss_type).__name__}"
        )
    types = tuple(types)
    if not types:
        raise ValueError("loss_type is empty; give one of " + ", ".join(LOSS_TYPES))
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown}; choose from {', '.join(LOSS_TYPES)}")
    if loss_weights is not None and not isinstance(loss_weights, (list, tuple)):
        raise TypeError(
            "loss_weights must be a list of numbers, one per loss type, got "
            f"{type(loss_weights).__name__}"
        )
    weights = (1.0,) * len(types) if loss_weights is None else tuple(
        number(f"loss_weights[{i}]", w) for i, w in enumerate(loss_weights)
    )  # fmt: skip
    if len(weights) != len(types):
        raise ValueError(
            f"loss_weights has {len(weights)} entries for {len(types)} loss types {list(types)}"
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"loss_weights must be finite numbers, got {list(weights)}")
    beta, label_smoothing = number("beta", beta), number("label_smoothing", label_smoothing)
    f_alpha_divergence_coef = number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    discopop_tau = number("discopop_tau", discopop_tau)
    # Any finite beta and label_smoothing, as TRL trains with them, but where a loss divides by
    # zero or takes the log of a non-positive number.
    if not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number, got {beta}")
    divides = [t for t in types if LOSSES[t].divides_by_beta]
    if beta == 0 and divides:
        raise ValueError(f"beta must not be 0 with loss_type {divides}: they divide by beta")
    if not math.isfinite(f_alpha_divergence_coef):
        raise ValueError(f"f_alpha_divergence_coef must be finite, got {f_alpha_divergence_coef}")
    if not math.isfinite(label_smoothing):
        raise ValueError(f"label_smoothing must be a finite number, got {label_smoothing}")
    if "exo_pair" in types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            "loss_type 'exo_pair' needs label_smoothing in (0, 1) (its log and log1p; the EXO "
            f"paper uses 1e-3), got {label_smoothing}"
        )
    if "robust" in types and label_smoothing == 0.5:
        raise ValueError("loss_type 'robust' divides by 1 - 2 * label_smoothing: 0.5 is refused")
    if f_divergence_type not in F_DIVERGENCES:
        choices = ", ".join(F_DIVERGENCES)
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose from {choices}")
    f_types = loss_types_where("f_divergence")
    if f_divergence_type != "reverse_kl" and not set(types) <= f_types:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} works only with loss types "
            f"{sorted(f_types)}, got {list(types)}"
        )
    if "discopop" in types and (discopop_tau == 0 or not math.isfinite(discopop_tau)):
        # (any other value trains, as in TRL, which reads it with discopop only)
        raise ValueError(
            f"discopop_tau must be finite and not 0 (it divides by it), got {discopop_tau}; "
            "TRL's default is 0.05"
        )
    return DPOLossSpec(
        types,
        weights,
        float(beta),
        float(label_smoothing),
        f_divergence_type,
        float(f_alpha_divergence_coef),
        float(discopop_tau),
    )


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    spec: DPOLossSpec | None = None,
    backend: str | None = None,
    weights: torch.Tensor | None = None,
    **config: Any,
) -> DPOLossOutput:
    """DPO loss of P pairs from per-sequence log-prob sums, fused, with TRL's metrics.

    chosen_logps, rejected_logps: [P] policy sums (carry gradient).
    ref_chosen_logps, ref_rejected_logps: [P] reference sums (no gradient); both None for
        reference-free training (a reference of 0).
    chosen_counts, rejected_counts: [P] completion token counts; needed by ipo, sigmoid_norm, sft.
    weights: optional [P] per-pair weights (no gradient), e.g. WPO's (TRL's use_weighting): every
        loss type's per-pair loss is multiplied by its pair's weight before the mean (sft, one
        value for every pair, so by the mean weight). Not with aot / aot_unpaired, which sort pairs.
    config: beta=0.1, loss_type="sigmoid" (or a list), loss_weights=None, label_smoothing=0.0,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05 (TRL's
        DPOConfig names and defaults); or pass a prepared `spec` from `make_spec`.
    """
    if spec is None:
        spec = make_spec(**config)
    elif config:
        raise TypeError(f"pass either spec or loss options, not both (got {sorted(config)})")
    check_spec(spec)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
    named = {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "chosen_counts": chosen_counts,
        "rejected_counts": rejected_counts,
        "weights": weights,
    }
    P = check_pair_inputs(named)
    if P == 0:
        raise ValueError("chosen_logps is empty: no pairs to compute a loss over")
    need = loss_types_where("needs_counts").intersection(spec.loss_types)
    if need and (chosen_counts is None or rejected_counts is None):
        raise ValueError(
            f"loss_type {sorted(need)} divides by completion lengths: pass chosen_counts and "
            "rejected_counts (SequenceLogprobs.counts gives them)"
        )
    if need:  # (a count of 0 counts as 1, as in TRL's DPOTrainer)
        check_counts({"chosen_counts": chosen_counts, "rejected_counts": rejected_counts}, 0,
                     "token counts cannot be negative")  # fmt: skip
    pc, pr = chosen_logps, rejected_logps
    rc = torch.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps
    rr = torch.zeros_like(pr) if ref_rejected_logps is None else ref_rejected_logps
    nc = torch.ones_like(pc) if chosen_counts is None else chosen_counts
    nr = torch.ones_like(pr) if rejected_counts is None else rejected_counts
    if weights is None:
        loss, per = dpo_pair_loss(pc, pr, rc, rr, nc, nr, spec, backend)
    else:
        loss, per = _weighted_loss(pc, pr, rc, rr, nc, nr, spec, backend, weights)
    with torch.no_grad():
        acc = acc_dtype(pc.dtype)  # float64 sums: float64 rewards and metrics, as the loss
        chosen_rewards = spec.beta * (pc.detach().to(acc) - rc.detach().to(acc))
        rejected_rewards = spec.beta * (pr.detach().to(acc) - rr.detach().to(acc))
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": pc.detach().to(acc).mean(),
            "logps/rejected": pr.detach().to(acc).mean(),
        }
    return DPOLossOutput(loss, per, chosen_rewards, rejected_rewards, metrics)


def _weighted_loss(pc, pr, rc, rr, nc, nr, spec: DPOLossSpec, backend, weights: torch.Tensor):
    """(sum over types of mean(weights * per-pair loss), weighted per-pair losses).

    Every pair loss but the count-coupled one (sft) depends on its own pair only: the fused op
    weights those pair losses (and their gradients). sft is one value for every pair: its
    weighted mean is mean(w) times that value."""
    if not weights.is_floating_point() or weights.requires_grad:
        raise ValueError("weights must be a floating-point tensor without gradient (detach it)")
    refuse_tangent("weights", weights)
    sorting = loss_types_where("sorting").intersection(spec.loss_types)
    if sorting:
        raise ValueError(
            f"weights do not combine with loss_type {sorted(sorting)}: those losses sort the "
            "pairs, which would misalign the per-pair weights (TRL refuses use_weighting too)"
        )
    acc = acc_dtype(pc.dtype)
    w = weights.detach().to(acc)
    per_pair_spec, coupled = spec.split(loss_types_where("count_coupled"))
    loss = pc.new_zeros((), dtype=acc)
    per = loss.new_zeros(pc.shape)
    if per_pair_spec is not None:
        loss, per = dpo_pair_loss(pc, pr, rc, rr, nc, nr, per_pair_spec, backend, w)
    if coupled is not None:
        value, _ = dpo_pair_loss(pc, pr, rc, rr, nc, nr, coupled, backend)
        loss = loss + w.mean() * value
        per = per + w * value.detach()
    return loss, per


class DPOLoss(nn.Module):
    """The fused DPO loss as a module: ``DPOLoss(beta=0.1, loss_type="sigmoid")(pairs)``.

    Call it with the four sums (and counts), or with a `PairLogprobs` / `SequenceLogprobs` of a
    concatenated [chosen; rejected] batch (then the counts come along, and the reference sums too
    when they were computed with ``ref_logits``).
    """

    def __init__(self, *, backend: str | None = None, **config: Any) -> None:
        """config: `make_spec`'s options (beta, loss_type, ...), checked here; backend as in
        `dpo_loss`."""
        super().__init__()
        self.spec = make_spec(**config)
        self.backend = backend

    def forward(
        self,
        chosen_logps: torch.Tensor | PairLogprobs | SequenceLogprobs,
        rejected_logps: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        chosen_counts: torch.Tensor | None = None,
        rejected_counts: torch.Tensor | None = None,
    ) -> DPOLossOutput:
        """`dpo_loss` of the four sums (and counts), or of a `PairLogprobs` / `SequenceLogprobs`
        given as the first argument."""
        if isinstance(chosen_logps, SequenceLogprobs):
            chosen_logps = chosen_logps.pairs()
        if isinstance(chosen_logps, PairLogprobs):
            p = chosen_logps
            if rejected_logps is not None:
                raise TypeError("pass either a PairLogprobs or separate tensors, not both")
            chosen_logps, rejected_logps = p.chosen_logps, p.rejected_logps
            if ref_chosen_logps is None and ref_rejected_logps is None:
                ref_chosen_logps, ref_rejected_logps = p.ref_chosen_logps, p.ref_rejected_logps
            chosen_counts = p.chosen_counts if chosen_counts is None else chosen_counts
            rejected_counts = p.rejected_counts if rejected_counts is None else rejected_counts
        if rejected_logps is None:
            raise TypeError("rejected_logps is missing")
        return dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_counts=chosen_counts,
            rejected_counts=rejected_counts,
            spec=self.spec,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        """The loss configuration, as print(module) shows it."""
        return ", ".join(f"{k}={v!r}" for k, v in self.spec.__dict__.items())
