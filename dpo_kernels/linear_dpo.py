"""The fused linear DPO loss: hidden states + LM head + DPO loss, gradients made in the forward.

`linear_dpo_loss(hidden, weight, labels, ...)` takes the last hidden states of a concatenated
[chosen (P); rejected (P)] batch and the LM head, and returns what `dpo_loss` returns. The
[tokens, vocab] logits never exist at once: the counted tokens are processed in chunks of whole
pairs whose float32 logits fit `memory_budget`. Once a chunk's logits are projected (matmul 1),
each pair's log-prob sums are known, so the loss gradient g of each pair is too (the loss family's
closed forms, called on the chunk's sums); with q = onehot - softmax (made in place, in the
same read of the logits that folds their log-sum-exps), dz = g * q gives dh = g * (q @ W)
(matmul 2) and dW += q.T @ (g * h) (matmul 3). That is 3 matmuls over the counted tokens, against
4 for `linear_sequence_logprobs` + `dpo_loss` (whose backward recomputes the logits). The
backward only scales the stored gradients by the incoming one. The chunk machinery lives in
`linear_dpo_chunks.py`; `linear_dpo` also returns the policy's log-probs and token statistics of
the same pass (what trainers log), and `linear_pair_loss` fuses other pair-separable losses.

Two routes recompute the logits (4 matmuls, still bounded by the budget):
- a pair whose counted tokens alone do not fit the budget is done in token x vocabulary tiles: a
  first pass folds the log-sum-exps, a second recomputes each tile and forms its gradient;
- loss types whose per-pair gradient depends on the other pairs' log-probs (`aot`,
  `aot_unpaired`: they sort the whole batch) take a two-pass route: every pair's sums first, then
  the loss gradient of the whole batch, then the tiles again for dh and dW.
`sft` is normalized by the batch's chosen tokens, which are known before any matmul, so it stays
on the 3-matmul route.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from . import linear_dpo_chunks as chunks
from ._autograd import input_grads
from .backend import kernels, resolve_backend
from .common import (
    DPOLossSpec,
    LogitTransform,
    SequenceLogprobs,
    TokenStats,
    acc_dtype,
    counted_tokens,
    loss_types_where,
    stats_dtypes,
)
from .losses import DPOLossOutput, check_spec, dpo_loss, make_spec
from .validation import check_flag, make_transform, number, refuse_without_values
from .validation import check_linear_inputs as _check_linear_inputs
from .validation import check_values as _check_values

DEFAULT_MEMORY_BUDGET = chunks.DEFAULT_MEMORY_BUDGET
# make_spec's defaults: the loss options linear_dpo_loss may not change when given a spec
_SPEC_DEFAULTS = {k: p.default for k, p in inspect.signature(make_spec).parameters.items()}


class _DPOPairLoss:
    """The DPO loss family as a `chunks.PairLoss`: the closed-form gradients of `dpo_loss`'s
    kernel. The pair-separable part's gradient on a chunk is the chunk's mean-loss gradient times
    (chunk pairs / P); sft's is a constant, -weight / (chosen tokens of the batch)."""

    def __init__(self, spec, kernel, rc, rr, nc, nr):
        self.spec, self.kernel = spec, kernel
        self.rc, self.rr, self.nc, self.nr = rc, rr, nc, nr
        self.P = rc.shape[0]
        self.coupled = bool(set(spec.loss_types) & loss_types_where("sorting"))
        self.sep, sft = spec.split(loss_types_where("count_coupled"))
        self.sft_dpc = None
        if sft is not None:
            zero = torch.zeros_like(rc)
            self.sft_dpc = self._grads(0, self.P, zero, zero, sft)[0]

    def _grads(self, k0, k1, pc, pr, spec):
        c = slice(k0, k1)
        return self.kernel(pc, pr, self.rc[c], self.rr[c], self.nc[c], self.nr[c], spec)[2:]

    def grad(self, k0: int, k1: int, sums: torch.Tensor) -> torch.Tensor:
        c = k1 - k0
        pcs, prs = sums[:c], sums[c:]
        if self.coupled:  # (0, P): the whole batch at once
            return torch.cat(self._grads(0, self.P, pcs, prs, self.spec))
        g = torch.zeros_like(sums)
        if self.sep is not None:
            dpc, dpr = self._grads(k0, k1, pcs, prs, self.sep)
            g[:c] += dpc * (c / self.P)
            g[c:] += dpr * (c / self.P)
        if self.sft_dpc is not None:
            g[:c] += self.sft_dpc[k0:k1]
        return g

    def loss(self, pc: torch.Tensor, pr: torch.Tensor) -> torch.Tensor:
        return self.kernel(pc, pr, self.rc, self.rr, self.nc, self.nr, self.spec)[0]


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    spec: DPOLossSpec | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> DPOLossOutput:
    """DPO loss of a [chosen (P); rejected (P)] batch from hidden states and the LM head, fused.

    hidden: [2P, T, H] last hidden states (bf16, fp16, fp32 or fp64), aligned with labels (for a
        causal LM: ``hidden[:, :-1]`` with ``labels[:, 1:]``); rows 0..P-1 are the chosen
        completions, rows P..2P-1 the rejected ones of the same pairs.
    weight, bias: the LM head ([V, H], optional [V]), same dtype as hidden.
    labels, mask, ignore_index: [2P, T] token ids; tokens equal to ignore_index or with mask 0
        (the prompt, padding) do not count.
    ref_chosen_logps, ref_rejected_logps: [P] reference sums (no gradient); both None for
        reference-free training.
    beta ... discopop_tau (or a prepared ``spec`` from `make_spec`): the loss, as in `dpo_loss`.
    logit_scale, softcap, temperature: z = logit_scale * softcap(hidden @ weight.T + bias) /
        temperature, as in `linear_sequence_logprobs`.
    memory_budget: bytes of float32 logits (working buffers included) alive at once; default
        `DEFAULT_MEMORY_BUDGET` (64 MiB on CPU, 2 GiB on CUDA). Pairs go in chunks that fit;
        a pair that does not fit alone is done in tiles with recompute.
    compute_dtype: the dtype the matmuls take hidden, weight and bias in, as in
        `linear_sequence_logprobs` (gradients still in the inputs' own dtypes).

    Returns `dpo_loss`'s `DPOLossOutput`; ``loss`` carries gradient to hidden, weight and bias,
    which were computed during this call (3 matmuls over the counted tokens; `aot` and
    `aot_unpaired` take a two-pass route with 4, see the module docstring) and are scaled by the
    incoming gradient in the backward. A frozen hidden or weight skips its matmul; under
    ``torch.no_grad`` only the logits are computed. `linear_dpo` also returns the log-probs.
    """
    options = dict(
        beta=beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau,
    )
    if spec is None:
        spec = make_spec(**options)
    elif changed := sorted(k for k, v in options.items() if v != _SPEC_DEFAULTS[k]):
        raise TypeError(f"pass either spec or loss options, not both (got {changed})")
    return linear_dpo(
        hidden, weight, labels, bias=bias, mask=mask, ignore_index=ignore_index,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, spec=spec,
        logit_scale=logit_scale, softcap=softcap, temperature=temperature,
        memory_budget=memory_budget, compute_dtype=compute_dtype, backend=backend,
    ).loss  # fmt: skip


