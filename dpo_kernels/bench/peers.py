"""The kernel-level methods: one fwd+bwd step builder per method of the logprobs, linear and
linear_dpo ops (naive PyTorch, TRL, Cut Cross-Entropy, Liger, ours, plain matmuls). A builder
takes (case, device) and returns a step: one fwd+bwd returning (values, gradients) to check
against the float64 reference, or None for a timing reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import dpo_loss, linear_dpo_loss, linear_sequence_logprobs, sequence_logprobs
from .cases import (
    DPO_BETA,
    Case,
    GradStep,
    Step,
    linear_dpo_inputs,
    linear_inputs,
    logits_inputs,
    sigmoid_loss,
)


def has(module: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec(module) else f"{module} not installed"


def cuda_only(device: str) -> str | None:
    return None if device == "cuda" else "its Triton kernels need CUDA"


def cpu_only(device: str) -> str | None:
    return None if device == "cpu" else "on CUDA, its Triton kernels (the cce row) are CCE's path"


def anywhere(device: str) -> None:
    return None


def _logits_step(case: Case, device: str, logps_of) -> GradStep:
    """fwd+bwd of logps_of(logits, labels, mask) -> [B]; gradient of the logits."""
    logits, labels, mask = logits_inputs(case, device)
    z = logits.requires_grad_()
    return GradStep([z], lambda: logps_of(z, labels, mask))


def _naive_logps(z, labels, mask):
    lp = z.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def naive(case, device) -> Step:
    return _logits_step(case, device, _naive_logps)


def ours(case, device) -> Step:
    return _logits_step(
        case, device, lambda z, labels, mask: sequence_logprobs(z, labels, mask=mask).logps
    )


def trl_selective(case, device) -> Step:
    from trl.trainer.utils import selective_log_softmax

    # Summed in float32, as TRL's trainer sums them: a bf16 sum would round the result (3e-3 of
    # sums near -4750), an error of the wrapper's, not of TRL's log-softmax.
    return _logits_step(
        case,
        device,
        lambda z, labels, mask: (selective_log_softmax(z, labels).float() * mask).sum(-1),
    )


def _linear_step(case: Case, device: str, logps_of) -> GradStep:
    """fwd+bwd of logps_of(hidden, weight, labels, mask) -> [B]; gradients of hidden and weight."""
    hidden, weight, labels, mask = linear_inputs(case, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    return GradStep([h, w], lambda: logps_of(h, w, labels, mask))


def linear_naive(case, device) -> Step:
    return _linear_step(case, device, lambda h, w, y, mask: _naive_logps(h @ w.T, y, mask))


def linear_ours(case, device) -> Step:
    return _linear_step(
        case,
        device,
        lambda h, w, labels, mask: linear_sequence_logprobs(h, w, labels, mask=mask).logps,
    )


def linear_trl(case, device) -> Step:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer import utils

    # The chunk TRL's DPOTrainer passes (one vocabulary chunk up to 32k), on the counted rows only
    # (what the trainer passes on CUDA; on CPU it scores every row).
    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)

    def logps_of(h, w, labels, mask):
        lp = ChunkedLogProbFunction.apply(h[mask], w, None, labels[mask], 1.0, chunk, None, 1.0, ())
        return lp[0].new_zeros(mask.shape).masked_scatter(mask, lp[0]).sum(-1)

    return _linear_step(case, device, logps_of)


def _dense_grad(x: torch.Tensor) -> torch.Tensor:
    """x, with a dense incoming gradient: CCE's Triton backward (reduction="none") views its
    incoming gradient flat, and `.sum(-1)`'s is an expanded one ("view size is not compatible"
    on the H200). The product's backward writes a dense tensor."""
    return x * torch.ones((), dtype=x.dtype, device=x.device)


def _cce(linear_cross_entropy) -> Callable[[Case, str], Step]:
    def build(case, device) -> Step:
        def logps_of(h, w, labels, mask):
            targets = labels.masked_fill(~mask, -100)
            return -_dense_grad(linear_cross_entropy(h, w, targets, reduction="none")).sum(-1)

        return _linear_step(case, device, logps_of)

    return build


def cce_torch_compile(case, device) -> Step:
    from cut_cross_entropy.torch_compile import torch_compile_linear_cross_entropy

    return _cce(torch_compile_linear_cross_entropy)(case, device)


def cce_triton(case, device) -> Step:
    from cut_cross_entropy import linear_cross_entropy

    return _cce(linear_cross_entropy)(case, device)


