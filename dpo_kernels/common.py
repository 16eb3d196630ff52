"""The shared vocabulary: result types, the DPO loss table and spec, the logit transform, the
accumulation dtype and the counted-token rule. Imports nothing else from the package, so every
layer (public ops, backends, losses) can use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

import torch

# --------------------------------------------------------------------------------------------
# Dtypes and the counted-token rule


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(t: torch.Tensor):
    """Autocast off on `t`'s device for a fused op's matmuls: they take the inputs' dtype (or the
    op's `compute_dtype`, `cast_to`) and accumulate in float32 on every backend (an autocast left
    on rounds the reference backend's logits to bf16; the fused LM head passes the autocast dtype
    as compute_dtype)."""
    if not torch.amp.is_autocast_available(t.device.type):  # meta, lazy, ...: nothing to undo
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def cast_to(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple:
    """A fused op's hidden, weight and bias in the dtype its matmuls take (`compute_dtype`: as
    torch.autocast casts a matmul's inputs; None: their own). Cast inside the op, so that autograd
    gets the gradients in the inputs' own dtypes from the float32 accumulators: cast before the
    op, they would come back rounded to the compute dtype."""
    return tensors if dtype is None else tuple(None if t is None else t.to(dtype) for t in tensors)


def stats_dtypes(acc: torch.dtype) -> tuple[torch.dtype, ...]:
    """dtypes of the token statistics (entropy, mean logit, is_top1, log_sum_sq), in order."""
    return (acc, acc, torch.bool, acc)


def counted_tokens(
    labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """[B, T] bool: tokens that enter the sums (label != ignore_index and mask != 0).

    Compared in int64: a narrow label dtype would wrap ignore_index (uint8 156 == -100)."""
    counted = labels.long() != ignore_index
    return counted if mask is None else counted & (mask != 0)


# --------------------------------------------------------------------------------------------
# Result types


class TokenStats(NamedTuple):
    """Per-token statistics of the policy logits that trainers use (no gradient; 0 where not
    counted): TRL's entropy, logits/chosen|rejected and mean_token_accuracy come from the first
    three, WPO's weights (TRL's use_weighting) from log_sum_sq."""

    entropy: torch.Tensor  # [B, T] -sum_v p_v log p_v
    mean_logits: torch.Tensor  # [B, T] sum_v z_v / V
    is_top1: torch.Tensor  # [B, T] bool: the label is the (first) argmax; False if a logit is NaN
    log_sum_sq: torch.Tensor  # [B, T] log sum_v p_v^2


class SequenceLogprobs(NamedTuple):
    """Per-sequence outputs of `sequence_logprobs` (float32; float64 for float64 logits)."""

    logps: torch.Tensor  # [B] sum of the counted tokens' log-probs (carries gradient)
    counts: torch.Tensor  # [B] int64 number of counted tokens
    token_logps: torch.Tensor  # [B, T] per-token log-probs, 0 where not counted (carries gradient)
    ref_logps: torch.Tensor | None = None  # [B] same sums under ref_logits (no gradient), if given
    ref_token_logps: torch.Tensor | None = None  # [B, T]
    stats: TokenStats | None = None  # with stats=True

    def pairs(self) -> PairLogprobs:
        """Split a concatenated [chosen; rejected] batch into its halves."""
        B = self.logps.shape[0]
        if B % 2:
            raise ValueError(
                f"pairs() needs an even batch ([chosen; rejected] concatenated), got {B} rows"
            )
        h = B // 2
        ref = self.ref_logps
        return PairLogprobs(
            self.logps[:h],
            self.logps[h:],
            None if ref is None else ref[:h],
            None if ref is None else ref[h:],
            self.counts[:h],
            self.counts[h:],
        )


class PairLogprobs(NamedTuple):
    """The four per-sequence sums a DPO loss needs, and the token counts of each half."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor


# --------------------------------------------------------------------------------------------
# The DPO loss family, as TRL's DPOTrainer defines it (same formulas, same defaults).


