"""Autograd helpers shared by the public ops."""

from __future__ import annotations


def input_grads(ctx, *grads):
    """A backward's return value: `grads` for the first inputs, None for every later one (as
    many as the op or Function has inputs: ctx.needs_input_grad has one entry each)."""
    return (*grads, *(None,) * (len(ctx.needs_input_grad) - len(grads)))


def no_double_backward(ctx, *grads):
    raise RuntimeError(
        "dpo_kernels: double backward (torch.autograd.grad(..., create_graph=True), e.g. a "
        "gradient penalty) through sequence_logprobs / linear_sequence_logprobs is not supported: "
        "their backward is a fused kernel with no derivative of its own. Compute the term that "
        "needs second derivatives with plain PyTorch (log_softmax + gather)."
    )


def no_setup(ctx, inputs, output) -> None:
    pass
