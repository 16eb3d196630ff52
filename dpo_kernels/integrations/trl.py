"""Drop-in for TRL's DPOTrainer: the same training, losses and logged metrics, on our kernels.

    from dpo_kernels.integrations.trl import FusedDPOTrainer as DPOTrainer

`FusedDPOTrainer` subclasses `trl.DPOTrainer` and replaces only the loss computation: one
concatenated forward, log-probs (and the logged entropy / logits / token-accuracy statistics) from
the fused op, the reference pass through the same op without gradient, and the fused DPO loss. By
default the logits are never built (`fused_lm_head=True`) and the loss is fused into the LM head
call inside the model's forward (`linear_dpo`: the reference sums first, then 3 matmuls over the
completion tokens); the options that need the token log-probs before the loss
(`FusedDPOTrainer.linear_dpo_fallback` says which) take `linear_sequence_logprobs` + `dpo_loss`,
and `fused_lm_head=False` the model's logits and the logits-path op. The TRL options it does not
cover raise at construction instead of training differently.
"""

from __future__ import annotations

from typing import Any

import torch

from ..batches import PreferenceBatch, model_inputs, preference_batch
from ..common import LOSSES
from ..forward import model_logprobs, reference_logprobs
from ..fused_head import DPOHead
from ..losses import dpo_loss, make_spec
from ._siblings import fused_head_refusals, reference_pass, refuse

SUPPORTED_TRL = (
    "1.16",
    "1.17",
)  # [min, max): the versions this subclass was written and tested for


def check_trl_version() -> str:
    """The installed TRL version, or an ImportError saying which versions are supported."""
    from packaging.version import Version

    try:
        import trl
    except ImportError as exc:
        raise ImportError(
            "dpo_kernels.integrations.trl needs TRL: pip install 'dpo-kernels[trl]'"
        ) from exc
    lo, hi = (Version(v) for v in SUPPORTED_TRL)
    if not lo <= Version(trl.__version__) < hi:
        raise ImportError(
            f"dpo_kernels.integrations.trl supports trl>={lo},<{hi}; found trl {trl.__version__}. "
            f"Install a supported version (pip install 'trl>={lo},<{hi}') or use stock TRL."
        )
    return trl.__version__


check_trl_version()

from trl import DPOTrainer  # noqa: E402