class LossInfo(NamedTuple):
    """What the rest of the package needs to know about one loss type.

    argument: what its per-pair loss is a function of, which groups its closed form:
        "margin"      u = beta * (score_c - score_r) of the f-divergence scores of the log-ratios
        "normalized"  d = score_c / n_c - score_r / n_r (length-normalized)
        "log_ratios"  the raw log-ratios c and r, separately (no f-divergence)
        "sorted"      the sorted log-ratio distributions of the whole batch (AOT)
        "chosen_nll"  the batch's chosen log-probs over its chosen tokens (sft)
    needs_counts: divides by completion lengths (dpo_loss then needs the token counts).
    f_divergence: a non-default f_divergence_type is allowed with it.
    divides_by_beta: its target margin is 1 / (2 beta) (beta = 0 is refused; any other finite
        beta trains, as in TRL).
    """

    argument: str
    needs_counts: bool = False
    f_divergence: bool = False
    divides_by_beta: bool = False

    @property
    def sorting(self) -> bool:
        """Sorts the pairs: a pair's gradient needs the whole batch, a per-pair weight would not
        stay with its pair."""
        return self.argument == "sorted"

    @property
    def count_coupled(self) -> bool:
        """Normalized by a batch total known before any forward (the chosen token count)."""
        return self.argument == "chosen_nll"


LOSSES: dict[str, LossInfo] = {
    "sigmoid": LossInfo("margin", f_divergence=True),
    "hinge": LossInfo("margin", f_divergence=True),
    "ipo": LossInfo("normalized", needs_counts=True, f_divergence=True, divides_by_beta=True),
    "exo_pair": LossInfo("margin", f_divergence=True),
    "nca_pair": LossInfo("log_ratios"),
    "robust": LossInfo("margin", f_divergence=True),
    "bco_pair": LossInfo("log_ratios"),
    "sppo_hard": LossInfo("log_ratios", divides_by_beta=True),
    "aot": LossInfo("sorted"),
    "aot_unpaired": LossInfo("sorted"),
    "apo_zero": LossInfo("log_ratios"),
    "apo_down": LossInfo("log_ratios"),
    "discopop": LossInfo("margin", f_divergence=True),
    "sft": LossInfo("chosen_nll", needs_counts=True, f_divergence=True),
    "sigmoid_norm": LossInfo("normalized", needs_counts=True, f_divergence=True),
}
LOSS_TYPES = tuple(LOSSES)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The alpha-divergence score exp((alpha - 1) * logratio) is clamped at this exponent (float32).
ALPHA_CLAMP_MAX = 80.0


def loss_types_where(flag: str) -> frozenset[str]:
    """The loss types whose LossInfo has `flag` (a field or property) true."""
    return frozenset(t for t, info in LOSSES.items() if getattr(info, flag))


@dataclass(frozen=True)
class DPOLossSpec:
    """Which losses, with which weights and hyper-parameters (TRL DPOConfig names, defaults)."""

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05

    def type_weights(self) -> list[float]:
        """The weight of every LOSS_TYPES entry (0: not used; a repeated type adds up)."""
        weights = [0.0] * len(LOSS_TYPES)
        for kind, w in zip(self.loss_types, self.loss_weights, strict=True):
            weights[LOSS_TYPES.index(kind)] += float(w)
        return weights

    def split(self, kinds: Collection[str]) -> tuple[DPOLossSpec | None, DPOLossSpec | None]:
        """(the loss types not in `kinds`, those in `kinds`) as two specs with the same
        hyper-parameters; None where empty."""
        parts = []
        for inside in (False, True):
            tw = [(t, w) for t, w in zip(self.loss_types, self.loss_weights, strict=True)
                  if (t in kinds) == inside]  # fmt: skip
            parts.append(self._with(tw) if tw else None)
        return parts[0], parts[1]

    def _with(self, types_weights: list[tuple[str, float]]) -> DPOLossSpec:
        types, weights = (tuple(x) for x in zip(*types_weights, strict=True))
        return dataclasses.replace(self, loss_types=types, loss_weights=weights)

    def pack(self) -> tuple[list[float], list[float], str]:
        """(type weights, numeric hyper-parameters, f_divergence_type): the spec as op-schema
        values; `unpack` inverts it (types merged and in LOSS_TYPES order)."""
        numbers = [float(getattr(self, name)) for name in _SPEC_PARAMS if name != _FDIV]
        return self.type_weights(), numbers, self.f_divergence_type

    @classmethod
    def unpack(cls, type_weights: list[float], numbers: list[float], fdiv: str) -> DPOLossSpec:
        """The spec that `pack` gave these values."""
        it = iter(numbers)
        params = {name: fdiv if name == _FDIV else next(it) for name in _SPEC_PARAMS}
        used = [(t, w) for t, w in zip(LOSS_TYPES, type_weights, strict=True) if w != 0]
        return cls(tuple(t for t, _ in used), tuple(w for _, w in used), **params)


