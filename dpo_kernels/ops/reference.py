"""The "reference" backend: plain-PyTorch definitions of every fused op, the spec each backend is
tested against.

It offers the backends' functions (see dpo_kernels/backend.py) and is the fallback where no faster
backend applies. It materializes float32 (float64 for float64 inputs) [rows, vocab] temporaries,
which is exactly what the kernels avoid. `sequence_logprobs` and `dpo_losses` are the naive
computations with autograd that the tests compare everything with.

The DPO loss's `dpo_loss_and_grads` is the closed forms of torch_dpo_loss.py (plain PyTorch too):
backends run inside a custom op, below the autograd dispatch key, where autograd cannot
differentiate `dpo_losses` (and function transforms break under torch.compile). `dpo_losses`
still gives the double backward (dpo_loss_op.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..common import (
    ALPHA_CLAMP_MAX,
    DPOLossSpec,
    LogitTransform,
    acc_dtype,
    counted_tokens,
    stats_dtypes,
)
from .reference_siblings import sibling_loss_and_grads as sibling_loss_and_grads  # autograd
from .torch_dpo_loss import dpo_loss_and_grads as dpo_loss_and_grads  # re-exported: the backend's


def token_stats(
    z: torch.Tensor,  # [B, T, V] in the accumulation dtype
    lse: torch.Tensor,  # [B, T]
    labels: torch.Tensor,
    counted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token entropy, mean logit, whether the label is the first argmax, and the log of the
    summed squared probabilities log(sum_v p_v^2) (0 where not counted).

    The first three are what trainers log (TRL's entropy, logits/chosen, mean_token_accuracy); the
    last one gives WPO's weights (TRL's use_weighting). No gradient.
    """
    p = torch.exp(z - lse.unsqueeze(-1))
    pz = torch.where(p == 0, 0.0, p * z)  # 0 * -inf counts as 0
    # Divided by sum(p), as the kernels do: at huge logits lse is rounded and p does not sum to 1.
    entropy = torch.where(counted, lse - pz.sum(-1) / p.sum(-1), 0.0)
    mean_logit = torch.where(counted, z.mean(-1), 0.0)
    top1 = counted & (z.argmax(-1) == labels) & ~lse.isnan()  # a row with a NaN has no argmax
    log_sum_sq = torch.where(counted, torch.logsumexp(2 * z, dim=-1) - 2 * lse, 0.0)
    return entropy, mean_logit, top1, log_sum_sq


