#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv in .venv, torch only if missing, the package
# (and its C++ CPU kernels) in editable mode with the test and benchmark extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# torch to install when the venv has none: the CPU build pinned here; set TORCH_SPEC for CUDA.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "$TORCH_SPEC"
# Whatever torch is there stays: no extra (the benchmark peers depend on torch) may replace it.
$PY -c "import torch; print(f'torch=={torch.__version__}')" > .venv/torch-constraint.txt
export PIP_CONSTRAINT="$PWD/.venv/torch-constraint.txt"
$PY -m pip install -q "setuptools>=77" wheel ninja
# --no-build-isolation: build against the torch installed above instead of fetching another one.
$PY -m pip install -q --no-build-isolation -e ".[test,bench]"