# The hyper-parameter fields of DPOLossSpec, in order (every field after the types and weights).
_SPEC_PARAMS = tuple(DPOLossSpec.__dataclass_fields__)[2:]
_FDIV = "f_divergence_type"


# --------------------------------------------------------------------------------------------
# The fused linear op's logits


class LogitTransform(NamedTuple):
    """The fused linear op's logits: z = logit_scale * softcap(x) / temperature, x = h @ W.T + b,
    softcap(x) = softcap * tanh(x / softcap) (the identity when softcap is None).

    Travels through op schemas as one list of floats (`pack`), None as 0.0 (never a valid value)."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @property
    def factor(self) -> float:
        """logit_scale / temperature: z = softcap(x) * factor, in this order in every backend."""
        return self.logit_scale / self.temperature

    def pack(self) -> list[float]:
        """The fields as floats, None as 0.0: the value op schemas carry."""
        return [0.0 if v is None else float(v) for v in self]

    @classmethod
    def unpack(cls, values: list[float]) -> LogitTransform:
        """The transform that `pack` gave `values`."""
        optional = {name for name, d in cls._field_defaults.items() if d is None}
        return cls(*(None if name in optional and v == 0.0 else v
                     for name, v in zip(cls._fields, values, strict=True)))  # fmt: skip


# --------------------------------------------------------------------------------------------
# The sibling losses of DPO (CPO / SimPO / AlphaPO, ORPO, KTO): one table, one spec type.


class Family(NamedTuple):
    """What a sibling loss needs and does (drives validation and the kernels)."""

    kernel: int  # the Triton kernel's KIND
    paired: bool  # chosen / rejected pairs (else unpaired labelled completions)
    loss_types: tuple[str, ...]
    averaged: frozenset[str]  # loss types that average the log-probs over the completion tokens
    reference: bool  # needs the reference model's log-probs
    nll: bool  # may add an NLL term on the chosen completions
    # loss types that divide by beta (beta = 0 refused); any other finite beta trains, as in TRL
    divides_by_beta: frozenset[str] = frozenset()


FAMILIES: dict[str, Family] = {
    "cpo": Family(
        0,
        True,
        ("sigmoid", "hinge", "ipo", "simpo"),
        frozenset(("ipo", "simpo")),
        False,
        True,
        divides_by_beta=frozenset(("ipo", "simpo")),  # 1 / (2 beta), simpo_gamma / beta
    ),
    "orpo": Family(1, True, ("orpo",), frozenset(("orpo",)), False, True),
    "kto": Family(2, False, ("kto", "apo_zero_unpaired"), frozenset(), True, False),
}


class SiblingSpec(NamedTuple):
    """One sibling loss with its options (TRL's config names; unused fields keep defaults)."""

    family: str
    loss_type: str
    beta: float
    label_smoothing: float = 0.0  # cpo sigmoid / simpo
    simpo_gamma: float = 0.5  # cpo simpo
    alpha: float = 0.0  # cpo: AlphaPO reward shape (1 - p^-alpha) / alpha
    cpo_alpha: float = 0.0  # cpo: weight of the NLL on the chosen completions
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
