#!/usr/bin/env bash
# The one command for a machine with a CUDA GPU. Runs, in order (the open GPU target first: a
# lease of a few minutes may end before the rest):
#   1. benchmarks/linear_dpo_gpu.py: the fused linear DPO loss against its 3 GEMMs (issue 16's GPU
#      target) at several memory budgets, with a kernel profile, the step's host syncs and its idle
#      gaps (numbers also in gpu-linear-dpo.json);
#   2. the whole test suite on CUDA tensors (compiled Triton kernels, no interpreter;
#      DPO_KERNELS_TEST_DEVICE=cuda, see tests/conftest.py), log in gpu-tests.log;
#   3. the device-guard test with tensors on cuda:1 while cuda:0 is current, when two GPUs exist;
#   4. `dpo-kernels bench --device cuda`, whose table goes into BENCHMARKS.md under a heading that
#      names the GPU (an earlier section for the same GPU is replaced).
# Exits non-zero if any step failed; every step runs regardless. Wheels in gpu-wheels/ (say, TRL
# and its pure-Python dependencies for a machine without them, fetched elsewhere with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d gpu-wheels trl==1.16.0 datasets dill multiprocess xxhash
# ) are installed into a temporary folder first, put on PYTHONPATH; nothing else is installed.
# Usage: scripts/gpu.sh [extra bench args, e.g. --quick]   (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)
unset TRITON_INTERPRET
export DPO_KERNELS_TEST_DEVICE=cuda PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G "gpu-wheels/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --target "$site" gpu-wheels/*.whl \
    || echo "== gpu-wheels: install failed, going on without them"
  export PYTHONPATH=$PYTHONPATH:$site
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
# What the optional tests and bench rows need, and what this machine lacks (those skip)
"$PY" - <<'PYEOF'
import importlib.util as u
mods = ["trl", "transformers", "datasets", "accelerate", "liger_kernel", "cut_cross_entropy",
        "xdist", "pytest_timeout"]
print("== optional packages missing:", ", ".join(m for m in mods if u.find_spec(m) is None) or "none")
PYEOF
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
echo "== $GPU x$NGPU"
status=0

echo "== 1/4 benchmarks/linear_dpo_gpu.py"
"$PY" benchmarks/linear_dpo_gpu.py --budgets 2,4,8 --json gpu-linear-dpo.json || status=1

echo "== 2/4 test suite on CUDA tensors"
# pytest-xdist and pytest-timeout when installed: one worker per 2 cores (at most 12), a hung
# test ends after 150 s instead of the lease
par=()
"$PY" -c "import xdist" 2>/dev/null && par+=(-n "$(( $(nproc) / 2 > 12 ? 12 : $(nproc) / 2 ))")
"$PY" -c "import pytest_timeout" 2>/dev/null && par+=(--timeout 150)
"$PY" -m pytest -q -p no:cacheprovider -rs ${par[@]+"${par[@]}"} 2>&1 | tee gpu-tests.log
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "$NGPU" -ge 2 ]; then
  echo "== 3/4 two GPUs: tensors on cuda:1, cuda:0 current"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ready.py -k second_gpu || status=1
else
  echo "== 3/4 skipped: one GPU"
fi

echo "== 4/4 dpo-kernels bench --device cuda $*"
json=$(mktemp --suffix=.json)
unset DPO_KERNELS_TEST_DEVICE
"$PY" -m dpo_kernels bench --device cuda --json "$json" "$@" || status=1
if [ -s "$json" ]; then
  "$PY" - "$json" "$GPU" <<'PYEOF' || status=1
import json, sys
from dpo_kernels import bench
data = json.load(open(sys.argv[1]))
rows = [bench.Row(**r) for r in data["rows"]]
bench.write_section("BENCHMARKS.md", bench.markdown_section(rows, data["facts"], f"CUDA: {sys.argv[2]}"))
print("BENCHMARKS.md: section 'CUDA:", sys.argv[2] + "' written")
PYEOF
fi
rm -f "$json"
exit $status
