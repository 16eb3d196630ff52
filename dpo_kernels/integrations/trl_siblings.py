"""Drop-ins for TRL's CPOTrainer (and SimPO / AlphaPO), ORPOTrainer and KTOTrainer.

    from dpo_kernels.integrations.trl_siblings import FusedCPOTrainer as CPOTrainer

Each class subclasses its TRL 1.16 trainer and replaces only the loss computation: by default
(`fused_lm_head=True`) the LM head runs inside the model's forward as `linear_sequence_logprobs`
(as `FusedDPOTrainer` does, so DDP, FSDP and DeepSpeed work) and the logits are never built;
`fused_lm_head=False` sends the model's logits to `sequence_logprobs`. Either op is the fused
log-softmax + gather + masked sum (for KTO, with the entropy / mean-logit statistics in the same
pass); the loss is the closed-form one from `dpo_kernels.preference_losses`. `FusedCPOTrainer`
with the fused head computes its loss inside the head call instead (`linear_cpo_loss`: 3 matmuls,
the head's and hidden states' gradients made in the forward); `linear_loss_fallback` names the
configurations that keep the log-probs route (ORPO always: its NLL covers the prompt tokens).
Arguments, numbers and logged metrics are TRL's. Options these subclasses do not cover raise at
construction, naming the option. `FusedKTOTrainer` lives in `trl_kto` and is re-exported here.
"""

from __future__ import annotations

from typing import Any, Literal

from ..linear_preference_losses import _linear_cpo
from ..preference_losses import CPO_AVERAGED, cpo_loss, orpo_loss
from ._siblings import _ONE, PairedMixin
from .trl import check_trl_version

check_trl_version()

from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from .trl_kto import FusedKTOTrainer  # noqa: E402

__all__ = ["FusedCPOTrainer", "FusedKTOTrainer", "FusedORPOTrainer"]


class FusedCPOTrainer(PairedMixin, CPOTrainer):
    """`trl.experimental.cpo.CPOTrainer` (CPO, SimPO, AlphaPO) with dpo_kernels' log-probs and
    fused loss. Extra keywords: backend (None = automatic), fused_lm_head."""

    def __init__(
        self, *args, backend: str | None = None, fused_lm_head: bool = True, **kwargs
    ) -> None:
        self._init_kernels(backend, fused_lm_head)
        super().__init__(*args, **kwargs)
        self._check_paired()
        cpo_loss(-_ONE, -_ONE, chosen_counts=_ONE, rejected_counts=_ONE, **self._loss_options())
        # None: the loss is fused into the LM head call (`linear_cpo_loss`, 3 matmuls); else why
        # it takes `linear_sequence_logprobs` / the logits + `cpo_loss`.
        self.linear_loss_fallback = (
            None if fused_lm_head else "fused_lm_head=False: the model's logits and cpo_loss"
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

    def _head_loss(self, hidden, weight, bias, labels, mask, transform):
        """The CPO loss inside the LM head call (`HeadCall.loss`): (its output, the log-probs)."""
        return _linear_cpo(
            hidden, weight, labels, bias=bias, mask=mask, **transform, **self._loss_options(),
            backend=self._backend,
        )  # fmt: skip

    def get_batch_loss_metrics(
        self, model, batch: dict[str, Any], train_eval: Literal["train", "eval"] = "train"
    ):
        """CPO loss and TRL's metrics for a batch (TRL's get_batch_loss_metrics, fused)."""
        fused = self.linear_loss_fallback is None
        loss = self._head_loss if fused else None
        _cb, P, mean, logps, counts, out = self._paired_forward(model, batch, loss=loss)
        if not fused:
            out = cpo_loss(
                logps[:P], logps[P:], chosen_counts=counts[:P], rejected_counts=counts[P:],
                **self._loss_options(), backend=self._backend,
            )  # fmt: skip
        # (averaged types: a completion truncated to nothing counts as one token, as in cpo_loss)
        averaged = self.loss_type in CPO_AVERAGED
        lp = (logps / counts.clamp(min=1) if averaged else logps).detach()
        # TRL's logits/*: the mean of every logit of the rows, all positions.
        metrics = self._log_paired(out, (lp[:P], lp[P:]), mean[:P], mean[P:], train_eval)
        return out.loss, metrics


class FusedORPOTrainer(PairedMixin, ORPOTrainer):
    """`trl.experimental.orpo.ORPOTrainer` with dpo_kernels' log-probs and fused loss. Extra
    keywords: backend (None = automatic), fused_lm_head."""

    def __init__(
        self, *args, backend: str | None = None, fused_lm_head: bool = True, **kwargs
    ) -> None:
        self._init_kernels(backend, fused_lm_head)
        super().__init__(*args, **kwargs)
        self._check_paired()
        # TRL's NLL covers the chosen prompt tokens, which linear_orpo_loss's counted tokens
        # (the completions of both rows) do not: always log-probs + orpo_loss.
        self.linear_loss_fallback = (
            "ORPO's NLL covers the chosen prompt tokens: linear_sequence_logprobs + orpo_loss"
            if fused_lm_head
            else "fused_lm_head=False: the model's logits and orpo_loss"
        )
        orpo_loss(-_ONE, -_ONE, chosen_counts=_ONE, rejected_counts=_ONE, beta=self.beta)

    def _pad_value(self) -> int:
        return self.padding_value

    def get_batch_loss_metrics(
        self, model, batch: dict[str, Any], train_eval: Literal["train", "eval"] = "train"
    ):
        """ORPO loss and TRL's metrics for a batch (TRL's get_batch_loss_metrics, fused)."""
        # TRL's NLL: every attended token of the chosen sequence (prompt and completion), scored
        # in the same pass as the completions.
        _cb, P, mean, logps, counts, whole = self._paired_forward(model, batch, whole_chosen=True)
        nll = -whole[0].sum() / whole[1].sum()
        out = orpo_loss(
            logps[:P], logps[P:], chosen_counts=counts[:P], rejected_counts=counts[P:],
            beta=self.beta, nll_loss=nll, backend=self._backend,
        )  # fmt: skip
        avg = (logps / counts).detach()
        metrics = self._log_paired(
            out, (avg[:P], avg[P:]), mean[:P, :-1], mean[P:, :-1], train_eval,
            extra_keys=("log_odds_ratio", "log_odds_chosen"),
        )  # fmt: skip
        return out.loss, metrics