class _Call(NamedTuple):
    """A validated call: the transform, budget, backend, counted tokens and the lengths."""

    tf: LogitTransform
    budget: int
    backend: str
    counted: torch.Tensor
    counts: torch.Tensor
    nc: torch.Tensor
    nr: torch.Tensor


def _prepare(hidden, weight, bias, labels, mask, ignore_index, chosen_counts, rejected_counts,
             logit_scale, softcap, temperature, memory_budget, compute_dtype, backend,
             pairs):  # fmt: skip
    """Validates the inputs of a fused linear pair loss (pairs: further [P] tensors by name), all
    but the values of labels and mask (`check_values`: a host sync, done where the loss runs)."""
    tf = make_transform(logit_scale, softcap, temperature)
    _check_linear_inputs(hidden, weight, bias, labels, mask, ignore_index, compute_dtype)
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(
            "hidden must be [2P, T, H]: P chosen rows then the P rejected rows of the same pairs; "
            f"got shape {tuple(hidden.shape)}"
        )
    if hidden.shape[0] == 0:
        raise ValueError("hidden has no rows: no pairs to compute a loss over")
    if memory_budget is None:
        memory_budget = chunks.DEFAULT_MEMORY_BUDGET.get(
            hidden.device.type, chunks.DEFAULT_MEMORY_BUDGET["cpu"]
        )
    if (not isinstance(memory_budget, numbers.Integral) or isinstance(memory_budget, bool)
            or not 0 < memory_budget < 2**63):  # fmt: skip
        raise ValueError(
            f"memory_budget must be a positive number of bytes below 2**63, got {memory_budget!r}"
        )
    if (pairs.get("ref_chosen_logps") is None) != (pairs.get("ref_rejected_logps") is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
    if (chosen_counts is None) != (rejected_counts is None):
        raise ValueError("give both chosen_counts and rejected_counts, or neither")
    P = hidden.shape[0] // 2
    pairs = dict(pairs, chosen_counts=chosen_counts, rejected_counts=rejected_counts)
    for name, t in pairs.items():
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (P,)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [{P}] tensor (one per pair), got {got}")
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    name = resolve_backend(backend, hidden.device)
    counted = counted_tokens(labels, mask, ignore_index)
    counts = counted.sum(-1)
    nc = counts[:P] if chosen_counts is None else chosen_counts
    nr = counts[P:] if rejected_counts is None else rejected_counts
    return _Call(tf, int(memory_budget), name, counted, counts, nc, nr)


def _token_outputs(call: _Call, sums, tok, token_stats, stats: bool) -> SequenceLogprobs:
    return SequenceLogprobs(
        sums, call.counts, tok, stats=TokenStats(*token_stats) if stats else None
    )


@torch.library.custom_op("dpo_kernels::linear_dpo", mutates_args=())
def _linear_dpo_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ignore_index: int,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    nc: torch.Tensor,
    nr: torch.Tensor,
    type_weights: list[float],
    params: list[float],
    f_divergence_type: str,
    transform: list[float],
    budget: int,
    backend: str,
    wants: list[bool],
    stats: bool,
    compute_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """`chunks.loss_outputs` of the DPO loss that `DPOLossSpec.pack` gave (type_weights, params,
    f_divergence_type): (loss, sums, token log-probs, 4 token statistics, dh, dw, db), with the
    gradients of the inputs in `wants` (hidden, weight, bias) made in the forward (matmuls in
    compute_dtype; the gradients in the accumulation dtype, rounded to the inputs' own in the
    backward)."""
    _check_values(labels, mask, ignore_index, weight.shape[0])
    acc, P = acc_dtype(compute_dtype or hidden.dtype), hidden.shape[0] // 2
    zero = torch.zeros(P, dtype=acc, device=hidden.device)
    rc, rr = (zero if r is None else r.detach().to(acc) for r in (ref_chosen, ref_rejected))
    spec = DPOLossSpec.unpack(type_weights, params, f_divergence_type)
    loss_fn = _DPOPairLoss(
        spec, kernels(backend).dpo_loss_and_grads, rc, rr, nc.to(acc), nr.to(acc)
    )
    return chunks.loss_outputs(
        hidden, weight, bias, labels, counted_tokens(labels, mask, ignore_index), loss_fn,
        LogitTransform.unpack(transform), budget, backend, tuple(wants), stats, compute_dtype,
    )  # fmt: skip


@_linear_dpo_op.register_fake
def _(hidden, weight, bias, labels, mask, ignore_index, rc, rr, nc, nr, type_weights, params,
      f_divergence_type, transform, budget, backend, wants, stats, compute_dtype):  # fmt: skip
    acc = acc_dtype(compute_dtype or hidden.dtype)
    token_stats = [hidden.new_empty(0) for _ in range(4)]
    if stats:
        token_stats = [hidden.new_empty(labels.shape, dtype=d) for d in stats_dtypes(acc)]
    grads = [
        hidden.new_empty(t.shape, dtype=acc) if want and t is not None else hidden.new_empty(0)
        for t, want in zip((hidden, weight, bias), wants, strict=True)
    ]
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc),
            hidden.new_empty(labels.shape, dtype=acc), *token_stats, *grads)  # fmt: skip


