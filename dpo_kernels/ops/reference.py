"""Plain-PyTorch definitions of every fused op: the spec each backend is tested against.

They are also the fallback where no faster backend applies. They materialize float32 (float64 for
float64 inputs) [rows, vocab] temporaries, which is exactly what the kernels avoid.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def counted_tokens(
    labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """[B, T] bool: tokens that enter the sums (label != ignore_index and mask != 0)."""
    counted = labels != ignore_index
    return counted if mask is None else counted & (mask != 0)


def token_logprobs(
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T]
    mask: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token log-probs [B, T], log-sum-exp [B, T], reference token log-probs ([B, T] or [0]).

    Tokens that are not counted get log-prob 0 and log-sum-exp 0, as in the kernels.
    """
    counted = counted_tokens(labels, mask, ignore_index)
    safe = torch.where(counted, labels, 0).unsqueeze(-1)

    def one(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.to(acc_dtype(z.dtype))
        lse = torch.logsumexp(z, dim=-1)
        tok = torch.where(counted, z.gather(-1, safe).squeeze(-1) - lse, 0.0)
        return tok, torch.where(counted, lse, 0.0)

    tok, lse = one(logits)
    if ref_logits is None:
        ref_tok = logits.new_empty(0, dtype=tok.dtype)
    else:
        ref_tok = one(ref_logits)[0]
    return tok, lse, ref_tok


def token_logprobs_backward(
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
    onehot = torch.zeros_like(z).scatter_(-1, torch.where(counted, labels, 0).unsqueeze(-1), 1.0)
    g = torch.where(counted, grad_tok.to(z.dtype), 0.0).unsqueeze(-1)
    # Rows that are not counted are exactly zero, even where their logits are NaN or inf.
    dz = torch.where(counted.unsqueeze(-1), g * (onehot - probs), 0.0)
    return dz.to(logits.dtype)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive computation with autograd: per-sequence log-prob sums [B] and counts [B]."""
    counted = counted_tokens(labels, mask, ignore_index)
    logp = logits.to(acc_dtype(logits.dtype)).log_softmax(-1)
    tok = logp.gather(-1, torch.where(counted, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(counted, tok, 0.0).sum(-1), counted.sum(-1)


class LogitTransform(NamedTuple):
    """The fused linear op's logits: z = logit_scale * softcap(x) / temperature, x = h @ W.T + b,
    softcap(x) = softcap * tanh(x / softcap) (the identity when softcap is None)."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @property
    def factor(self) -> float:
        """logit_scale / temperature: z = softcap(x) * factor, in this order in every backend."""
        return self.logit_scale / self.temperature


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
    x = _projection(hidden, weight, bias)
    if transform.softcap is not None:
        x = transform.softcap * torch.tanh(x / transform.softcap)
    return x * transform.factor


def linear_token_logprobs(
    hidden: torch.Tensor,  # [M, H] rows of the counted tokens
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [M] labels in [0, V)
    transform: LogitTransform,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label log-probs [M] and log-sum-exp [M] of `linear_logits`, which it materializes."""
    z = linear_logits(hidden, weight, bias, transform)
    lse = torch.logsumexp(z, dim=-1)
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse, lse


def linear_token_logprobs_backward(
    grad: torch.Tensor,  # [M] upstream gradient of the label log-probs
    hidden: torch.Tensor,  # [M, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [M]
    lse: torch.Tensor,  # [M] from the forward
    transform: LogitTransform,
    needs: tuple[bool, bool, bool],  # gradients wanted for (hidden, weight, bias)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for hidden [M, H], weight [V, H], bias [V] in their dtypes ([0] where not asked).

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
    onehot = torch.zeros_like(probs).scatter_(-1, targets.unsqueeze(-1), 1.0)
    dx = grad.to(acc).unsqueeze(-1) * (onehot - probs) * dzdx
    empty = hidden.new_empty(0)
    return (
        (dx @ w).to(hidden.dtype) if needs[0] else empty,
        (dx.T @ h).to(weight.dtype) if needs[1] else empty,
        dx.sum(0).to(bias.dtype) if needs[2] and bias is not None else empty,
    )
