"""DPO's siblings fused with the LM head: CPO (SimPO, AlphaPO), ORPO and KTO from hidden states.

Each function takes the last hidden states and the LM head and returns what its per-sequence
counterpart in `preference_losses` returns (a `PreferenceLossOutput` with TRL's metrics), computed
from the sums of the same pass. The losses run on `linear_dpo.linear_pair_loss` (the chunk runner
of `linear_dpo_loss`: 3 matmuls over the counted tokens, float32 logits bounded by
`memory_budget`). The formulas are not written again here: each chunk's per-pair losses are the
per-sequence function called on the chunk's sums, and the NLL terms (CPO's cpo_alpha, ORPO's SFT
term) are the runner's chosen-token NLL, whose gradient is a constant known from the counts.

KTO is unpaired; its per-example losses are separable once the KL estimate is a constant (as in
TRL, where it carries no gradient), so the N completions are paired as row i with row i + N/2.
"""

from __future__ import annotations

import torch

from .common import SequenceLogprobs
from .linear_dpo import linear_pair_loss
from .preference_losses import (
    PreferenceLossOutput,
    cpo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
)
from .validation import check_compute_dtype


def _as_per_pair(out: PreferenceLossOutput, per: torch.Tensor) -> torch.Tensor:
    """[c] per-pair values `per` (detached) whose sum carries c times the gradient of out.loss
    (the chunk's mean): what `linear_pair_loss` sums over a chunk."""
    return per + (out.loss - out.loss.detach())


def _head(bias, mask, ignore_index, chosen_counts, rejected_counts, logit_scale, softcap,
          temperature, memory_budget, compute_dtype, backend) -> dict:  # fmt: skip
    return dict(
        bias=bias, mask=mask, ignore_index=ignore_index, chosen_counts=chosen_counts,
        rejected_counts=rejected_counts, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, memory_budget=memory_budget, compute_dtype=compute_dtype,
        backend=backend,
    )  # fmt: skip


def _pairs(hidden: torch.Tensor) -> int:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] % 2:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(
            "hidden must be [2P, T, H]: P chosen rows then the P rejected rows of the same pairs; "
            f"got {got}"
        )
    return hidden.shape[0] // 2


def _dry_counts(hidden, chosen_counts):
    """Stand-ins for a validation call before the pass (ones, or the given counts)."""
    P = hidden.shape[0] // 2
    if chosen_counts is not None:
        return chosen_counts
    return torch.ones(P, device=hidden.device)


def linear_cpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> PreferenceLossOutput:
    """`cpo_loss` of a [chosen (P); rejected (P)] batch from hidden states and the LM head, fused.

    hidden: [2P, T, H], aligned with labels (causal LM: ``hidden[:, :-1]`` with ``labels[:, 1:]``);
    weight, bias, labels, mask, ignore_index, logit_scale, softcap, temperature, memory_budget,
    compute_dtype, backend: as in `linear_dpo_loss`. chosen_counts, rejected_counts: [P] lengths
    the averaged loss types and the NLL divide by, when not the counted tokens. beta ... alpha: as
    in `cpo_loss` (same defaults). The cpo_alpha NLL is -cpo_alpha * sum(chosen sums) /
    sum(chosen lengths), over the same tokens as the preference term.
    """
    return _linear_cpo(**locals())[0]


def _linear_cpo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[PreferenceLossOutput, SequenceLogprobs]:
    """`linear_cpo_loss` and the policy's `SequenceLogprobs` of the same pass (no gradient),
    which trainers log."""
    P = _pairs(hidden)
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    opts = dict(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                simpo_gamma=simpo_gamma, alpha=alpha, backend=backend)  # fmt: skip
    n = _dry_counts(hidden, chosen_counts)
    zero = torch.zeros(P, device=hidden.device)
    cpo_loss(zero, zero, chosen_counts=n, rejected_counts=n, cpo_alpha=cpo_alpha, **opts)

    def per_pair(pc, pr, nc, nr):
        out = cpo_loss(pc, pr, chosen_counts=nc, rejected_counts=nr, cpo_alpha=0.0, **opts)
        return _as_per_pair(out, out.losses)

    head = _head(bias, mask, ignore_index, chosen_counts, rejected_counts, logit_scale, softcap,
                 temperature, memory_budget, compute_dtype, backend)  # fmt: skip
    loss, lp = linear_pair_loss(hidden, weight, labels, per_pair, nll_weight=cpo_alpha, **head)
    nc = lp.counts[:P] if chosen_counts is None else chosen_counts
    nr = lp.counts[P:] if rejected_counts is None else rejected_counts
    out = cpo_loss(lp.logps[:P], lp.logps[P:], chosen_counts=nc, rejected_counts=nr,
                   cpo_alpha=cpo_alpha, **opts)  # fmt: skip
    return out._replace(loss=loss), lp


def linear_simpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    beta: float = 2.0,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> PreferenceLossOutput:
    """`simpo_loss` fused with the LM head (`linear_cpo_loss` with loss_type="simpo",
    cpo_alpha=0); arguments as there, SimPO's defaults."""
    return linear_cpo_loss(
        hidden, weight, labels, bias=bias, mask=mask, ignore_index=ignore_index,
        chosen_counts=chosen_counts, rejected_counts=rejected_counts, beta=beta,
        label_smoothing=label_smoothing, loss_type="simpo", cpo_alpha=0.0,
        simpo_gamma=simpo_gamma, alpha=alpha, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, memory_budget=memory_budget, compute_dtype=compute_dtype,
        backend=backend,
    )  # fmt: skip