def _linear_dpo_setup(ctx, inputs, output):
    # Only the loss is differentiable; no zeros for the other outputs' gradients (one would be
    # the size of the head).
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    chunks.save_grads(ctx, output[-3:], tuple(inputs[16]), inputs[:3])


def _linear_dpo_backward(ctx, grad_loss, *_):
    if grad_loss is None:  # not materialized: nothing flowed into the loss
        return input_grads(ctx)
    return input_grads(ctx, *chunks.scaled_grads(ctx, grad_loss))


_linear_dpo_op.register_autograd(_linear_dpo_backward, setup_context=_linear_dpo_setup)


class LinearDPOOutput(NamedTuple):
    """`linear_dpo`'s result: the loss (as `dpo_loss` returns it) and the policy's log-probs of
    the same pass (no gradient: it flows through ``loss.loss``)."""

    loss: DPOLossOutput
    logprobs: SequenceLogprobs  # [2P] sums and counts, [2P, T] token log-probs (and stats)


def linear_dpo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    spec: DPOLossSpec,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    stats: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> LinearDPOOutput:
    """`linear_dpo_loss` with a prepared `spec` (`make_spec`), returning the policy's log-probs
    too: what trainers log. chosen_counts, rejected_counts: [P] lengths the length-normalized
    losses (ipo, sigmoid_norm, sft) divide by, when they are not the counted tokens (TRL counts
    the unshifted completion); stats: the `TokenStats` of the policy logits, from the same pass;
    compute_dtype: as in `linear_dpo_loss`."""
    check_spec(spec)
    check_flag("stats", stats)
    pairs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    call = _prepare(hidden, weight, bias, labels, mask, ignore_index, chosen_counts,
                    rejected_counts, logit_scale, softcap, temperature, memory_budget,
                    compute_dtype, backend, pairs)  # fmt: skip
    P = hidden.shape[0] // 2
    name, nc, nr = call.backend, call.nc, call.nr
    wants = [torch.is_grad_enabled() and t is not None and t.requires_grad
             for t in (hidden, weight, bias)]  # fmt: skip
    loss, sums, tok, *rest = _linear_dpo_op(
        hidden, weight, bias, labels, mask, ignore_index, ref_chosen_logps, ref_rejected_logps,
        nc, nr, *spec.pack(), call.tf.pack(), call.budget, name, wants, stats, compute_dtype,
    )  # fmt: skip
    logprobs = _token_outputs(call, sums, tok, rest[:4], stats)
    out = dpo_loss(
        sums[:P], sums[P:], ref_chosen_logps, ref_rejected_logps, chosen_counts=nc,
        rejected_counts=nr, spec=spec, backend=name,
    )  # fmt: skip
    return LinearDPOOutput(out._replace(loss=loss), logprobs)


