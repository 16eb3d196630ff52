"""Loader for the C++ CPU kernels (csrc/, built by setup.py as dpo_kernels._C).

If the extension is missing (no compiler at install time), the package still imports, warns once,
and CPU tensors use the plain-PyTorch reference instead.
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.dpo_kernels_cpu)

    AVAILABLE = True
except ImportError as exc:  # pragma: no cover - depends on the build
    AVAILABLE = False
    warnings.warn(
        f"dpo_kernels: the C++ CPU kernels are not built ({exc}); CPU tensors use the slow "
        "plain-PyTorch reference. Rebuild with `pip install --no-build-isolation -e .`.",
        stacklevel=2,
    )


def logprobs_forward(logits, labels, mask, ref_logits, ignore_index):
    """Token log-probs, log-sum-exp and reference token log-probs; see ops/reference.py."""
    op = torch.ops.dpo_kernels_cpu.logprobs_forward
    return op(logits, labels, mask, ref_logits, ignore_index)


def logprobs_backward(grad_tok, logits, labels, mask, lse, ignore_index):
    """Gradient of the token log-probs with respect to the logits."""
    return torch.ops.dpo_kernels_cpu.logprobs_backward(
        grad_tok, logits, labels, mask, lse, ignore_index
    )
