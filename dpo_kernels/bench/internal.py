"""The benchmark's only reach past the public API (`import dpo_kernels`): the preference-batch
helpers of `dpo_kernels.batches` and `dpo_kernels.forward`. After a rename inside the package, fix
it here."""

from ..batches import collate_preferences
from ..forward import concatenated_forward

__all__ = ["collate_preferences", "concatenated_forward"]
