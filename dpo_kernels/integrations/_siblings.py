"""What the sibling trainers (CPO / SimPO / AlphaPO, ORPO, KTO) share: one forward of the model
that returns completion log-prob sums, through the fused LM head inside the model's forward (as
`FusedDPOTrainer` does, so DDP / FSDP / DeepSpeed hooks on the head work) or through the logits."""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch

from ..common import SequenceLogprobs
from ..fused_head import (
    HEAD_KWARG,
    HeadCall,
    head_transform,
    install_fused_head,
    is_prompt_learning,
    plain_lm_head,
    unwrap_model,
)
from ..logprobs import sequence_logprobs

_ONE = torch.ones(1)  # a dummy pair: each loss runs once at construction to check the options
IGNORE = -100  # TRL's CPO / ORPO label padding (hard-coded there)


def refuse(trainer, unsupported: dict[str, bool]) -> None:
    """Raises at construction for the options a fused trainer does not cover, naming them."""
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        alt = "fused_lm_head=False or " if all("fused_lm_head=True" in b for b in bad) else ""
        raise ValueError(
            f"{type(trainer).__name__} does not support {', '.join(bad)}; use {alt}the stock TRL "
            "trainer for that"
        )


@contextlib.contextmanager
def reference_pass(trainer):
    """What every reference pass of the fused trainers runs in, as TRL's: no gradient, the
    policy's gradient checkpointing off, and without a reference model a PEFT policy as its own
    reference (adapter disabled, or the "ref" adapter active)."""
    from accelerate.utils import is_peft_model
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    gc_kwargs = trainer.args.gradient_checkpointing_kwargs
    with (
        torch.no_grad(),
        disable_gradient_checkpointing(trainer.model, gc_kwargs),
        contextlib.ExitStack() as stack,
    ):
        if trainer.ref_model is None and is_peft_model(trainer.model):
            _fsdp2_lazy_init(trainer.model)
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            name = "ref" if "ref" in unwrapped.peft_config else None
            stack.enter_context(use_adapter(unwrapped, adapter_name=name))
        yield


def _fsdp2_lazy_init(model: torch.nn.Module) -> None:
    """FSDP2 (`fully_shard`) sets up at its first forward, with the dtype to reduce gradients in
    taken from the parameters that require grad then. The fused trainers' first forward is the
    reference pass, which for PEFT is the policy with its adapter off (its weights not requiring
    grad): that setup would find none, and the first backward fail under mixed precision. So it
    runs here, with the adapter on (a no-op once done, and for other engines)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch 2.5: FSDP2 is torch.distributed._composable.fsdp (or none)
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return
    root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)  # outermost
    if root is not None:
        root._get_fsdp_state()._lazy_init()


def fused_head_refusals(trainer, fused_lm_head: bool) -> dict[str, bool]:
    """What every fused trainer refuses with the fused head (entries for `refuse`): a model the
    head's hidden states would not line up with, or a head it would misread."""
    return {
        "prompt-learning PEFT (virtual tokens) with fused_lm_head=True": (
            fused_lm_head and is_prompt_learning(trainer.model)
        ),
        "an LM head that is not a plain nn.Linear (a LoRA adapter on lm_head, a head class with "
        "its own forward, layers between the backbone and the head) with fused_lm_head=True": (
            fused_lm_head and not plain_lm_head(trainer.model)
        ),
    }


def check_softcap(trainer) -> None:
    """The paired trainers log the mean of every logit, which the fused head gets as
    hidden @ mean(weight): exact for a linear head, not under a final logit softcap."""
    if (
        trainer._fused_lm_head
        and head_transform(unwrap_model(trainer.model))["softcap"] is not None
    ):
        raise ValueError(
            f"{type(trainer).__name__}(fused_lm_head=True) does not support a final logit "
            "softcap (final_logit_softcapping, logits_soft_cap, ...); pass fused_lm_head=False"
        )


def mean_logits(hidden, weight, bias, transform) -> torch.Tensor:
    """[B, L] mean over the vocabulary of each position's logits, without building them (called
    inside the LM head's forward by the fused head: `HeadCall.extra`). No gradient."""
    with torch.no_grad():
        m = hidden @ weight.mean(0).to(hidden.dtype)
        if bias is not None:
            m = m + bias.mean().to(m.dtype)
        return (transform["logit_scale"] * m).float()


class Scored(NamedTuple):
    """Log-probs of one forward, and when asked for the per-position mean logit ([B, L]; on the
    logits path the logits themselves, [B, L, V], which have the same overall mean)."""

    seq: SequenceLogprobs
    mean_logits: torch.Tensor | None
    logits: torch.Tensor | None  # the model's logits, whole (logits path only)
    result: Any = None  # the head call's loss output (with `loss`)


