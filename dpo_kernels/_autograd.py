"""Autograd helpers shared by the public ops."""

from __future__ import annotations

import torch


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


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a backward's first `n` results on (copies); differentiating them raises."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.clone() for t in tensors[:n])

    backward = staticmethod(no_double_backward)


def guard_double_backward(grads: tuple, *inputs: torch.Tensor) -> tuple:
    """An autograd.Function backward's results, as they are; under create_graph (grad mode on in
    the backward), made differentiable in `inputs` through a node that raises
    `no_double_backward`, instead of a wrong second derivative or a torch error deep inside."""
    if not torch.is_grad_enabled():
        return grads
    given = [g for g in grads if g is not None]
    out = iter(_NoDoubleBackward.apply(len(given), *given, *inputs))
    return tuple(None if g is None else next(out) for g in grads)
