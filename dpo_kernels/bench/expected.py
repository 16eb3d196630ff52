"""The float64 references: the naive computation (or the whole trainer step) on the same inputs
and weights in float64, each sequence on its own where padding or packing could hide an error."""

from __future__ import annotations

import torch

from .cases import (
    Case,
    GradStep,
    Result,
    linear_dpo_inputs,
    linear_inputs,
    logits_inputs,
    preference_inputs,
    sigmoid_loss,
    tiny_llama,
)


def logps64(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] sums of the counted tokens' log-probs, in float64: log_softmax, gather, masked sum."""
    lp = logits.double().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def logprobs(case: Case, device: str) -> Result:
    logits, labels, mask = logits_inputs(case, device)
    z = logits.double().requires_grad_()
    return GradStep([z], lambda: logps64(z, labels, mask))()


def linear(case: Case, device: str) -> Result:
    hidden, weight, labels, mask = linear_inputs(case, device)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    return GradStep([h, w], lambda: logps64(h @ w.T, labels, mask))()


def alone_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows] completion log-prob sums, each sequence run through the model alone (no padding,
    no packing): what both the padded and the packed paths must reproduce."""
    sums = []
    for ids, am, cm in zip(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"], strict=True
    ):
        n = int(am.sum())
        logits = model(input_ids=ids[None, :n], use_cache=False).logits[:, :-1]
        sums.append(logps64(logits, ids[None, 1:n], cm[None, 1:n] != 0))
    return torch.cat(sums)


def dpo_step(case: Case, device: str) -> Result:
    """The sigmoid DPO loss (beta = DPO_BETA) in float64 and its gradient for the policy."""
    batch, V = preference_inputs(case, device), case.shape[-1]
    policy, ref = tiny_llama(V, 0, device).double(), tiny_llama(V, 1, device).double()
    with torch.no_grad():
        rc, rr = alone_logps(ref, batch).chunk(2)

    return GradStep(
        list(policy.parameters()), lambda: sigmoid_loss(alone_logps(policy, batch), rc, rr)
    )()


def packed(case: Case, device: str) -> Result:
    model = tiny_llama(case.shape[-1], 0, device).double()
    batch = preference_inputs(case, device)
    return GradStep(list(model.parameters()), lambda: alone_logps(model, batch))()


def linear_dpo(case: Case, device: str) -> Result:
    hidden, weight, labels, mask, _, rc, rr = linear_dpo_inputs(case, device)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rc, rr = rc.double(), rr.double()

    def loss():
        return sigmoid_loss(logps64(h @ w.T, labels, mask), rc, rr)

    return GradStep([h, w], loss)()
