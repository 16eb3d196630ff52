#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv in .venv, torch only if missing, the package in
# editable mode with the test and benchmark extras and, meanwhile, its C++ CPU kernels compiled
# once into the user's cache (a no-op when this torch, CPU and csrc/ were built before).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# torch to install when the venv has none: the CPU build pinned here; set TORCH_SPEC for CUDA.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
# --no-compile: no .pyc for the thousands of modules never imported (two thirds of the CPU time of
# installing torch here); Python writes those it imports on first import.
PIP=($PY -m pip install -q --no-compile)
$PY -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_SPEC"
# Whatever torch is there stays: no extra (the benchmark peers depend on torch) may replace it.
$PY -c "import torch; print(f'torch=={torch.__version__}')" > .venv/torch-constraint.txt
export PIP_CONSTRAINT="$PWD/.venv/torch-constraint.txt"
"${PIP[@]}" "setuptools>=77" ninja
# The C++ CPU kernels compile into the user's cache (one core; a no-op if built before) while pip
# installs the rest, so that neither the tests nor the first CPU call wait for them.
$PY -m dpo_kernels build &
BUILD=$!
# Nothing is compiled at install time; --no-build-isolation only skips making a build venv.
"${PIP[@]}" --no-build-isolation -e ".[test,bench]"
# A failure while pip replaced files under it is retried once. Without a compiler the package
# still works (CPU tensors on the plain-PyTorch reference): not fatal here.
wait $BUILD || .venv/bin/dpo-kernels build \
  || echo "setup.sh: no C++ CPU kernels; CPU tensors use the plain-PyTorch reference" >&2
