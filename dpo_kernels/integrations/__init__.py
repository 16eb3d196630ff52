"""Adapters for the trainers people already use: `trl` (DPOTrainer), `hf` (transformers.Trainer).

Each is imported on demand (``from dpo_kernels.integrations.trl import FusedDPOTrainer``), so the
package does not need TRL or transformers installed.
"""
