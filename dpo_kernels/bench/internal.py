"""The benchmark's only reach past the public API (`import dpo_kernels`): the preference-batch
helpers of `dpo_kernels.forward`. After a rename inside the package, fix it here."""

from ..forward import collate_preferences, concatenated_forward

__all__ = ["collate_preferences", "concatenated_forward"]