def logprobs_forward(
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T]
    mask: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    ignore_index: int,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Token log-probs [B, T], log-sum-exp [B, T], reference token log-probs ([B, T] or [0]), and
    with `stats` the policy's entropy, mean logit, label-is-argmax and log(sum_v p_v^2) ([B, T]
    each, else [0]).

    Tokens that are not counted get log-prob 0 and log-sum-exp 0, as in the kernels.
    """
    counted = counted_tokens(labels, mask, ignore_index)
    safe = torch.where(counted, labels.long(), 0).unsqueeze(-1)  # any integer dtype

    def one(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = z.to(acc_dtype(z.dtype))
        lse = torch.logsumexp(z, dim=-1)
        tok = torch.where(counted, z.gather(-1, safe).squeeze(-1) - lse, 0.0)
        return tok, torch.where(counted, lse, 0.0), z

    tok, lse, z = one(logits)
    ref_tok = logits.new_empty(0, dtype=tok.dtype) if ref_logits is None else one(ref_logits)[0]
    if not stats:
        empty = [logits.new_empty(0, dtype=d) for d in stats_dtypes(tok.dtype)]
        return tok, lse, ref_tok, *empty
    return tok, lse, ref_tok, *token_stats(z, lse, labels, counted)


def logprobs_backward(
    grad_tok: torch.Tensor,  # [B, T]
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,  # [B, T]
    ignore_index: int,
) -> torch.Tensor:
    """grad_tok times d(token log-probs)/d(logits): g * (onehot - softmax), 0 where not counted."""
    counted = counted_tokens(labels, mask, ignore_index)
    z = logits.to(acc_dtype(logits.dtype))
    probs = torch.exp(z - lse.unsqueeze(-1).to(z.dtype))
    safe = torch.where(counted, labels.long(), 0).unsqueeze(-1)
    onehot = torch.zeros_like(z).scatter_(-1, safe, 1.0)
    g = torch.where(counted, grad_tok.to(z.dtype), 0.0).unsqueeze(-1)
    # Rows that are not counted are exactly zero, even where their logits are NaN or inf.
    dz = torch.where(counted.unsqueeze(-1), g * (onehot - probs), 0.0)
    return dz.to(logits.dtype)


def grad_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
    """The logits' gradient comes back contiguous."""
    return None


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive computation with autograd: per-sequence log-prob sums [B] and counts [B].

    Rows that do not count are replaced by zeros before the log-softmax, so they neither add to
    the sums nor receive gradient, whatever they hold (inf, NaN): the contract of every backend.
    """
    counted = counted_tokens(labels, mask, ignore_index)
    z = logits.to(acc_dtype(logits.dtype))
    logp = torch.where(counted.unsqueeze(-1), z, 0.0).log_softmax(-1)
    tok = logp.gather(-1, torch.where(counted, labels.long(), 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(counted, tok, 0.0).sum(-1), counted.sum(-1)


# --------------------------------------------------------------------------------------------
# The DPO loss family, as TRL's DPOTrainer defines it (same formulas, same defaults).


def _f_score(x: torch.Tensor, spec: DPOLossSpec) -> torch.Tensor:
    kind, alpha = spec.f_divergence_type, spec.f_alpha_divergence_coef
    if kind == "forward_kl":
        return 1 - torch.exp(-x)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(x)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        return torch.expm1(torch.clamp((alpha - 1) * x, max=ALPHA_CLAMP_MAX)) / (alpha - 1)
    return x


def dpo_losses(
    pc: torch.Tensor,  # [P] policy chosen log-probs
    pr: torch.Tensor,  # [P] policy rejected
    rc: torch.Tensor,  # [P] reference chosen
    rr: torch.Tensor,  # [P] reference rejected
    nc: torch.Tensor,  # [P] chosen token counts
    nr: torch.Tensor,  # [P] rejected token counts
    spec: DPOLossSpec,
) -> torch.Tensor:
    """Per-pair loss [P], summed over the loss types with their weights; the loss is its mean.

    Written as autograd formulas: the spec the fused kernels are tested against.
    """
    beta, eps = spec.beta, spec.label_smoothing
    chosen_lr, rejected_lr = pc - rc, pr - rr
    s_c, s_r = _f_score(chosen_lr, spec), _f_score(rejected_lr, spec)
    delta = s_c - s_r
    chosen_tokens = nc.sum().clamp(min=1)  # sft: mean over every chosen token of the batch
    nc, nr = nc.clamp(min=1), nr.clamp(min=1)
    total = torch.zeros_like(pc)
    for kind, weight in zip(spec.loss_types, spec.loss_weights, strict=True):
        if kind == "sigmoid":
            per = -F.logsigmoid(beta * delta)
        elif kind == "hinge":
            per = torch.relu(1 - beta * delta)
        elif kind == "ipo":
            per = (s_c / nc - s_r / nr - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            qw, ql = torch.sigmoid(beta * delta), torch.sigmoid(-beta * delta)
            per = qw * (F.logsigmoid(beta * delta) - math.log1p(-eps)) + ql * (
                F.logsigmoid(-beta * delta) - math.log(eps)
            )
        elif kind == "nca_pair":
            cw, rw = beta * chosen_lr, beta * rejected_lr
            per = -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-rw)
        elif kind == "robust":
            per = -(1 - eps) * F.logsigmoid(beta * delta)
            if eps:  # eps = 0 adds nothing, not 0 * inf = NaN at an infinite margin
                per = per + eps * F.logsigmoid(-beta * delta)
            per = per / (1 - 2 * eps)
        elif kind == "bco_pair":
            per = -F.logsigmoid(beta * chosen_lr) - F.logsigmoid(-beta * rejected_lr)
        elif kind == "sppo_hard":
            per = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
        elif kind in ("aot", "aot_unpaired"):
            if kind == "aot":
                a, b = pc - pr, rc - rr
            else:
                a, b = chosen_lr, rejected_lr
            d = torch.sort(a, stable=True)[0] - torch.sort(b, stable=True)[0]
            per = -F.logsigmoid(beta * d) * (1 - eps)
            if eps:
                per = per - F.logsigmoid(-beta * d) * eps
        elif kind == "apo_zero":
            per = 1 - torch.sigmoid(beta * chosen_lr) + torch.sigmoid(beta * rejected_lr)
        elif kind == "apo_down":
            per = (
                torch.sigmoid(beta * chosen_lr)
                + 1
                - torch.sigmoid(beta * (chosen_lr - rejected_lr))
            )
        elif kind == "discopop":
            # TRL's -logsigmoid(u) * (1 - sigmoid(u / tau)) + exp(-u) * sigmoid(u / tau), with no
            # inf * 0 at large |u|: 1 - sigmoid(x) = sigmoid(-x) and
            # exp(-u) * sigmoid(u / tau) = exp(-u - softplus(-u / tau)).
            u, tau = beta * delta, spec.discopop_tau
            per = -F.logsigmoid(u) * torch.sigmoid(-u / tau) + torch.exp(-u + F.logsigmoid(u / tau))
        elif kind == "sft":
            per = (-pc.sum() / chosen_tokens).expand_as(pc)
        elif kind == "sigmoid_norm":
            per = -F.logsigmoid(beta * (s_c / nc - s_r / nr))
        else:
            raise ValueError(f"unknown loss type {kind!r}")
        total = total + weight * per
    return total


def _projection(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """hidden @ weight.T + bias in the accumulation dtype: [M, V]."""
    acc = acc_dtype(hidden.dtype)
    x = hidden.to(acc) @ weight.to(acc).T
    return x if bias is None else x + bias.to(acc)


def linear_logits(
    hidden: torch.Tensor,  # [M, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    transform: LogitTransform,
) -> torch.Tensor:
    """[M, V] logits of the fused linear op, materialized in the accumulation dtype."""
    return _transform(_projection(hidden, weight, bias), transform)


def _transform(x: torch.Tensor, tf: LogitTransform) -> torch.Tensor:
    """z = softcap(x) * factor (see LogitTransform)."""
    if tf.softcap is not None:
        x = tf.softcap * torch.tanh(x / tf.softcap)
    return x * tf.factor


def linear_logprobs_forward(
    hidden: torch.Tensor,  # [M, H] rows of the counted tokens
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [M] labels in [0, V); -1: not in this weight (vocab-parallel)
    transform: LogitTransform,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Label log-probs [M], log-sum-exp [M] and, with `stats`, entropy, mean logit,
    label-is-argmax and log(sum_v p_v^2) [M] of `linear_logits`, which it materializes. A target
    of -1 gives -lse."""
    z = linear_logits(hidden, weight, bias, transform)
    lse = torch.logsumexp(z, dim=-1)
    here = targets >= 0
    target = torch.where(here, z.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    if not stats:
        empty = [hidden.new_empty(0, dtype=d) for d in stats_dtypes(lse.dtype)]
        return target - lse, lse, *empty
    return target - lse, lse, *token_stats(z, lse, targets, torch.ones_like(here))


def linear_logprobs_backward(
    grad: torch.Tensor,  # [M] upstream gradient of the label log-probs
    hidden: torch.Tensor,  # [M, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [M]
    lse: torch.Tensor,  # [M] from the forward
    transform: LogitTransform,
    needs: tuple[bool, bool, bool],  # gradients wanted for (hidden, weight, bias)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for hidden [M, H], weight [V, H] and bias [V], all in the accumulation dtype
    ([0] where not asked): the callers round each once to its input's own dtype (hidden's after
    the ranks of a vocabulary split add up their partial ones: `vocab_parallel`; the fused head's
    after a cast of the inputs to the autocast dtype: `compute_dtype`).

    With a = transform.factor and z = softcap(x) * a: dz = g * (onehot - softmax(z)),
    dx = dz * a * (1 - tanh(x / softcap)^2) (dz * a without softcap), dh = dx @ W, dW = dx.T @ h
    and db = sum of dx over the tokens.
    """
    acc = acc_dtype(hidden.dtype)
    h, w = hidden.to(acc), weight.to(acc)
    a, c = transform.factor, transform.softcap
    x = _projection(hidden, weight, bias)
    dzdx = torch.full_like(x, a)
    if c is not None:
        t = torch.tanh(x / c)
        x = c * t
        dzdx = dzdx * (1 - t * t)
    probs = torch.exp(x * a - lse.to(acc).unsqueeze(-1))
    onehot = (torch.arange(x.shape[-1], device=x.device) == targets.unsqueeze(-1)).to(acc)
    dx = grad.to(acc).unsqueeze(-1) * (onehot - probs) * dzdx
    empty = hidden.new_empty(0)
    return (
        dx @ w if needs[0] else empty,
        dx.T @ h if needs[1] else empty,
        dx.sum(0) if needs[2] and bias is not None else empty,
    )


# --------------------------------------------------------------------------------------------
# Row kernels of the fused linear losses (linear_dpo_rows.Rows), on a float32 (float64) tile
# x [n, nv] of projected logits of vocabulary [vs, vs + nv); `f` is a linear_dpo_rows.Fold.

FOLD_NO_ARG = 2**31 - 1  # Fold.arg before any block: above every index (ties keep the first)
ROW_ALIGN = 1  # tiles' rows are whole (no padding)
TILE_COPIES = 3  # the tile, its transformed logits and its softmax (temporaries)


def project_rows(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    """out [n, nv] <- h [n, H] @ w [nv, H].T (all in the accumulation dtype)."""
    torch.mm(h, w.T, out=out)


def fold_rows(x: torch.Tensor, y: torch.Tensor, f, vs: int, tf: LogitTransform) -> None:
    """Folds the logits x of vocabulary [vs, vs + nv) into f's running max, sum of exp, label
    logit and, with f.stats, sum of p*z, sum of z, sum of p^2 and first argmax; y: the rows'
    labels (global)."""
    nv = x.shape[1]
    z = _transform(x, tf)
    local = y - vs
    here = (local >= 0) & (local < nv)
    f.target += torch.where(here, z.gather(1, local.clamp(0, nv - 1)[:, None])[:, 0], 0.0)
    m_blk = z.max(1).values
    m_new = torch.maximum(f.m, m_blk)
    shift = torch.where(m_new.isinf(), 0.0, m_new)
    scale = torch.exp(f.m - shift)
    e = torch.exp(z - shift[:, None])
    f.s.mul_(scale).add_(e.sum(1))
    if f.stats:
        pz, zsum, sq = f.st.unbind(0)
        pz.mul_(scale).add_(torch.where(e == 0, 0.0, e * z).sum(1))
        sq.mul_(scale * scale).add_((e * e).sum(1))
        zsum.add_(z.sum(1))
        arg_blk = vs + (z == m_blk[:, None]).to(torch.int8).argmax(1)
        tie = torch.where(m_blk == f.m, torch.minimum(f.arg, arg_blk), f.arg)
        f.arg.copy_(torch.where(m_blk > f.m, arg_blk, tie))
    f.m.copy_(m_new)


def grad_rows(x, local, g, lse, tf: LogitTransform, out=None) -> None:
    """x <- g * (onehot(local) - softmax(z(x))) * dz/dx per row, in place (`out`: unsupported
    here, the Triton backend's)."""
    assert out is None
    slope = tf.factor
    if tf.softcap is not None:
        slope = tf.factor * (1 - torch.tanh(x / tf.softcap) ** 2)
    z = _transform(x, tf)
    cols = torch.arange(x.shape[1], device=x.device)
    onehot = (cols == local[:, None]).to(x.dtype)
    x.copy_(g[:, None] * (onehot - torch.exp(z - lse[:, None])) * slope)


def fold_softmax_rows(x: torch.Tensor, y: torch.Tensor, f, tf: LogitTransform) -> None:
    """Folds whole rows x into a fresh f, then x <- (onehot(y) - softmax(z(x))) * dz/dx."""
    fold_rows(x, y, f, 0, tf)
    grad_rows(x, y, torch.ones_like(f.m), f.lse(), tf)
