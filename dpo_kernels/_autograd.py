"""Autograd helpers shared by the public ops."""

from __future__ import annotations

import torch


def input_grads(ctx, *grads):
    """A backward's return value: `grads` for the first inputs, None for every later one (as
    many as the op or Function has inputs: ctx.needs_input_grad has one entry each)."""
    return (*grads, *(None,) * (len(ctx.needs_input_grad) - len(grads)))


def refuse_double_backward(op: str):
    raise RuntimeError(
        "dpo_kernels: double backward (torch.autograd.grad(..., create_graph=True), e.g. a "
        f"gradient penalty) through {op} is not supported: its backward hands out gradients "
        "made by a fused kernel, which have no derivative of their own (dpo_loss, from log-probs, "
        "supports it). Compute the term that needs second derivatives with plain PyTorch "
        "(log_softmax + gather and the loss formula)."
    )


def no_double_backward(ctx, *grads):
    """The autograd formula of the log-probs' backward ops: refuses."""
    refuse_double_backward("sequence_logprobs / linear_sequence_logprobs")


def no_setup(ctx, inputs, output) -> None:
    pass


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a backward's first `n` results on (copies, differentiable in the inputs after
    them); differentiating them raises, naming the op."""

    @staticmethod
    def forward(ctx, op, n, *tensors):
        ctx.op = op
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        refuse_double_backward(ctx.op)


def guard_double_backward(grads: tuple, op: str, *inputs: torch.Tensor) -> tuple:
    """An autograd backward's results, as they are; under create_graph (grad mode on in the
    backward), made differentiable in the op's `inputs` through a node that raises (naming `op`)
    when a second backward reaches it (`.backward()` or `autograd.grad` of any tensor upstream),
    instead of a silently missing second derivative (the fused gradients are constants to
    autograd) or a torch error deep inside."""
    if not torch.is_grad_enabled():
        return grads
    given = [g for g in grads if g is not None]
    out = iter(_NoDoubleBackward.apply(op, len(given), *given, *inputs))
    return tuple(None if g is None else next(out) for g in grads)
