"""dpo-kernels: fused log-prob kernels and a drop-in DPO loss.

One import line: ``import dpo_kernels`` and call ``dpo_kernels.sequence_logprobs`` (from logits)
or ``dpo_kernels.linear_sequence_logprobs`` (from hidden states and the LM head, no logits);
``dpo_kernels.linear_dpo_loss`` fuses the LM head with the DPO loss;
``dpo_kernels.concatenated_forward`` runs a model on a preference batch (chosen and rejected in
one forward) and returns the sums the losses take.
"""

from .backend import cpu_extension_available, resolve_backend, set_sync_free
from .batches import PreferenceBatch, collate_preferences, pack, preference_batch
from .common import PairLogprobs, SequenceLogprobs, TokenStats
from .forward import batch_logprobs, concatenated_dpo_loss, concatenated_forward
from .linear_dpo import linear_dpo_loss, linear_pair_loss
from .linear_logprobs import linear_sequence_logprobs
from .linear_preference_losses import (
    linear_cpo_loss,
    linear_kto_loss,
    linear_orpo_loss,
    linear_simpo_loss,
)
from .logprobs import sequence_logprobs
from .losses import DPOLoss, DPOLossOutput, dpo_loss, make_spec
from .preference_losses import (
    PreferenceLossOutput,
    cpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

__version__ = "0.1.0"

__all__ = [
    "DPOLoss",
    "DPOLossOutput",
    "PairLogprobs",
    "PreferenceBatch",
    "PreferenceLossOutput",
    "SequenceLogprobs",
    "TokenStats",
    "batch_logprobs",
    "collate_preferences",
    "concatenated_dpo_loss",
    "concatenated_forward",
    "cpo_loss",
    "cpu_extension_available",
    "dpo_loss",
    "kto_loss",
    "linear_cpo_loss",
    "linear_dpo_loss",
    "linear_kto_loss",
    "linear_orpo_loss",
    "linear_pair_loss",
    "linear_sequence_logprobs",
    "linear_simpo_loss",
    "make_spec",
    "orpo_loss",
    "pack",
    "preference_batch",
    "resolve_backend",
    "sequence_logprobs",
    "set_sync_free",
    "simpo_loss",
]
