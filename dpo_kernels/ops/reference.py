"""Plain-PyTorch definitions of every fused op: the spec each backend is tested against.

They are also the fallback where no faster backend applies. They materialize float32 (float64 for
float64 inputs) [rows, vocab] temporaries, which is exactly what the kernels avoid.
"""

from __future__ import annotations

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


def token_stats(
    z: torch.Tensor,  # [B, T, V] in the accumulation dtype
    lse: torch.Tensor,  # [B, T]
    labels: torch.Tensor,
    counted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token entropy, mean logit and whether the label is the first argmax (0 if not counted).

    These are what trainers log (TRL's entropy, logits/chosen, mean_token_accuracy); no gradient.
    """
    p = torch.exp(z - lse.unsqueeze(-1))
    pz = torch.where(p == 0, 0.0, p * z)  # 0 * -inf counts as 0
    entropy = torch.where(counted, lse - pz.sum(-1), 0.0)
    mean_logit = torch.where(counted, z.mean(-1), 0.0)
    top1 = counted & (z.argmax(-1) == labels)
    return entropy, mean_logit, top1


def token_logprobs(
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T]
    mask: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    ignore_index: int,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Token log-probs [B, T], log-sum-exp [B, T], reference token log-probs ([B, T] or [0]), and
    with `stats` the policy's entropy, mean logit and label-is-argmax ([B, T] each, else [0]).

    Tokens that are not counted get log-prob 0 and log-sum-exp 0, as in the kernels.
    """
    counted = counted_tokens(labels, mask, ignore_index)
    safe = torch.where(counted, labels, 0).unsqueeze(-1)

    def one(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = z.to(acc_dtype(z.dtype))
        lse = torch.logsumexp(z, dim=-1)
        tok = torch.where(counted, z.gather(-1, safe).squeeze(-1) - lse, 0.0)
        return tok, torch.where(counted, lse, 0.0), z

    tok, lse, z = one(logits)
    ref_tok = logits.new_empty(0, dtype=tok.dtype) if ref_logits is None else one(ref_logits)[0]
    if not stats:
        empty = [logits.new_empty(0, dtype=d) for d in (tok.dtype, tok.dtype, torch.bool)]
        return tok, lse, ref_tok, *empty
    return tok, lse, ref_tok, *token_stats(z, lse, labels, counted)


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
