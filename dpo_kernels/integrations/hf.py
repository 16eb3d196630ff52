"""DPO with the plain Hugging Face `Trainer`: a `compute_loss` on the fused forward and loss.

    trainer = DPOLossTrainer(model=model, ref_model=ref, loss=DPOLoss(beta=0.1), args=args,
                             train_dataset=ds)

Rows of `train_dataset` are token-id examples {prompt_ids, chosen_ids, rejected_ids}, which
`collate_preferences` (the default collator here, as TRL's DPOTrainer defaults to its own) turns
into a concatenated batch; with remove_unused_columns (the default) the Trainer keeps those
columns and the other preference keys (`batches.PREFERENCE_COLUMNS`) beside the model's inputs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer, default_data_collator

from ..batches import PREFERENCE_COLUMNS, PreferenceBatch, collate_preferences, model_inputs
from ..forward import concatenated_dpo_loss
from ..losses import DPOLoss


class DPOLossTrainer(Trainer):
    """`transformers.Trainer` whose loss is the fused DPO loss of one concatenated forward."""

    def __init__(
        self,
        *args,
        ref_model: torch.nn.Module | None = None,
        loss: DPOLoss | None = None,
        fused_lm_head: bool | None = None,
        **kwargs,
    ) -> None:
        """fused_lm_head: compute the loss from the backbone's hidden states and the LM head
        inside the model's forward, without building the logits: the DPO loss fused into the head
        call (`linear_dpo`, 3 matmuls; works under DDP, FSDP and DeepSpeed: see
        `dpo_kernels.fused_head.install_fused_head`). None (default): on when the model has an LM
        head that is a plain `nn.Linear` (not a LoRA adapter on it, or a head class with its own
        forward) and no prompt-learning PEFT adapter; False: the model's logits and the
        logits-path op. Without a `data_collator`, token-id examples are collated by
        `collate_preferences`, padded with the `processing_class`'s pad (or eos) token id."""
        if len(args) < 3 and kwargs.get("data_collator") is None:
            pad = _pad_token_id(kwargs.get("processing_class"))
            kwargs["data_collator"] = _PreferenceCollator(pad)
        super().__init__(*args, **kwargs)
        # compute_loss returns a mean over the micro-batch's pairs, not a sum normalized by
        # num_items_in_batch: the Trainer must divide it by the accumulation steps, as for TRL's
        # trainers (it would skip that for a batch with `labels` and a model taking **kwargs).
        self.model_accepts_loss_kwargs = False
        if self.compute_loss_func is not None:
            raise ValueError(
                "DPOLossTrainer's loss is the DPO loss given by `loss=` (a DPOLoss), so "
                "compute_loss_func would never be called; drop it and pass loss=DPOLoss(...)"
            )
        trl_config = next(
            (c for c in type(self.args).__mro__ if c.__module__.split(".")[0] == "trl"), None
        )
        if trl_config is not None:  # a DPOConfig (or a subclass, or another TRL config)
            raise TypeError(
                f"DPOLossTrainer was given args={type(self.args).__name__}, a TRL "
                f"{trl_config.__name__}, whose own fields (a DPOConfig's beta, loss_type, "
                "max_length, ...) it would ignore: its loss is `loss=DPOLoss(...)` and its "
                "batches come as collated; pass transformers.TrainingArguments and "
                "loss=DPOLoss(beta=..., loss_type=...), or use FusedDPOTrainer (TRL's "
                "DPOTrainer), which honours a DPOConfig"
            )
        if self.compute_metrics is not None:
            raise ValueError(
                "DPOLossTrainer's evaluation returns the DPO loss and metrics (eval_loss, "
                "eval_rewards/*), no predictions, so compute_metrics would never be called; drop "
                "it, or use FusedDPOTrainer (TRL), whose compute_metrics gets the model's logits"
            )
        if fused_lm_head is None:
            from ..fused_head import fused_head_supported

            fused_lm_head = fused_head_supported(self.model)
        self.fused_lm_head = fused_lm_head
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)
        self.dpo = loss if loss is not None else DPOLoss()
        # DPO metrics since the last log, of training and of evaluation steps
        self._dpo_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _set_signature_columns_if_needed(self) -> None:
        """The columns remove_unused_columns keeps: the model's inputs and the preference keys."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += sorted(PREFERENCE_COLUMNS - set(self._signature_columns))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(inputs, PreferenceBatch):
            sums = inputs.ref_chosen_logps
        else:
            sums = inputs.get("ref_chosen_logps")
        if self.ref_model is not None and sums is not None:
            raise ValueError(
                "DPOLossTrainer was given a ref_model and batches that carry precomputed "
                "ref_chosen_logps / ref_rejected_logps: one reference is to be used; drop "
                "ref_model to use the batch's sums, or drop those columns from the dataset"
            )
        res, _ = concatenated_dpo_loss(
            model, inputs, self.dpo.spec, ref_model=self.ref_model,
            fused_lm_head=self.fused_lm_head, backend=self.dpo.backend,
            model_kwargs=model_inputs(inputs),
        )  # fmt: skip
        # Each metric is a mean over this process's pairs: averaged over the processes (equal
        # batches), as the Trainer logs its loss and TRL its DPO metrics; one gather for all.
        names = list(res.metrics)
        local = torch.stack([res.metrics[k].detach().float() for k in names])
        means = self.accelerator.gather(local[None]).mean(0).tolist()
        for k, v in zip(names, means, strict=True):
            self._dpo_metrics["train" if model.training else "eval"][k].append(v)
        return (res.loss, res) if return_outputs else res.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the batch's DPO loss (no logits or labels: a preference batch has none,
        and the base Trainer would only run the model on it)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _pop_means(self, mode: str, prefix: str = "") -> dict[str, float]:
        """The DPO metrics of `mode` ("train" / "eval") since they were last taken, averaged, and
        the queue emptied."""
        metrics = self._dpo_metrics[mode]
        means = {prefix + k: sum(v) / len(v) for k, v in metrics.items()}
        metrics.clear()
        return means

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        """evaluate() and predict(): the DPO metrics of the loop's batches, averaged, join its
        metrics under its prefix (eval_rewards/margins; eval_a_... for a dict of eval datasets;
        test_... from predict)."""
        self._dpo_metrics["eval"].clear()
        out = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        out.metrics.update(self._pop_means("eval", f"{metric_key_prefix}_"))
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """A training log (one with "loss") gets the DPO metrics (rewards/*, logps/*) averaged over
        the training steps since the last one."""
        if "loss" in logs:
            logs.update(self._pop_means("train"))
        super().log(logs, start_time)


def _pad_token_id(processing_class) -> int:
    """The pad token id of a tokenizer (or a processor's), else its eos token id (Llama's have no
    pad token: padded positions are never attended or scored), else 0."""
    tok = getattr(processing_class, "tokenizer", processing_class)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if isinstance(value, int):
            return value
    return 0


class _PreferenceCollator:
    """DPOLossTrainer's default collator: token-id examples {prompt_ids, chosen_ids,
    rejected_ids} by `collate_preferences`; examples of any other layout (separate chosen_ /
    rejected_ halves already padded, say) by the Trainer's own default."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Any]:
        if examples and isinstance(examples[0], Mapping) and "prompt_ids" in examples[0]:
            return collate_preferences(examples, self.pad_token_id)
        return default_data_collator(examples)