def _ld_weighted(tok: torch.Tensor, completion: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO sums: full weight on the first min(len_chosen, len_rejected) completion tokens of a
    pair, ld_alpha on the longer one's tail. tok, completion: [2P, L-1] (shifted)."""
    pos = completion.cumsum(1)
    lens = completion.sum(1)
    shared = torch.minimum(*lens.chunk(2)).repeat(2).unsqueeze(1)
    return (tok * ((pos > 0) & (pos <= shared))).sum(1) + ld_alpha * (tok * (pos > shared)).sum(1)


class FusedDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` with the log-probs and the loss computed by dpo_kernels."""

    def __init__(
        self, *args, backend: str | None = None, fused_lm_head: bool = True, **kwargs
    ) -> None:
        # Set before TRL's __init__: it may precompute reference log-probs.
        self._kernel_options = {"backend": backend, "fused_lm_head": fused_lm_head}
        # padding_free=True: stock TRL 1.16 warns and sets self.padding_free = False (it trains on
        # padded batches); so do we, through its __init__.
        super().__init__(*args, **kwargs)
        if self.use_weighting and "sft" in self.loss_types:
            # Stock TRL 1.16 fails on its first step here (it multiplies the expanded sft loss in
            # place), so there are no stock numbers to match.
            raise NotImplementedError(
                "use_weighting=True with loss_type 'sft' fails in trl.DPOTrainer 1.16 at the "
                "first step, so FusedDPOTrainer does not define it either: remove 'sft' from "
                "loss_type or set use_weighting=False"
            )
        # The sft term is kept apart from the pair losses: it averages the unweighted (not LD)
        # token log-probs over the scored (shifted) chosen tokens, while ipo and sigmoid_norm
        # divide by the unshifted completion lengths, as in TRL.
        self._full_spec = make_spec(
            beta=self.beta,
            loss_type=list(self.loss_types),
            loss_weights=list(self.loss_weights),
            label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.args.discopop_tau,
        )
        self._loss_spec = self._full_spec.split({"sft"})[0]  # None: sft alone
        self._sft_weight = sum(
            w for t, w in zip(self.loss_types, self.loss_weights, strict=True) if t == "sft"
        )
        self._sft_spec = make_spec(beta=self.beta, loss_type="sft")
        self.linear_dpo_fallback = self._linear_dpo_fallback()
        refuse(self, fused_head_refusals(self, fused_lm_head))

    def _linear_dpo_fallback(self) -> str | None:  # TRL's __init__ may call it (precompute)
        """None when the loss goes fused into the LM head call (`linear_dpo`: 3 matmuls, the
        default); else why it takes log-probs (`linear_sequence_logprobs`) + `dpo_loss`."""
        if not self._kernel_options["fused_lm_head"]:
            return "fused_lm_head=False: the model's logits and the logits-path op"
        if self.use_weighting:
            return "use_weighting: WPO's pair weights need the policy's token log-probs first"
        if self.ld_alpha is not None:
            return "ld_alpha: LD-DPO weights tokens inside the sums"
        normalized = {t for t in self.loss_types if LOSSES[t].argument == "normalized"}
        if "sft" in self.loss_types and normalized:
            return "sft with ipo/sigmoid_norm: TRL divides them by two different token counts"
        return None

    # -- log-probs ---------------------------------------------------------------------------

    def _sums(self, out, b: PreferenceBatch) -> torch.Tensor:
        if self.ld_alpha is None:
            return out.logps
        return _ld_weighted(out.token_logps, b.completion_mask[:, 1:], self.ld_alpha)

    def _reference_sums(self, inputs, b: PreferenceBatch, model_kwargs: dict[str, Any]) -> tuple:
        """(ref chosen, ref rejected) sums [P]: precomputed (in the batch), or computed now."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        ref = self.model if self.ref_model is None else self.ref_model
        return self._reference_pass(ref, b, model_kwargs)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (TRL calls this to precompute them)."""
        with self.accelerator.autocast():
            return self._reference_pass(model, preference_batch(inputs), model_inputs(inputs))

    def _reference_pass(self, model, b: PreferenceBatch, model_kwargs: dict[str, Any]) -> tuple:
        """(ref chosen, ref rejected) sums of `model` on `b`, in `reference_pass`; on the linear
        DPO route from `linear_dpo`'s own pass (`reference_logprobs`)."""
        linear = self._linear_dpo_fallback() is None
        with reference_pass(self):
            out = reference_logprobs(model, b, linear_dpo=linear, model_kwargs=model_kwargs,
                                     **self._kernel_options)  # fmt: skip
        return self._sums(out, b).chunk(2)

    # -- loss and metrics --------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        b = preference_batch(inputs)
        kwargs = model_inputs(inputs)
        if self._linear_dpo_fallback() is None:
            return self._fused_loss(model, inputs, b, kwargs, mode, return_outputs)
        # MoE: the router load-balancing loss of the same forward, weighted as stock TRL does.
        head = model_logprobs(
            model, b, stats=True, router_aux=self.aux_loss_enabled, model_kwargs=kwargs,
            **self._kernel_options,
        )  # fmt: skip
        out = head.logprobs
        chosen, rejected = self._sums(out, b).chunk(2)
        ref_chosen, ref_rejected = self._reference_sums(inputs, b, kwargs)
        weights = self._wpo_weights(out, b) if self.use_weighting else None
        backend = self._kernel_options["backend"]
        loss = chosen.new_zeros(())
        if self._loss_spec is not None:
            # ipo / sigmoid_norm divide by the completion lengths (TRL counts the unshifted mask).
            counts = b.completion_mask.sum(1).chunk(2)
            loss = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, chosen_counts=counts[0],
                rejected_counts=counts[1], spec=self._loss_spec, backend=backend, weights=weights,
            ).loss  # fmt: skip
        if self._sft_weight:
            # TRL's sft: minus the mean log-prob of the scored chosen tokens (shifted mask; not
            # LD-weighted), expanded to every pair (so WPO scales it by the mean pair weight).
            P = chosen.shape[0]
            sft = dpo_loss(
                out.logps[:P], rejected, chosen_counts=out.counts[:P],
                rejected_counts=out.counts[P:], spec=self._sft_spec, backend=backend,
                weights=weights,
            ).loss  # fmt: skip
            loss = loss + self._sft_weight * sft
        return self._finish(model, mode, b, kwargs, out, loss, head.aux_loss, chosen, rejected,
                            ref_chosen, ref_rejected, return_outputs)  # fmt: skip

    def _fused_loss(self, model, inputs, b, kwargs, mode, return_outputs):
        """The default route: the reference sums first (no gradient), then ONE policy forward
        whose LM head call computes the whole loss with `linear_dpo` (3 matmuls; the head's and
        the hidden states' gradients made during the forward) and the logged token statistics."""
        ref_chosen, ref_rejected = self._reference_sums(inputs, b, kwargs)
        # ipo / sigmoid_norm divide by the unshifted completion lengths (TRL); sft by the scored
        # tokens, the op's own counts (both together take the other route).
        counts = (None, None)
        if "sft" not in self.loss_types:
            counts = b.completion_mask.sum(1).chunk(2)
        head = DPOHead(self._full_spec, ref_chosen, ref_rejected, *counts)
        res = model_logprobs(
            model, b, stats=True, router_aux=self.aux_loss_enabled, model_kwargs=kwargs,
            dpo=head, **self._kernel_options,
        )  # fmt: skip
        chosen, rejected = res.logprobs.logps.chunk(2)
        return self._finish(model, mode, b, kwargs, res.logprobs, res.loss.loss, res.aux_loss,
                            chosen, rejected, ref_chosen, ref_rejected, return_outputs)  # fmt: skip

    def _finish(self, model, mode, b, kwargs, out, loss, aux_loss, chosen, rejected, ref_chosen,
                ref_rejected, return_outputs):  # fmt: skip
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item()
            )
        self._log_metrics(mode, b, out, chosen, rejected, ref_chosen, ref_rejected)
        if return_outputs:  # as TRL: logits for compute_metrics come from an extra forward
            with torch.no_grad():  # (with the batch's other model inputs: pixel_values, ...)
                return loss, model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                   **kwargs)  # fmt: skip
        return loss

    @staticmethod
    def _wpo_weights(out, b: PreferenceBatch) -> torch.Tensor:
        """WPO's pair weights (TRL's use_weighting): exp of each completion's mean over its scored
        tokens of log p(label) - log sum_v p_v^2, chosen times rejected; no gradient."""
        with torch.no_grad():
            mask = b.completion_mask[:, 1:]
            aligned = (out.token_logps - out.stats.log_sum_sq) * mask
            w = torch.exp(aligned.sum(1) / mask.sum(1).clamp_min(1))
            chosen_w, rejected_w = w.chunk(2)
            return chosen_w * rejected_w

    def _log_metrics(self, mode, b, out, chosen, rejected, ref_chosen, ref_rejected) -> None:
        acc = self.accelerator
        metrics = self._metrics[mode]
        mask = b.completion_mask[:, 1:] != 0
        stats = out.stats

        def ratio(num, den) -> float:
            num, den = acc.gather_for_metrics(num).sum(), acc.gather_for_metrics(den).sum()
            return (num / den).item() if den > 0 else 0.0

        metrics["entropy"].append(ratio((stats.entropy * mask).sum(), mask.sum()))
        if mode == "train":
            tokens = acc.gather_for_metrics(b.attention_mask.sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        c_mask, r_mask = mask.chunk(2)
        c_mean, r_mean = stats.mean_logits.chunk(2)
        metrics["logits/chosen"].append(ratio(c_mean[c_mask].sum(), c_mask.sum()))
        metrics["logits/rejected"].append(ratio(r_mean[r_mask].sum(), r_mask.sum()))
        c_top1 = stats.is_top1.chunk(2)[0] & c_mask
        metrics["mean_token_accuracy"].append(ratio(c_top1.sum(), c_mask.sum()))
        cr = self.beta * (chosen.detach() - ref_chosen.detach())
        rr = self.beta * (rejected.detach() - ref_rejected.detach())
        metrics["rewards/chosen"].append(acc.gather(cr).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rr).mean().item())
        metrics["rewards/accuracies"].append(acc.gather((cr > rr).float()).mean().item())
        metrics["rewards/margins"].append(acc.gather(cr - rr).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected.detach()).mean().item())