def liger_dpo(case, device) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # Liger fuses the LM head with a whole DPO loss (first half chosen, second half rejected): its
    # sums are checked, its gradients (of the DPO loss, not of the sums) are not.
    if case.shape[0] % 2:  # one row: no chosen half, a NaN loss and zero gradients
        raise ValueError(
            f"it pairs the first half of the rows with the second: B = {case.shape[0]} is odd"
        )
    loss_fn = LigerFusedLinearDPOLoss(use_ref_model=False)
    hidden, weight, labels, mask = linear_inputs(case, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    targets = labels.masked_fill(~mask, -100)

    def forward():
        loss, aux = loss_fn(w, h, targets)
        return torch.cat([aux[0], aux[1]]), loss

    return GradStep([h, w], forward, own_objective=True)


def linear_matmuls(case, device) -> Step:
    """Timing reference: the 4 plain matmuls the fused op does over the counted tokens."""
    hidden, weight, _, mask = linear_inputs(case, device)
    h = hidden[mask]
    dz = torch.randn(h.shape[0], weight.shape[0], device=device).to(weight.dtype)
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(weight)

    def step():  # into preallocated outputs: matmul time only, no page faults
        torch.mm(h, weight.T, out=z)  # forward
        torch.mm(h, weight.T, out=z)  # backward: recomputed
        torch.mm(dz, weight, out=dh)  # dh
        torch.mm(dz.T, h, out=dw)  # dW

    return step


def _linear_dpo_step(case: Case, device: str, loss_of) -> GradStep:
    """fwd+bwd of loss_of(hidden, weight, labels, mask, rc, rr) -> [1]; gradients of hidden and
    weight."""
    hidden, weight, labels, mask, _, rc, rr = linear_dpo_inputs(case, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    return GradStep([h, w], lambda: loss_of(h, w, labels, mask, rc, rr))


def ldpo_naive(case, device) -> Step:
    def loss_of(h, w, y, mask, rc, rr):
        return sigmoid_loss(_naive_logps(h @ w.T, y, mask), rc, rr)

    return _linear_dpo_step(case, device, loss_of)


def _ldpo_cce(lce) -> Callable[[Case, str], Step]:
    def build(case, device) -> Step:
        def loss_of(h, w, y, mask, rc, rr):
            sums = -_dense_grad(lce(h, w, y.masked_fill(~mask, -100), reduction="none")).sum(-1)
            return sigmoid_loss(sums, rc, rr)

        return _linear_dpo_step(case, device, loss_of)

    return build


def ldpo_cce(case, device) -> Step:
    from cut_cross_entropy.torch_compile import torch_compile_linear_cross_entropy

    return _ldpo_cce(torch_compile_linear_cross_entropy)(case, device)


def ldpo_cce_triton(case, device) -> Step:
    from cut_cross_entropy import linear_cross_entropy

    return _ldpo_cce(linear_cross_entropy)(case, device)


def ldpo_liger(case, device) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # Liger takes no precomputed reference sums: it runs the reference head itself (one more
    # projection of every token, without gradient), on the same hidden states.
    hidden, weight, labels, mask, ref_weight, _, _ = linear_dpo_inputs(case, device)
    loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, use_ref_model=True)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    targets = labels.masked_fill(~mask, -100)
    return GradStep(
        [h, w],
        lambda: loss_fn(w, h, targets, ref_input=hidden.detach(), ref_weight=ref_weight)[0][None],
    )


def ldpo_unfused(case, device) -> Step:
    def loss_of(h, w, y, mask, rc, rr):
        pc, pr = linear_sequence_logprobs(h, w, y, mask=mask).logps.chunk(2)
        return dpo_loss(pc, pr, rc, rr, beta=DPO_BETA).loss[None]

    return _linear_dpo_step(case, device, loss_of)


def ldpo_fused(case, device) -> Step:
    def loss_of(h, w, y, mask, rc, rr):
        out = linear_dpo_loss(h, w, y, mask=mask, ref_chosen_logps=rc, ref_rejected_logps=rr,
                              beta=DPO_BETA)  # fmt: skip
        return out.loss[None]

    return _linear_dpo_step(case, device, loss_of)


def ldpo_matmuls(case, device) -> Step:
    """Timing reference: the 3 plain matmuls of the fused loss over the counted tokens."""
    hidden, weight, _, mask = linear_inputs(case, device)
    h = hidden[mask]
    dz = torch.randn(h.shape[0], weight.shape[0], device=device).to(weight.dtype)
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(weight)

    def step():
        torch.mm(h, weight.T, out=z)  # logits
        torch.mm(dz, weight, out=dh)  # dh
        torch.mm(dz.T, h, out=dw)  # dW

    return step
