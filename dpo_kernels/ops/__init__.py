"""Kernels and their launchers, one fused op per file; no autograd here (see functional.py)."""
