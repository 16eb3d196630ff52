"""The backends: reference.py (plain PyTorch, the spec), cpu.py (csrc/ and the torch closed forms
of the DPO and sibling losses), triton.py (the Triton kernels, one fused op per triton_*.py file).
Each offers the same functions; no autograd here (see the public op modules and
dpo_kernels/backend.py)."""
