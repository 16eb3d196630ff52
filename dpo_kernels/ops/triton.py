"""The "triton" backend: the functions every backend offers (backend.FUNCTIONS), from the kernel
files, which keep their own names (gpu_check.py and the tests patch kernels there)."""

from .triton_dpo_loss import dpo_loss_and_grads as dpo_loss_and_grads
from .triton_linear_logprobs import FOLD_NO_ARG as FOLD_NO_ARG
from .triton_linear_logprobs import ROW_ALIGN as ROW_ALIGN
from .triton_linear_logprobs import TILE_COPIES as TILE_COPIES
from .triton_linear_logprobs import fold_rows as fold_rows
from .triton_linear_logprobs import fold_softmax_rows as fold_softmax_rows
from .triton_linear_logprobs import grad_rows as grad_rows
from .triton_linear_logprobs import linear_logprobs_backward as linear_logprobs_backward
from .triton_linear_logprobs import linear_logprobs_forward as linear_logprobs_forward
from .triton_linear_logprobs import project_rows as project_rows
from .triton_logprobs import grad_strides as grad_strides
from .triton_logprobs import logprobs_backward as logprobs_backward
from .triton_logprobs import logprobs_forward as logprobs_forward
from .triton_sibling_losses import sibling_loss_and_grads as sibling_loss_and_grads
