"""The DPO loss as one fused op: the `dpo_kernels::dpo_loss` custom op computes the loss and its
gradient with respect to the policy log-probs in one pass (the backend's `dpo_loss_and_grads`);
autograd only scales that gradient. The public API (`dpo_loss`, `DPOLoss`, `make_spec`) is in
losses.py.
"""

from __future__ import annotations

import torch

from ._autograd import input_grads
from .backend import kernels, resolve_backend
from .common import DPOLossSpec, acc_dtype
from .ops import reference


@torch.library.custom_op("dpo_kernels::dpo_loss", mutates_args=())
def _dpo_loss_op(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    nc: torch.Tensor,
    nr: torch.Tensor,
    weights: torch.Tensor | None,
    type_weights: list[float],
    params: list[float],
    f_divergence_type: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair loss [P], dloss/dpc [P], dloss/dpr [P]) of the spec that
    `DPOLossSpec.pack` gave (type_weights, params, f_divergence_type). With per-pair `weights`
    [P] (loss types whose pair losses depend on their own pair only), the loss is the mean of the
    weighted pair losses."""
    spec = DPOLossSpec.unpack(type_weights, params, f_divergence_type)
    loss, per, dpc, dpr = kernels(backend).dpo_loss_and_grads(pc, pr, rc, rr, nc, nr, spec)
    if weights is not None:
        per, dpc, dpr = per * weights, dpc * weights, dpr * weights
        loss = per.mean()
    return tuple(t.to(pc.dtype).clone() for t in (loss, per, dpc, dpr))


@_dpo_loss_op.register_fake
def _(pc, pr, rc, rr, nc, nr, weights, *_):
    return pc.new_empty(()), pc.new_empty(pc.shape), pc.new_empty(pc.shape), pc.new_empty(pc.shape)


def _dpo_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[2], output[3], *inputs[:7])
    ctx.spec = DPOLossSpec.unpack(*inputs[7:10])


def _dpo_backward(ctx, grad_loss, *_):
    dpc, dpr, pc, pr, rc, rr, nc, nr, weights = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, Hessian-vector products): the gradient must be
        # differentiable in pc and pr. The closed forms are not, so recompute it (same values)
        # from the autograd formulas of the reference, whose graph supports double backward.
        a = pc if pc.requires_grad else pc.detach().requires_grad_()
        b = pr if pr.requires_grad else pr.detach().requires_grad_()
        per = reference.dpo_losses(a, b, rc.detach(), rr.detach(), nc, nr, ctx.spec)
        mean = (per if weights is None else per * weights).mean()
        ga, gb = torch.autograd.grad(mean, (a, b), grad_loss, create_graph=True, allow_unused=True)
        return input_grads(
            ctx,
            torch.zeros_like(pc) if ga is None else ga,
            torch.zeros_like(pr) if gb is None else gb,
        )
    return input_grads(ctx, grad_loss * dpc, grad_loss * dpr)


torch.library.register_autograd(
    "dpo_kernels::dpo_loss", _dpo_backward, setup_context=_dpo_setup_context
)


def dpo_pair_loss(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    nc: torch.Tensor,
    nr: torch.Tensor,
    spec: DPOLossSpec,
    backend: str | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss (carries gradient to pc and pr) and the detached per-pair losses [P]; with
    `weights` [P] (detached), of the weighted pair losses.

    Validated inputs only (see `dpo_kernels.losses.dpo_loss`); computes in float32 (float64 for
    float64 inputs). The reference log-probs get no gradient. Backends: "triton" (one kernel
    launch), "cpu" (the closed forms in vectorized torch), "reference" (the autograd formulas).
    """
    dtype = acc_dtype(pc.dtype)
    pc, pr, rc, rr, nc, nr = (t.to(dtype) for t in (pc, pr, rc, rr, nc, nr))
    w = None if weights is None else weights.detach().to(dtype)
    name = resolve_backend(backend, pc.device)
    loss, per, _, _ = _dpo_loss_op(pc, pr, rc.detach(), rr.detach(), nc, nr, w, *spec.pack(), name)
    return loss, per