def score(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor,
    *,
    fused_lm_head: bool,
    backend: str | None,
    stats: bool = False,
    with_mean: bool = False,
    loss=None,
) -> Scored:
    """One forward of `model`; log-probs of the next tokens input_ids[:, 1:] where `mask`
    ([B, L-1]) is set. With the fused head the logits are never built: the LM head module is
    called inside the model's forward (`dpo_kernels.fused_head.install_fused_head`). `loss`
    (fused head only): a `HeadCall.loss` returning (its output, the pass's SequenceLogprobs),
    run in the head call instead of the log-probs op; its output is `Scored.result`."""
    labels = input_ids[:, 1:]
    mask = mask != 0
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if fused_lm_head:
        install_fused_head(model)
        extra = mean_logits if with_mean else None
        call = HeadCall(labels, mask, stats=stats, backend=backend, extra=extra, loss=loss)
        out = model(**kwargs, **{HEAD_KWARG: call})
        return Scored(out.logprobs, out.extra, None, out.loss)
    full = model(**kwargs).logits  # what predictions get, as stock's (virtual tokens included)
    logits = full[:, -input_ids.shape[1] :]  # prompt-learning PEFT prepends virtual tokens
    seq = sequence_logprobs(logits[:, :-1], labels, mask=mask, stats=stats, backend=backend)
    return Scored(seq, logits if with_mean else None, full)


class PairedMixin:
    """Shared by CPO and ORPO: one concatenated forward, completion sums from the fused op."""

    _backend: str | None
    _fused_lm_head: bool

    def _init_kernels(self, backend: str | None, fused_lm_head: bool) -> None:
        self._backend = backend
        self._fused_lm_head = fused_lm_head

    def _check_paired(self) -> None:
        check_softcap(self)
        refuse(
            self,
            {
                "encoder-decoder models": self.is_encoder_decoder,
                **fused_head_refusals(self, self._fused_lm_head),
                # (with a coefficient of 0 stock adds nothing: trained alike)
                "a Mixture-of-Experts router aux loss (output_router_logits with "
                "router_aux_loss_coef != 0)": self.aux_loss_enabled and self.aux_loss_coef != 0,
            },
        )

    def _pad_value(self) -> int:
        raise NotImplementedError

    def _paired_forward(self, model, batch, whole_chosen: bool = False, loss=None):
        """(concatenated batch, P, per-position mean logits [2P, L] (or the logits), completion
        log-probs [2P] with counts, and with `whole_chosen` the chosen rows' log-prob sums and
        counts over every attended token, prompt included: ORPO's NLL; else `loss`'s output when
        the head call computed the loss (`score`), or None)."""
        cb = self.concatenated_inputs(
            batch,
            is_encoder_decoder=False,
            padding_value=self._pad_value(),
            device=self.accelerator.device,
        )
        P = batch["chosen_labels"].shape[0]
        ids, attn = cb["concatenated_input_ids"], cb["concatenated_attention_mask"]
        completion = cb["concatenated_labels"][:, 1:] != IGNORE  # where labels == input ids
        mask = completion.clone()
        if whole_chosen:
            mask[:P] |= attn[:P, 1:] != 0
        sc = score(
            model, ids, attn, mask, fused_lm_head=self._fused_lm_head, backend=self._backend,
            with_mean=True, loss=loss,
        )  # fmt: skip
        seq = sc.seq
        if not whole_chosen:
            return cb, P, sc.mean_logits, seq.logps, seq.counts, sc.result
        chosen = (seq.token_logps[:P] * completion[:P]).sum(1)
        logps = torch.cat([chosen, seq.logps[P:]])
        counts = completion.sum(1)
        return cb, P, sc.mean_logits, logps, counts, (seq.logps[:P], seq.counts[:P])

    def _log_paired(self, out, logps, logits_c, logits_r, train_eval, extra_keys=()):
        """TRL's metrics; logps: the (chosen, rejected) log-probs the loss saw, detached."""
        gather = self.accelerator.gather_for_metrics
        prefix = "eval_" if train_eval == "eval" else ""
        ch, rj = out.chosen_rewards, out.rejected_rewards
        m = out.metrics
        metrics: dict[str, Any] = {
            "rewards/chosen": gather(ch).mean(),
            "rewards/rejected": gather(rj).mean(),
            "rewards/accuracies": gather((ch > rj).float()).mean(),
            "rewards/margins": gather(ch - rj).mean(),
            "logps/rejected": gather(logps[1]).mean(),
            "logps/chosen": gather(logps[0]).mean(),
            "logits/rejected": gather(logits_r.detach().mean()).mean(),
            "logits/chosen": gather(logits_c.detach().mean()).mean(),
            "nll_loss": gather(m["nll_loss"].detach()).mean(),
        }
        for k in extra_keys:
            metrics[k] = gather(m[k].detach()).mean()
        return {prefix + k: v.item() for k, v in metrics.items()}
