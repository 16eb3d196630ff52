"""dpo-kernels: fused log-prob kernels and a drop-in DPO loss.

One import line: ``import dpo_kernels`` and call ``dpo_kernels.sequence_logprobs`` (from logits)
or ``dpo_kernels.linear_sequence_logprobs`` (from hidden states and the LM head, no logits).
"""

from .functional import (
    PairLogprobs,
    SequenceLogprobs,
    TokenStats,
    cpu_extension_available,
    linear_sequence_logprobs,
    resolve_backend,
    sequence_logprobs,
    set_sync_free,
)
from .losses import DPOLoss, DPOLossOutput, dpo_loss, make_spec

__version__ = "0.1.0"

__all__ = [
    "DPOLoss",
    "DPOLossOutput",
    "PairLogprobs",
    "SequenceLogprobs",
    "TokenStats",
    "cpu_extension_available",
    "dpo_loss",
    "linear_sequence_logprobs",
    "make_spec",
    "resolve_backend",
    "sequence_logprobs",
    "set_sync_free",
]