class _SeparableLoss:
    """A `chunks.PairLoss` from a per-pair loss function (mean over the pairs, gradient by
    autograd on each chunk's sums) plus an NLL term on the chosen tokens (-w * sum(pc) /
    (chosen tokens of the batch): a constant gradient, known from the counts)."""

    coupled = False

    def __init__(self, per_pair, nc, nr, nll_weight: float, pair_index: bool = False):
        self.per_pair, self.nc, self.nr, self.w = per_pair, nc, nr, float(nll_weight)
        self.P, self.tokens = nc.shape[0], nc.sum().clamp(min=1)
        self.index = pair_index  # per_pair also gets the pairs' range (k0, k1)

    def _per_pair(self, pc, pr, k0: int, k1: int) -> torch.Tensor:
        args = (pc, pr, self.nc[k0:k1], self.nr[k0:k1]) + ((k0, k1) if self.index else ())
        out = self.per_pair(*args)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (k1 - k0,):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"per_pair must return one loss per pair of the chunk, a [{k1 - k0}] tensor (the "
                f"loss is their mean over all pairs), got {got}"
            )
        return out

    def grad(self, k0: int, k1: int, sums: torch.Tensor) -> torch.Tensor:
        c = k1 - k0
        pc, pr = (t.detach().requires_grad_() for t in (sums[:c], sums[c:]))
        with torch.enable_grad():
            total = self._per_pair(pc, pr, k0, k1).sum() / self.P
        gc, gr = torch.autograd.grad(total, (pc, pr), allow_unused=True)
        gc = torch.zeros_like(pc) if gc is None else gc
        gr = torch.zeros_like(pr) if gr is None else gr
        return torch.cat([gc - self.w / self.tokens, gr])

    def loss(self, pc: torch.Tensor, pr: torch.Tensor) -> torch.Tensor:
        out = self._per_pair(pc, pr, 0, self.P).mean()
        return out - self.w * pc.sum() / self.tokens if self.w else out


