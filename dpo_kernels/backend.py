"""The one place that picks a backend, and the host-synchronization policy.

Backends: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpu" (the C++
kernels in csrc/, compiled on first use by _build.py), "reference" (plain PyTorch,
ops/reference.py). "auto" picks triton for CUDA and cpu (else reference) for CPU tensors. The
`backend=` argument, or else the DPO_KERNELS_BACKEND environment variable, forces one.

Every backend module offers the same functions (FUNCTIONS), so dispatch is
`kernels(name).<function>`. Triton is imported by the first call that needs it only.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from . import _build
from .ops import cpu

BACKENDS = ("auto", "triton", "cpu", "reference")
# What every backend module offers; the contracts are written in ops/reference.py.
FUNCTIONS = (
    "logprobs_forward",  # token log-probs, lse, reference token log-probs, statistics
    "logprobs_backward",  # d(token log-probs)/d(logits)
    "grad_strides",  # the strides logprobs_backward gives the gradient (None: contiguous)
    "linear_logprobs_forward",  # the same for rows of hidden states through the LM head
    "linear_logprobs_backward",  # their gradients for hidden, weight and bias
    "dpo_loss_and_grads",  # the DPO loss, per-pair losses and d/d(policy log-probs)
    "sibling_loss_and_grads",  # CPO / ORPO / KTO: loss, per-example losses, d/d(both sums)
    # the row kernels of the fused linear losses (linear_dpo_rows.Rows), on float32 tiles:
    "project_rows",  # the tile of logits from hidden rows and a weight block
    "fold_rows",  # fold a tile into running log-sum-exp, label logit and statistics
    "grad_rows",  # a tile of logits -> its gradient, given the rows' factors and lse
    "fold_softmax_rows",  # both, on whole rows
)
# And the constants the row kernels need: the first argmax before any block (FOLD_NO_ARG),
# the tiles' row alignment in elements (ROW_ALIGN), the tile's copies in memory (TILE_COPIES).
CONSTANTS = ("FOLD_NO_ARG", "ROW_ALIGN", "TILE_COPIES")
_MODULES = {"reference": ".ops.reference", "cpu": ".ops.cpu", "triton": ".ops.triton"}


def kernels(name: str) -> ModuleType:
    """The kernels of a concrete backend ("reference", "cpu" or "triton"; see resolve_backend)."""
    return importlib.import_module(_MODULES[name], __package__)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cpu_extension_available() -> bool:
    """True when the C++ CPU kernels (csrc/) are loaded; builds them on first call if needed
    (only CPU tensors ask, so CUDA users never wait for a compiler)."""
    return cpu.AVAILABLE


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend for tensors on `device`: `backend`, else $DPO_KERNELS_BACKEND, else
    "auto" ("triton" on CUDA; on CPU "cpu", or "reference" where the C++ kernels cannot be
    built); "triton" on CPU tensors needs TRITON_INTERPRET=1. Raises ValueError naming the fix."""
    env = os.environ.get("DPO_KERNELS_BACKEND")
    name = backend or env or "auto"
    if name not in BACKENDS:
        where = "" if backend else " (from the environment variable DPO_KERNELS_BACKEND)"
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}{where}")
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpu" if device.type == "cpu" and cpu_extension_available() else "reference"
    if name == "triton" and device.type != "cuda" and not _triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "before importing dpo_kernels to run the Triton kernels on CPU (slow, for tests)"
        )
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if not cpu_extension_available():
            raise RuntimeError(
                "backend='cpu' needs the C++ CPU kernels, which could not be built here "
                f"({_build.load_error()}); fix that, then run `dpo-kernels build`, or use "
                "backend='reference'"
            )
    return name


# --------------------------------------------------------------------------------------------
# Host synchronization. On CUDA no op reads a device value back to the host to validate it: label,
# mask and cu_seqlens checks are device-side asserts (`torch._assert_async`: a bad value stops the
# process at a later CUDA call, with the message, instead of raising a ValueError that names the
# position, as on CPU). What is left: the linear path gathers the counted tokens' rows, which needs
# their number on the host: one sync in the forward and one in the backward (the fused linear
# losses: one per step, for their chunk plan; not sync-free). Sync-free mode
# projects every token instead (counted or not: more matmul work when many tokens do not count)
# and syncs never, so a step can be captured in a CUDA graph; it is on while a graph is captured.

_SYNC_FREE: bool | None = None


def set_sync_free(enabled: bool | None) -> None:
    """Sync-free mode on (True), off (False), or automatic (None: on while a CUDA graph is being
    captured, or when the DPO_KERNELS_SYNC_FREE environment variable is 1). In sync-free mode the
    fused LM head projects every token, counted or not (more matmul work where many do not
    count), instead of gathering the counted ones, which needs their number on the host: no op
    then synchronizes with the host, so a step can be captured in a CUDA graph."""
    global _SYNC_FREE
    _SYNC_FREE = enabled


def sync_free(device: torch.device) -> bool:
    """Whether ops on `device` must not synchronize with the host (see `set_sync_free`)."""
    if _SYNC_FREE is not None:
        return _SYNC_FREE
    if os.environ.get("DPO_KERNELS_SYNC_FREE", "0") not in ("", "0"):
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_side_checks(device: torch.device) -> bool:
    """Data checks as device-side asserts (CUDA), or as host checks that raise ValueError."""
    return device.type == "cuda"
