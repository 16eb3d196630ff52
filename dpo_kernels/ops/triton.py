"""The "triton" backend: the functions every backend offers (see dpo_kernels/backend.py), from the
kernel files, which keep their own names (gpu_check.py and the tests patch kernels there)."""

from .triton_dpo_loss import dpo_loss_and_grads
from .triton_linear_logprobs import linear_logprobs_backward, linear_logprobs_forward
from .triton_logprobs import grad_strides, logprobs_backward, logprobs_forward

__all__ = [
    "dpo_loss_and_grads",
    "grad_strides",
    "linear_logprobs_backward",
    "linear_logprobs_forward",
    "logprobs_backward",
    "logprobs_forward",
]