def linear_pair_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    per_pair: Callable[..., torch.Tensor],
    *,
    nll_weight: float = 0.0,
    pair_index: bool = False,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    stats: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    compute_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, SequenceLogprobs]:
    """Any pair-separable preference loss fused with the LM head, on `linear_dpo_loss`'s chunks
    (3 matmuls): mean over the P pairs of ``per_pair(pc, pr, nc, nr)`` ([c] losses of c pairs'
    chosen and rejected sums and lengths, differentiable in pc and pr: CPO, SimPO, ORPO's odds
    ratio, ...) plus ``nll_weight`` times the NLL of the chosen tokens (-sum(pc) / sum(nc), as
    CPO's cpo_alpha and ORPO's NLL term). The lengths nc, nr are the counted tokens unless
    chosen_counts / rejected_counts are given; pair_index=True calls ``per_pair(pc, pr, nc, nr, k0,
    k1)`` with the chunk's pairs k0..k1-1 (to slice per-pair data such as reference sums); other
    arguments as in `linear_dpo_loss`. Returns
    (loss, the policy's `SequenceLogprobs` of the same pass, without gradient)."""
    check_flag("stats", stats)
    check_flag("pair_index", pair_index)
    if not callable(per_pair):
        raise TypeError(f"per_pair must be a function of (pc, pr, nc, nr), got {per_pair!r}")
    if not math.isfinite(number("nll_weight", nll_weight)):
        raise ValueError(f"nll_weight must be a finite number, got {nll_weight!r}")
    refuse_without_values(
        "linear_pair_loss (and linear_cpo_loss, linear_simpo_loss, linear_orpo_loss, "
        "linear_kto_loss, which run on it)",
        hidden,
        "plans its chunks from the pairs' token counts, read on the host",
    )
    call = _prepare(hidden, weight, bias, labels, mask, ignore_index, chosen_counts,
                    rejected_counts, logit_scale, softcap, temperature, memory_budget,
                    compute_dtype, backend, {})  # fmt: skip

    def make_loss(acc: torch.dtype) -> _SeparableLoss:
        return _SeparableLoss(per_pair, call.nc.to(acc), call.nr.to(acc), nll_weight, pair_index)

    _check_values(labels, mask, ignore_index, weight.shape[0])
    loss, sums, tok, *token_stats = chunks.LinearLossFunction.apply(
        hidden, weight, bias, labels, call.counted, make_loss, call.tf, call.budget, call.backend,
        torch.is_grad_enabled(), stats, compute_dtype,
    )  # fmt: skip
    return loss, _token_outputs(call, sums, tok, token_stats, stats)


def logits_bytes(tokens: int, vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the float32 logits of `tokens` counted tokens: what a memory_budget must hold for
    a chunk of them to go on the 3-matmul route (CPU backend)."""
    return tokens * vocab * torch.empty(0, dtype=acc_dtype(dtype)).element_size()
