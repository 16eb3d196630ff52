"""Drop-ins for TRL's CPOTrainer (and SimPO / AlphaPO), ORPOTrainer and KTOTrainer.

    from dpo_kernels.integrations.trl_siblings import FusedCPOTrainer as CPOTrainer

Each class subclasses its TRL 1.16 trainer and replaces only the loss computation: by default
(`fused_lm_head=True`) the backbone's hidden states and the LM head go to
`dpo_kernels.linear_sequence_logprobs` and the logits are never built; `fused_lm_head=False`
sends the model's logits to `dpo_kernels.sequence_logprobs`. Either op is the fused log-softmax +
gather + masked sum (for KTO, with the entropy / mean-logit statistics in the same pass); the
loss is the fused closed-form one from `dpo_kernels.preference_losses`. Arguments, numbers and
logged metrics are TRL's. Options these subclasses do not cover raise at construction, naming
the option.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, NamedTuple

import torch

from ..forward import _full, head_transform, unwrap_model
from ..linear_logprobs import linear_sequence_logprobs
from ..logprobs import sequence_logprobs
from ..preference_losses import cpo_loss, kto_loss, orpo_loss
from .trl import check_trl_version

check_trl_version()

from accelerate.utils import is_peft_model  # noqa: E402
from transformers.modeling_outputs import CausalLMOutput  # noqa: E402
from trl import KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402


def _head(model) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    return _full(head.weight), _full(head.bias), head_transform(inner)


def _hidden(model, **kwargs) -> torch.Tensor:
    """The backbone's last hidden states (the LM head's input), without building the logits:
    the head records its input and returns a [..., 1] stand-in. The head's weight is then read
    after the forward, which only one process may do (see `_check_fused_head`)."""
    head = unwrap_model(model).get_output_embeddings()
    seen: list[torch.Tensor] = []
    head.forward = lambda hidden: seen.append(hidden) or hidden[..., :1]
    try:
        model(**kwargs, use_cache=False)
    finally:
        del head.forward
    return seen[-1]


def _check_fused_head(trainer, paired: bool = True) -> None:
    """The sibling trainers' fused head reads the LM head's weight after the model's forward,
    which DDP (find_unused_parameters), FSDP and ZeRO-3 do not allow: one process only. The
    logits/* metrics of the paired trainers average every logit of the sequence, which the fused
    head gets as hidden @ mean(weight): exact for a linear head only."""
    if trainer._fused_lm_head and trainer.accelerator.num_processes > 1:
        raise ValueError(
            f"{type(trainer).__name__}(fused_lm_head=True) runs in one process only for now; "
            "under DDP, FSDP or DeepSpeed pass fused_lm_head=False"
        )
    if paired and trainer._fused_lm_head and head_transform(trainer.model)["softcap"] is not None:
        raise ValueError(
            f"{type(trainer).__name__}(fused_lm_head=True) does not support a final logit "
            "softcap (final_logit_softcapping); pass fused_lm_head=False"
        )


_ONE = torch.ones(1)  # a dummy pair: the loss runs once at construction to check the options


def _refuse(trainer_name: str, unsupported: dict[str, bool]) -> None:
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise ValueError(
            f"{trainer_name} does not support {', '.join(bad)}; use the stock TRL trainer for that"
        )


class _Logits(NamedTuple):
    """The logits (logits path) or the hidden states and head (fused head); `mean` is the logits
    themselves or, with the fused head, each position's mean logit (same means)."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    transform: dict[str, Any] | None
    mean: torch.Tensor


class _PairedMixin:
    """Shared by CPO and ORPO: one concatenated forward, completion sums from the fused op."""

    _backend: str | None
    _fused_lm_head: bool

    def _pad_value(self) -> int:
        raise NotImplementedError

    def _paired_forward(self, model, batch):
        cb = self.concatenated_inputs(
            batch,
            is_encoder_decoder=False,
            padding_value=self._pad_value(),
            device=self.accelerator.device,
        )
        P = batch["chosen_labels"].shape[0]
        ids, attn = cb["concatenated_input_ids"], cb["concatenated_attention_mask"]
        labels = cb["concatenated_labels"][:, 1:]
        if self._fused_lm_head:
            hidden = _hidden(model, input_ids=ids, attention_mask=attn)
            weight, bias, tr = _head(model)
            seq = linear_sequence_logprobs(
                hidden[:, :-1], weight, labels, bias=bias, backend=self._backend, **tr
            )
            with torch.no_grad():  # mean over the vocabulary of every position's logits
                mean = hidden @ weight.mean(0).to(hidden.dtype)
                if bias is not None:
                    mean = mean + bias.mean()
                mean = (tr["logit_scale"] * mean).float()
            return cb, P, _Logits(hidden, weight, bias, tr, mean), seq
        logits = model(ids, attention_mask=attn, use_cache=False).logits
        seq = sequence_logprobs(logits[:, :-1], labels, backend=self._backend)
        return cb, P, _Logits(None, None, None, None, logits), seq

    def _log_paired(
        self, out, logps, logits_c, logits_r, train_eval, extra_keys=()
    ) -> dict[str, float]:
        """TRL's metrics; logps: the (chosen, rejected) log-probs the loss saw, detached."""
        gather = self.accelerator.gather_for_metrics
        prefix = "eval_" if train_eval == "eval" else ""
        ch, rj = out.chosen_rewards, out.rejected_rewards
        m = out.metrics
        metrics = {
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


class FusedCPOTrainer(_PairedMixin, CPOTrainer):
    """`trl.experimental.cpo.CPOTrainer` (CPO, SimPO, AlphaPO) with dpo_kernels' log-probs and
    fused loss. Extra keywords: backend (None = automatic), fused_lm_head."""

    def __init__(
        self, *args, backend: str | None = None, fused_lm_head: bool = True, **kwargs
    ) -> None:
        self._backend = backend
        self._fused_lm_head = fused_lm_head
        super().__init__(*args, **kwargs)
        _check_fused_head(self)
        cpo_loss(-_ONE, -_ONE, chosen_counts=_ONE, rejected_counts=_ONE, **self._loss_options())
        _refuse(
            type(self).__name__,
            {
                "encoder-decoder models": self.is_encoder_decoder,
                "a Mixture-of-Experts router aux loss (output_router_logits)": (
                    self.aux_loss_enabled
                ),
            },
        )

    def _pad_value(self) -> int:
        return self.pad_token_id

    def _loss_options(self) -> dict[str, Any]:
        smoothing = self.label_smoothing if self.loss_type in ("sigmoid", "simpo") else 0.0
        return {
            "beta": self.beta,
            "label_smoothing": smoothing,  # hinge and ipo ignore it, as stock does
            "loss_type": self.loss_type,
            "cpo_alpha": self.cpo_alpha,
            "simpo_gamma": getattr(self, "simpo_gamma", 0.5),
            "alpha": self.alpha,
        }

    def get_batch_loss_metrics(
        self, model, batch: dict[str, Any], train_eval: Literal["train", "eval"] = "train"
    ):
        """CPO loss and TRL's metrics for a batch (TRL's get_batch_loss_metrics, fused)."""
        _cb, P, logits, seq = self._paired_forward(model, batch)
        out = cpo_loss(
            seq.logps[:P],
            seq.logps[P:],
            chosen_counts=seq.counts[:P],
            rejected_counts=seq.counts[P:],
            **self._loss_options(),
        )
        if self.loss_type in ("ipo", "simpo"):
            lp = (seq.logps / seq.counts).detach()
        else:
            lp = seq.logps.detach()
        metrics = self._log_paired(
            out, (lp[:P], lp[P:]), logits.mean[:P], logits.mean[P:], train_eval
        )
        return out.loss, metrics


class FusedORPOTrainer(_PairedMixin, ORPOTrainer):
    """`trl.experimental.orpo.ORPOTrainer` with dpo_kernels' log-probs and fused loss. Extra
    keywords: backend (None = automatic), fused_lm_head."""

    def __init__(
        self, *args, backend: str | None = None, fused_lm_head: bool = True, **kwargs
    ) -> None:
        self._backend = backend
        self._fused_lm_head = fused_lm_head
        super().__init__(*args, **kwargs)
        _check_fused_head(self)
        orpo_loss(-_ONE, -_ONE, chosen_counts=_ONE, rejected_counts=_ONE, beta=self.beta)
        _refuse(
            type(self).__name__,
            {
                "encoder-decoder models": self.is_encoder_decoder,
                "a Mixture-of-Experts router aux loss (output_router_logits)": (
                    self.aux_loss_enabled
                ),
            },
        )

    def _pad_value(self) -> int:
        return self.padding_value

    def get_batch_loss_metrics(
        self, model, batch: dict[str, Any], train_eval: Literal["train", "eval"] = "train"
    ):
        """ORPO loss and TRL's metrics for a batch (TRL's get_batch_loss_metrics, fused)."""
        cb, P, logits, seq = self._paired_forward(model, batch)
        # TRL's NLL: every attended token of the chosen sequence (prompt and completion).
        ids = cb["concatenated_input_ids"][:P, 1:]
        mask = cb["concatenated_attention_mask"][:P, 1:]
        if logits.hidden is not None:
            full = linear_sequence_logprobs(
                logits.hidden[:P, :-1],
                logits.weight,
                ids,
                bias=logits.bias,
                mask=mask,
                backend=self._backend,
                **logits.transform,
            )
        else:
            full = sequence_logprobs(logits.mean[:P, :-1], ids, mask=mask, backend=self._backend)
        nll = -full.logps.sum() / full.counts.sum()
        out = orpo_loss(
            seq.logps[:P],
            seq.logps[P:],
            chosen_counts=seq.counts[:P],
            rejected_counts=seq.counts[P:],
            beta=self.beta,
            nll_loss=nll,
        )
        avg = (seq.logps / seq.counts).detach()
        metrics = self._log_paired(
            out,
            (avg[:P], avg[P:]),
            logits.mean[:P, :-1],
            logits.mean[P:, :-1],
            train_eval,
            extra_keys=("log_odds_ratio", "log_odds_chosen"),
        )
        return out.loss, metrics


_KTO_NON_MODEL_KEYS = {
    "completion_mask",
    "KL_input_ids",
    "KL_attention_mask",
    "KL_completion_mask",
    "KL_token_type_ids",
    "KL_mm_token_type_ids",
    "label",
    "ref_logps",
    "ref_KL_logps",
}


class FusedKTOTrainer(KTOTrainer):
    """`trl.KTOTrainer` (kto, apo_zero_unpaired) with dpo_kernels' log-probs, statistics and fused
    loss. Extra keywords: backend (None = automatic), fused_lm_head. Precomputed reference log-probs
    (precompute_ref_log_probs=True) are TRL's own, read from the dataset as stock does."""

    def __init__(
        self, *args, backend: str | None = None, fused_lm_head: bool = True, **kwargs
    ) -> None:
        self._backend = backend
        self._fused_lm_head = fused_lm_head
        super().__init__(*args, **kwargs)
        _check_fused_head(self, paired=False)
        kto_loss(
            -_ONE,
            -_ONE,
            _ONE > 0,
            kl=0.0,
            beta=self.beta,
            loss_type=self.loss_type,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        _refuse(
            type(self).__name__,
            {
                "vision datasets": self._is_vision_dataset,
                "a Mixture-of-Experts router aux loss (router_aux_loss_coef)": (
                    self.aux_loss_enabled
                ),
            },
        )

    def _sums(self, model, input_ids, attention_mask, completion_mask, stats=False):
        """Completion log-prob sums of `model` on one padded batch (and the logits, stats)."""
        L = input_ids.size(1)
        if self._fused_lm_head:
            hidden = _hidden(model, input_ids=input_ids, attention_mask=attention_mask)
            hidden = hidden[:, -L:]  # prompt-learning PEFT prepends virtual tokens
            weight, bias, tr = _head(model)
            seq = linear_sequence_logprobs(
                hidden[:, :-1],
                weight,
                input_ids[:, 1:],
                bias=bias,
                mask=completion_mask[:, 1:],
                stats=stats,
                backend=self._backend,
                **tr,
            )
            return seq, None
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, -L:]  # prompt-learning PEFT prepends virtual tokens
        seq = sequence_logprobs(
            logits[:, :-1],
            input_ids[:, 1:],
            mask=completion_mask[:, 1:],
            stats=stats,
            backend=self._backend,
        )
        return seq, logits

    def _kl_sums(self, model, batch) -> torch.Tensor | None:
        if not self.calculate_KL:
            return None
        with torch.no_grad():
            seq, _ = self._sums(
                model,
                batch["KL_input_ids"],
                batch["KL_attention_mask"],
                batch["KL_completion_mask"],
            )
        return seq.logps

    def _ref_context(self) -> contextlib.AbstractContextManager:
        if is_peft_model(self.model) and self.ref_model is None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            name = "ref" if "ref" in unwrapped.peft_config else None
            return use_adapter(unwrapped, adapter_name=name)
        return contextlib.nullcontext()

    def _compute_loss(self, model, inputs, return_outputs):
        """KTO loss and TRL's metrics for a batch (TRL's _compute_loss, fused)."""
        mode = "train" if self.model.training else "eval"
        dev = self.accelerator.device
        gather = self.accelerator.gather_for_metrics
        batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        extra = set(batch) - _KTO_NON_MODEL_KEYS - {"input_ids", "attention_mask"}
        if extra:
            raise ValueError(
                f"{type(self).__name__} passes only input_ids and attention_mask to the model; the "
                f"batch also has {sorted(extra)} (use the stock KTOTrainer for such inputs)"
            )
        labels = torch.as_tensor(batch["label"], dtype=torch.bool, device=dev)
        KL_logps = self._kl_sums(model, batch)
        seq, logits = self._sums(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], True
        )
        if self.precompute_ref_logps:
            ref_logps = batch["ref_logps"]
            ref_KL_logps = batch["ref_KL_logps"] if self.calculate_KL else None
        else:
            ref = self.ref_model if self.ref_model is not None else self.model
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                self._ref_context(),
            ):
                ref_KL_logps = self._kl_sums(ref, batch)
                ref_seq, _ = self._sums(
                    ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                )
            ref_logps = ref_seq.logps
        kl = None
        if self.calculate_KL:
            kl = gather((KL_logps - ref_KL_logps).mean().detach()).mean().clamp(min=0)
        out = kto_loss(
            seq.logps,
            ref_logps,
            labels,
            kl=kl,
            beta=self.beta,
            loss_type=self.loss_type,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        self._log_kto(mode, batch, labels, seq, out, gather)
        if return_outputs:
            if logits is None:  # the fused head built none: one more forward, as stock does
                with torch.no_grad():
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
            return out.loss, CausalLMOutput(logits=logits)
        return out.loss

    def _log_kto(self, mode, batch, labels, seq, out, gather) -> None:
        m = self._metrics[mode]
        m["kl"].append(out.metrics["kl"].item())
        counted = batch["completion_mask"][:, 1:].bool()
        stats = seq.stats
        tokens = gather(counted.sum()).sum()
        ent = gather(stats.entropy.sum()).sum()
        m["entropy"].append((ent / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            n_tok = gather(batch["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n_tok // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        for name, rows in (("chosen", labels), ("rejected", ~labels)):
            total = gather(stats.mean_logits[rows].sum()).sum().item()
            n = gather(counted[rows].sum()).sum().item()
            if n > 0:
                m[f"logits/{name}"].append(total / n)
        lp = seq.logps.detach()
        rewards = {"chosen": out.chosen_rewards, "rejected": out.rejected_rewards}
        for name, rows in (("chosen", labels), ("rejected", ~labels)):
            count = gather(rows.sum()).sum().item()
            if count > 0:
                m[f"rewards/{name}"].append(gather(rewards[name].nansum()).nansum().item() / count)
                m[f"logps/{name}"].append(gather(lp[rows].nansum()).nansum().item() / count)
        if gather(labels.sum()).sum().item() > 0 and gather((~labels).sum()).sum().item() > 0:
            m["rewards/margins"].append(m["rewards/chosen"][-1] - m["rewards/rejected"][-1])
