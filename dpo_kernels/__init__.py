"""dpo-kernels: fused log-prob kernels and a drop-in DPO loss.

One import line: ``import dpo_kernels`` and call ``dpo_kernels.sequence_logprobs`` (from logits)
or ``dpo_kernels.linear_sequence_logprobs`` (from hidden states and the LM head, no logits);
``dpo_kernels.linear_dpo_loss`` fuses the LM head with the DPO loss.
"""

from .backend import cpu_extension_available, resolve_backend, set_sync_free
from .common import PairLogprobs, SequenceLogprobs, TokenStats
from .linear_dpo import linear_dpo_loss
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
    "PreferenceLossOutput",
    "SequenceLogprobs",
    "TokenStats",
    "cpo_loss",
    "cpu_extension_available",
    "dpo_loss",
    "kto_loss",
    "linear_cpo_loss",
    "linear_dpo_loss",
    "linear_kto_loss",
    "linear_orpo_loss",
    "linear_sequence_logprobs",
    "linear_simpo_loss",
    "make_spec",
    "orpo_loss",
    "resolve_backend",
    "sequence_logprobs",
    "set_sync_free",
    "simpo_loss",
]
