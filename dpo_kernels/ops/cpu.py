"""The "cpu" backend: the C++ CPU kernels (csrc/), thin wrappers around torch.ops.dpo_kernels_cpu,
and the DPO and sibling losses in closed form (vectorized torch, torch_dpo_loss.py and
torch_sibling_losses.py).

The library is compiled for this torch and CPU, cached and loaded by _build.py, lazily: on the
first access to VARIANT or AVAILABLE (backend.py asks when an op gets CPU tensors), never at
import. If it cannot be built (no compiler), the package warns once and CPU tensors use the
plain-PyTorch reference instead.
"""

from __future__ import annotations

import torch

from .. import _build
from ..common import LogitTransform
from .torch_dpo_loss import dpo_loss_and_grads as dpo_loss_and_grads  # the loss, closed forms
from .torch_sibling_losses import sibling_loss_and_grads as sibling_loss_and_grads


def __getattr__(name: str):
    """VARIANT ("avx512", "avx2", "default" or None) and AVAILABLE, loading on first access."""
    if name == "VARIANT":
        return _build.load()
    if name == "AVAILABLE":
        return _build.load() is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def logprobs_forward(logits, labels, mask, ref_logits, ignore_index, stats=False):
    """Token log-probs, log-sum-exp, reference token log-probs and optional statistics; the
    contract of ops/reference.py::logprobs_forward."""
    op = torch.ops.dpo_kernels_cpu.logprobs_forward
    return op(logits, labels, mask, ref_logits, ignore_index, stats)


def logprobs_backward(grad_tok, logits, labels, mask, lse, ignore_index):
    """Gradient of the token log-probs with respect to the logits."""
    op = torch.ops.dpo_kernels_cpu.logprobs_backward
    return op(grad_tok, logits, labels, mask, lse, ignore_index)


def grad_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
    """The logits' gradient comes back contiguous."""
    return None


# Counted tokens x vocabulary of one projection tile of the fused linear op (float32 or float64):
# 512 x 2048 floats is 4 MiB, as fast per flop as larger tiles here (BENCHMARKS.md).
LINEAR_TOKEN_TILE = 512
LINEAR_VOCAB_BLOCK = 2048


def linear_logprobs_forward(
    hidden, weight, bias, targets, transform: LogitTransform, stats: bool = False
):
    """Label log-probs, log-sum-exp and optional statistics of the counted rows; the contract of
    ops/reference.py::linear_logprobs_forward."""
    op = torch.ops.dpo_kernels_cpu.linear_logprobs_forward
    tiles = (LINEAR_TOKEN_TILE, LINEAR_VOCAB_BLOCK)
    return op(hidden, weight, bias, targets, *transform, stats, *tiles)


def linear_logprobs_backward(grad, hidden, weight, bias, targets, lse, transform, needs):
    """Gradients for hidden, weight and bias of the counted rows' label log-probs, in the
    accumulation dtype."""
    op = torch.ops.dpo_kernels_cpu.linear_logprobs_backward
    tiles = (LINEAR_TOKEN_TILE, LINEAR_VOCAB_BLOCK)
    return op(grad, hidden, weight, bias, targets, lse, *transform, *needs, *tiles)


# Row kernels of the fused linear losses (linear_dpo_rows.Rows; contracts in ops/reference.py),
# csrc/linear_dpo_loss.cpp.
FOLD_NO_ARG = -1  # Fold.arg before any block (vec_rows.h's RowFold)
ROW_ALIGN = 1
TILE_COPIES = 1  # the row kernels work in place


def project_rows(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    """out <- h @ w.T, split by vocabulary over the threads."""
    torch.ops.dpo_kernels_cpu.vocab_blocked_mm(out, h, w)


def fold_rows(x, y, f, vs: int, tf: LogitTransform) -> None:
    op = torch.ops.dpo_kernels_cpu.linear_dpo_rows_fold
    op(x, y, f.m, f.s, f.target, f.st, f.arg, vs, *tf)


def fold_softmax_rows(x, y, f, tf: LogitTransform) -> None:
    """One read of x, one exp per logit."""
    if x.shape[0]:
        op = torch.ops.dpo_kernels_cpu.linear_dpo_rows_fold_softmax
        op(x, y, f.m, f.s, f.target, f.st, f.arg, *tf)


def grad_rows(x, local, g, lse, tf: LogitTransform, out=None) -> None:
    assert out is None
    torch.ops.dpo_kernels_cpu.linear_dpo_rows_grad(x, local, g, lse, *tf)
