"""Scaling a gradient in place by the incoming gradient of a loss, a device scalar, without reading
that scalar on the host.

The fused linear losses make their gradients in the forward and multiply them by the loss's
incoming gradient in the backward (`linear_dpo_chunks.scaled_grads`). That gradient is usually 1
(``loss.backward()``), and then the multiplication, a pass over dW ([V, H]: 1 GiB in bf16 at
V = 128256, H = 4096), is skipped. Asking the host whether it is 1 waits for the GPU to finish the
whole step first; here each program reads it on the device and returns at once when it is. A
fixed number of programs strides over x (a grid of one program per block would launch 131k of them
for that dW, each only to return).

Reference: ``if s != 1: x.mul_(s)``, with s in the accumulation dtype (float32 for bf16/fp16 x:
a GradScaler's 65536 is inf in float16), the product rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import acc_dtype
from .triton_common import device_guard, tl_acc_dtype

_BLOCK = 4096
_PROGRAMS = 1024  # at most; enough to keep an H100's or H200's 132 SMs streaming


@triton.jit
def _scale_unless_one_kernel(x_ptr, s_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.load(s_ptr).to(ACC)
    if s != 1:  # NaN too
        stride = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, stride):
            offs = start + tl.arange(0, BLOCK)
            keep = offs < n
            x = tl.load(x_ptr + offs, mask=keep)
            # the exact product of two bf16/fp16 values (float32 holds it), rounded once on store
            tl.store(x_ptr + offs, (x.to(ACC) * s).to(x.dtype), mask=keep)


def scale_unless_one_(x: torch.Tensor, s: torch.Tensor) -> None:
    """x *= s in place unless s == 1. x: contiguous; s: one element, in x's accumulation dtype
    (float32; float64 for float64 x), on x's device."""
    assert x.is_contiguous() and s.numel() == 1 and s.device == x.device
    assert s.dtype == acc_dtype(x.dtype)
    if x.numel():
        with device_guard(x):
            _scale_unless_one_kernel[(min(triton.cdiv(x.numel(), _BLOCK), _PROGRAMS),)](
                x, s, x.numel(), ACC=tl_acc_dtype(x.dtype), BLOCK=_BLOCK
            )
