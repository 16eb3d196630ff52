"""Shared test setup: Triton kernels run on CPU tensors through the interpreter."""

import os

# Must be set before triton.jit decorates the kernels (at dpo_kernels import).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import importlib.util

import pytest
import torch

import dpo_kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None


def cpu_backends() -> list[str]:
    """Every backend that can run on CPU tensors here."""
    names = ["reference"]
    if dpo_kernels.cpu_extension_available():
        names.append("cpu")
    if HAS_TRITON:
        names.append("triton")
    return names


# Per-dtype absolute/relative slack on top of the naive computation's own error.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-5, 2e-6),
    torch.float16: (2e-5, 2e-6),
}
# Gradients are stored in the input dtype: one rounding of that dtype on top.
GRAD_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 2**-8,
    torch.float16: 2**-11,
}


def assert_no_worse_than_naive(ours, naive, ref64, tol, what=""):
    """|ours - ref64| <= |naive - ref64| + tol, in the max norm, on the finite entries.

    Infinite or NaN entries of ref64 must be matched exactly (same inf, or NaN).
    """
    ours, naive, ref64 = ours.double(), naive.double(), ref64.double()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isnan(ours[~finite]), torch.isnan(ref64[~finite])), what
    both_inf = ~finite & ~torch.isnan(ref64)
    assert torch.equal(ours[both_inf], ref64[both_inf]), what
    if not finite.any():
        return
    err = (ours[finite] - ref64[finite]).abs().max().item()
    naive_err = (naive[finite] - ref64[finite]).abs().nan_to_num(0.0).max().item()
    assert err <= naive_err + tol, f"{what}: error {err:.3g} > naive {naive_err:.3g} + {tol:.3g}"


def record_calls(monkeypatch, module, *names: str) -> list[str]:
    """Wraps each `module.<name>` so that every call appends its name to the returned list."""
    calls = []
    for name in names:
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    return calls


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
