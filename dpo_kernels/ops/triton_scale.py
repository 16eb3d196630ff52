"""Scaling a gradient by the incoming gradient of a loss, a device scalar, without reading that
scalar on the host.

The fused linear losses make their gradients in the forward, in the accumulation dtype, and
multiply them by the loss's incoming gradient in the backward (`linear_dpo_chunks.scaled_grads`).
For float32 inputs that is done in place, and that gradient is usually 1 (``loss.backward()``):
then the pass over dW ([V, H]: 2 GiB in float32 at V = 128256, H = 4096) is skipped. For bf16 and
fp16 inputs the float32 gradient is rounded to the inputs' dtype in the same pass as the scale:
one read of it, the product rounded once. Asking the host whether the scale is 1 waits for the GPU
to finish the whole step first; here each program reads it on the device. A fixed number of
programs strides over x (a grid of one program per block would launch 131k of them for that dW).

Reference: ``out = (x.to(acc) * s).to(out.dtype)``, s in the accumulation dtype (float32 for
bf16/fp16/float32 x; a GradScaler's 65536 is inf in float16); in place (out is x): nothing done
when s == 1.
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
def _scale_blocks(x_ptr, out_ptr, s, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    stride = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, stride):
        offs = start + tl.arange(0, BLOCK)
        keep = offs < n
        x = tl.load(x_ptr + offs, mask=keep)
        tl.store(out_ptr + offs, (x.to(ACC) * s).to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _scale_kernel(x_ptr, out_ptr, s_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr,
                  IN_PLACE: tl.constexpr):  # fmt: skip
    s = tl.load(s_ptr).to(ACC)
    if IN_PLACE:
        if s != 1:  # NaN too
            _scale_blocks(x_ptr, x_ptr, s, n, ACC, BLOCK)
    else:
        _scale_blocks(x_ptr, out_ptr, s, n, ACC, BLOCK)


def scale(x: torch.Tensor, s: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x * s rounded once to `dtype`: in place into x (and returned) when dtype is None or x's,
    nothing done when s == 1; else a new tensor, x untouched. x: contiguous; s: one element, in
    x's accumulation dtype, on x's device."""
    assert x.is_contiguous() and s.numel() == 1 and s.device == x.device
    assert s.dtype == acc_dtype(x.dtype)
    in_place = dtype is None or dtype == x.dtype
    out = x if in_place else torch.empty_like(x, dtype=dtype)
    if x.numel():
        with device_guard(x):
            _scale_kernel[(min(triton.cdiv(x.numel(), _BLOCK), _PROGRAMS),)](
                x, out, s, x.numel(), ACC=tl_acc_dtype(x.dtype), BLOCK=_BLOCK, IN_PLACE=in_place
            )
    return out
