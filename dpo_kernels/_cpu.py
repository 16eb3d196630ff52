"""Loader for the C++ CPU kernels (csrc/, built by setup.py).

setup.py builds one library per CPU capability; the one matching this machine is loaded. If none is
built (no compiler at install time), the package still imports, warns once, and CPU tensors use the
plain-PyTorch reference instead.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

_HERE = os.path.dirname(__file__)


def _candidates() -> list[str]:
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return ["avx512", "avx2", "default"]
    if cap.startswith("AVX2"):
        return ["avx2", "default"]
    return ["default"]


def _load() -> str | None:
    errors = []
    for variant in _candidates():
        for path in glob.glob(os.path.join(_HERE, f"_C_{variant}.*so")):
            try:
                torch.ops.load_library(path)
                return variant
            except OSError as exc:  # pragma: no cover - a broken build
                errors.append(f"{os.path.basename(path)}: {exc}")
    warnings.warn(
        "dpo_kernels: the C++ CPU kernels are not built"
        + (f" ({'; '.join(errors)})" if errors else "")
        + "; CPU tensors use the slow plain-PyTorch reference. Rebuild with "
        "`pip install --no-build-isolation -e .` (needs a C++ compiler).",
        stacklevel=3,
    )
    return None


VARIANT = _load()  # "avx512", "avx2", "default" or None
AVAILABLE = VARIANT is not None


def logprobs_forward(logits, labels, mask, ref_logits, ignore_index, stats=False):
    """Token log-probs, log-sum-exp, reference token log-probs and optional statistics; the
    contract of ops/reference.py::token_logprobs."""
    op = torch.ops.dpo_kernels_cpu.logprobs_forward
    return op(logits, labels, mask, ref_logits, ignore_index, stats)


def logprobs_backward(grad_tok, logits, labels, mask, lse, ignore_index):
    """Gradient of the token log-probs with respect to the logits."""
    op = torch.ops.dpo_kernels_cpu.logprobs_backward
    return op(grad_tok, logits, labels, mask, lse, ignore_index)


# Counted tokens x vocabulary of one projection tile of the fused linear op (float32 or float64):
# 512 x 2048 floats is 4 MiB, as fast per flop as larger tiles here (BENCHMARKS.md).
LINEAR_TOKEN_TILE = 512
LINEAR_VOCAB_BLOCK = 2048


def linear_logprobs_forward(hidden, weight, bias, targets, transform, stats=False):
    """Label log-probs, log-sum-exp and optional statistics of the counted rows; the contract of
    ops/reference.py::linear_token_logprobs."""
    op = torch.ops.dpo_kernels_cpu.linear_logprobs_forward
    tiles = (LINEAR_TOKEN_TILE, LINEAR_VOCAB_BLOCK)
    return op(hidden, weight, bias, targets, *transform, stats, *tiles)


def linear_logprobs_backward(grad, hidden, weight, bias, targets, lse, transform, needs):
    """Gradients for hidden, weight and bias of the counted rows' label log-probs."""
    op = torch.ops.dpo_kernels_cpu.linear_logprobs_backward
    tiles = (LINEAR_TOKEN_TILE, LINEAR_VOCAB_BLOCK)
    return op(grad, hidden, weight, bias, targets, lse, *transform, *needs, *tiles)