def linear_orpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    beta: float = 0.1,
    nll: bool = True,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> PreferenceLossOutput:
    """`orpo_loss` fused with the LM head: beta * mean(-log sigmoid(log odds ratio)) of the
    average log-probs, plus (nll=True) the NLL of the chosen counted tokens, -sum(chosen sums) /
    sum(chosen lengths), in the same pass. TRL takes its NLL over the whole chosen sequence
    (prompt included): count the prompt in labels/mask for that, or pass nll=False and add an NLL
    of your own. Other arguments as in `linear_cpo_loss`; metrics as `orpo_loss`'s."""
    P = _pairs(hidden)
    n = _dry_counts(hidden, chosen_counts)
    # Sums of -1, not 0: an average log-prob of 0 has infinite odds, a NaN loss that the
    # reference backend's autograd reports under torch.autograd.detect_anomaly.
    dry = torch.full((P,), -1.0, device=hidden.device)
    orpo_loss(dry, dry, chosen_counts=n, rejected_counts=n, beta=beta, backend=backend)

    def per_pair(pc, pr, nc, nr):
        out = orpo_loss(pc, pr, chosen_counts=nc, rejected_counts=nr, beta=beta, backend=backend)
        return _as_per_pair(out, out.losses)

    head = _head(bias, mask, ignore_index, chosen_counts, rejected_counts, logit_scale, softcap,
                 temperature, memory_budget, compute_dtype, backend)  # fmt: skip
    loss, lp = linear_pair_loss(hidden, weight, labels, per_pair, nll_weight=float(nll), **head)
    nc = lp.counts[:P] if chosen_counts is None else chosen_counts
    nr = lp.counts[P:] if rejected_counts is None else rejected_counts
    pc = lp.logps[:P]
    nll_value = -pc.sum() / nc.to(pc.dtype).sum().clamp(min=1) if nll else None
    out = orpo_loss(pc, lp.logps[P:], chosen_counts=nc, rejected_counts=nr, beta=beta,
                    nll_loss=nll_value, backend=backend)  # fmt: skip
    return out._replace(loss=loss)


def linear_kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> PreferenceLossOutput:
    """`kto_loss` of N labelled completions from hidden states and the LM head, fused.

    hidden: [N, T, H] (N even), labels / mask: [N, T] the completions' token ids; ref_logps: [N]
    reference sums; desirable: [N] bool (True = desirable; `kto_loss`'s ``labels``). The KL
    estimate is a constant computed beforehand without gradient, as TRL does: pass ``kl`` (e.g.
    averaged across processes) or kl_logps and ref_kl_logps (the mismatched completions' sums,
    e.g. from `linear_sequence_logprobs` under ``torch.no_grad``). Other options as in
    `kto_loss` and `linear_dpo_loss`. N must be even: rows i and i + N/2 go through the chunk
    runner together (any order of desirable and undesirable rows is fine); an odd N raises (a
    padding row would count in the mean): split the batch or drop a completion.
    """
    return _linear_kto(**locals())[0]


def _linear_kto(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
    stats: bool = False,
) -> tuple[PreferenceLossOutput, SequenceLogprobs]:
    """`linear_kto_loss` and the policy's `SequenceLogprobs` of the same pass (no gradient;
    with `stats`, its token statistics), which trainers log."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] % 2:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(
            f"linear_kto_loss needs hidden [N, T, H] with an even N (rows i and i + N/2 share a "
            f"chunk); got {got}: split the batch or drop one completion"
        )
    N = hidden.shape[0]
    P = N // 2
    opts = dict(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                undesirable_weight=undesirable_weight, backend=backend)  # fmt: skip
    if loss_type == "kto" and kl is None and kl_logps is not None and ref_kl_logps is not None:
        kl = kto_kl(kl_logps, ref_kl_logps)
    # Validates every option and the shapes of ref_logps / desirable / kl before the pass.
    # (in the matmuls' dtype: the kl it returns is used below, in that dtype's accumulation dtype)
    check_compute_dtype(compute_dtype)  # (the dry run below is made in it)
    zeros = hidden.new_zeros(N, dtype=compute_dtype or hidden.dtype)
    dry = kto_loss(zeros, ref_logps, desirable, kl=kl, kl_logps=kl_logps,
                   ref_kl_logps=ref_kl_logps, **opts)  # fmt: skip
    kl_c = dry.metrics["kl"] if loss_type == "kto" else None

    def per_pair(pc, pr, nc, nr, k0, k1):
        rows = torch.cat([torch.arange(k0, k1), torch.arange(P + k0, P + k1)]).to(hidden.device)
        out = kto_loss(torch.cat([pc, pr]), ref_logps[rows], desirable[rows], kl=kl_c, **opts)
        c = k1 - k0
        return _as_per_pair(out, (out.losses[:c] + out.losses[c:]) / 2)

    head = _head(bias, mask, ignore_index, None, None, logit_scale, softcap, temperature,
                 memory_budget, compute_dtype, backend)  # fmt: skip
    loss, lp = linear_pair_loss(hidden, weight, labels, per_pair, pair_index=True, stats=stats,
                               **head)  # fmt: skip
    out = kto_loss(lp.logps, ref_logps, desirable, kl=kl_c, **opts)
    return out._replace(loss=loss), lp
