"""dpo-kernels: fused log-prob kernels and a drop-in DPO loss.

One import line: ``import dpo_kernels`` and call ``dpo_kernels.sequence_logprobs`` (from logits)
or ``dpo_kernels.linear_sequence_logprobs`` (from hidden states and the LM head, no logits).
"""

from .functional import (
    PairLogprobs,
    SequenceLogprobs,
    cpu_extension_available,
    linear_sequence_logprobs,
    resolve_backend,
    sequence_logprobs,
)

__version__ = "0.1.0"

__all__ = [
    "PairLogprobs",
    "SequenceLogprobs",
    "cpu_extension_available",
    "linear_sequence_logprobs",
    "resolve_backend",
    "sequence_logprobs",
]
