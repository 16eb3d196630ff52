"""`FusedKTOTrainer`: TRL's KTOTrainer (kto, apo_zero_unpaired) on dpo_kernels' fused log-probs,
statistics and closed-form loss (see `trl_siblings` for the shared design). With the fused head
(the default) the loss runs inside the LM head call (`linear_kto_loss`: 3 matmuls) once the KL
estimate (no gradient) and the reference sums are known; a batch with an odd number of
completions, which that op cannot pair, takes `linear_sequence_logprobs` + `kto_loss`."""

from __future__ import annotations

import torch

from ..linear_preference_losses import _linear_kto
from ..preference_losses import kto_loss
from ._siblings import _ONE, fused_head_refusals, reference_pass, refuse, score
from .trl import check_trl_version

check_trl_version()

from transformers.modeling_outputs import CausalLMOutput  # noqa: E402
from trl import KTOTrainer  # noqa: E402

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
    (precompute_ref_log_probs=True) go through TRL's precompute and dataset columns, computed by
    `compute_ref_log_probs` with the same op and head as the policy's."""

    def __init__(
        self, *args, backend: str | None = None, fused_lm_head: bool = True, **kwargs
    ) -> None:
        self._backend = backend
        self._fused_lm_head = fused_lm_head
        # None: the loss is fused into the LM head call (`linear_kto_loss`, 3 matmuls; a batch
        # with an odd number of completions still takes log-probs + kto_loss); else why not.
        self.linear_loss_fallback = (
            None if fused_lm_head else "fused_lm_head=False: the model's logits and kto_loss"
        )
        super().__init__(*args, **kwargs)
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
        refuse(
            self,
            {
                "vision datasets": self._is_vision_dataset,
                **fused_head_refusals(self, fused_lm_head),
                "a Mixture-of-Experts router aux loss (router_aux_loss_coef)": (
                    self.aux_loss_enabled
                ),
            },
        )

    def _sums(self, model, input_ids, attention_mask, completion_mask, stats=False, loss=None):
        """Completion log-prob sums of `model` on one padded batch (and the logits, stats); with
        `loss` (a `HeadCall.loss`), also its output, computed in the head call."""
        sc = score(
            model, input_ids, attention_mask, completion_mask[:, 1:],
            fused_lm_head=self._fused_lm_head, backend=self._backend, stats=stats, loss=loss,
        )  # fmt: skip
        if loss is not None:
            return sc.seq, sc.logits, sc.result
        return sc.seq, sc.logits

    def _loss_options(self) -> dict:
        return {
            "beta": self.beta,
            "loss_type": self.loss_type,
            "desirable_weight": self.desirable_weight,
            "undesirable_weight": self.undesirable_weight,
            "backend": self._backend,
        }

    def _head_loss(self, ref_logps, labels, kl):
        """The KTO loss inside the LM head call (`HeadCall.loss`), with the KL estimate and the
        reference sums known: (its output, the log-probs with their token statistics)."""

        def loss(hidden, weight, bias, ids, mask, transform):
            return _linear_kto(
                hidden, weight, ids, ref_logps, labels, kl=kl, bias=bias, mask=mask,
                **transform, **self._loss_options(), stats=True,
            )  # fmt: skip

        return loss

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

    def _ref_sums(self, batch):
        """(reference sums, reference KL sums or None): precomputed, or without gradient."""
        if self.precompute_ref_logps:
            return batch["ref_logps"], (batch["ref_KL_logps"] if self.calculate_KL else None)
        ref = self.ref_model if self.ref_model is not None else self.model
        with reference_pass(self):
            ref_KL_logps = self._kl_sums(ref, batch)
            ref_seq, _ = self._sums(
                ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
        return ref_seq.logps, ref_KL_logps

    def compute_ref_log_probs(self, model, inputs):
        """Reference sums of one padded batch (and of its KL completions), which TRL's
        `precompute_ref_log_probs` stores in the dataset: through the same op and LM head as the
        policy's sums, so that the two agree at equal weights. (TRL's own computes them with its
        `add_fused_lm_head`, which reads some models' final-logit transform differently from
        their forward: RecurrentGemma's `logits_soft_cap`, a VLM's text-config softcap.)"""
        with self.accelerator.autocast(), reference_pass(self):  # (completions first, as TRL)
            seq, _ = self._sums(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
            )
            return seq.logps, self._kl_sums(model, inputs)

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
        ids, attn, cmask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        fused = self.linear_loss_fallback is None
        policy_first = not fused  # stock's order: with PEFT and no ref_model, its dropout draws
        if policy_first:
            seq, logits = self._sums(model, ids, attn, cmask, True)
        # With the fused head the reference sums and the KL estimate (no gradient) come before
        # the policy's forward, on every route, so processes that take different routes for an
        # odd batch still call their collectives in the same order.
        ref_logps, ref_KL_logps = self._ref_sums(batch)
        kl = None
        if self.calculate_KL:
            kl = gather((KL_logps - ref_KL_logps).mean().detach()).mean().clamp(min=0)
        if fused and ids.shape[0] % 2 == 0:  # the loss in the head
            loss = self._head_loss(ref_logps, labels, kl)
            seq, logits, out = self._sums(model, ids, attn, cmask, True, loss=loss)
        else:
            if not policy_first:
                seq, logits = self._sums(model, ids, attn, cmask, True)
            out = kto_loss(seq.logps, ref_logps, labels, kl=kl, **self._loss_options())
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
