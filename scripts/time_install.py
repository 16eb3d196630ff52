"""Times the install path that BENCHMARKS.md reports ("Install and first use").

    python scripts/time_install.py [--skip-setup | --setup-only]

In a temporary folder: builds the wheel (`python -m build --wheel`, isolated, as pip does); makes a
venv that already has torch and the other dependencies (not timed); times `pip install` of the
wheel and of the checkout into it; times the first CPU call of a fresh process with a cold kernel
cache and a later process with a warm one; then times `scripts/setup.sh` on a fresh clone with a
cold kernel cache. Prints each time with the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIRST_CALL = """
import time
t0 = time.perf_counter()
import torch, dpo_kernels
from dpo_kernels import _build
t1 = time.perf_counter()
z, y = torch.randn(2, 8, 64), torch.randint(0, 64, (2, 8))
assert dpo_kernels.cpu_extension_available(), _build.load_error()  # compiles or loads the kernels
t2 = time.perf_counter()
dpo_kernels.sequence_logprobs(z, y)
t3 = time.perf_counter()
print(f"import {t1 - t0:.2f} s, kernels compiled or loaded {t2 - t1:.3f} s, "
      f"then the op's first call {t3 - t2:.2f} s ({torch.ops.dpo_kernels_cpu.build_info()})")
"""


def run(label: str, cmd: list, **kw) -> subprocess.CompletedProcess:
    """Runs `cmd`; prints its wall time, the CPU time of it and its children (what an idle machine
    would need at most, one core) and the 1-minute load average before and after."""
    before = os.getloadavg()[0]
    start, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    took, cpu1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    if proc.returncode:
        sys.exit(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    after = os.getloadavg()[0]
    print(f"{label:<46} {took:6.1f} s wall {cpu:6.1f} s CPU (load {before:.1f} -> {after:.1f})")
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith(("import ", "dpo_kernels:")):
            print(f"    {line}")
    sys.stdout.flush()
    return proc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-setup", action="store_true", help="skip setup.sh on a fresh clone")
    p.add_argument("--setup-only", action="store_true", help="only setup.sh on a fresh clone")
    a = p.parse_args()

    import torch

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or ''} "
        f"{os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="dpo_kernels_install_"))
    try:
        if not a.setup_only:
            wheel_and_first_call(tmp)
        if not a.skip_setup:
            setup_on_a_fresh_clone(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["DPO_KERNELS_CACHE_DIR"] = str(cache)
    return env


def wheel_and_first_call(tmp: Path) -> None:
    """The wheel, pip install of it and of the checkout, then a cold and a warm first call."""
    import torch

    run("python -m build --wheel (isolated)", [
        sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp / "dist"), str(ROOT)
    ])  # fmt: skip
    (wheel,) = (tmp / "dist").glob("*.whl")
    venv.create(tmp / "venv", with_pip=True)
    py = str(tmp / "venv" / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q"]
    deps = [f"torch=={torch.__version__.split('+')[0]}", "ninja"]
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        deps.append("triton")
    run("(not a target) venv with torch, ninja, triton", [*pip, *deps])
    run("pip install <wheel> (dependencies present)", [*pip, str(wheel)])
    run("pip uninstall", [py, "-m", "pip", "uninstall", "-y", "-q", "dpo-kernels"])
    run("pip install <checkout> (isolated build)", [*pip, str(ROOT)])
    env = _env(tmp / "cache")
    run("first CPU call, cold cache (new process)", [py, "-c", FIRST_CALL], env=env, cwd=tmp)
    run("first CPU call, warm cache (new process)", [py, "-c", FIRST_CALL], env=env, cwd=tmp)


def setup_on_a_fresh_clone(tmp: Path) -> None:
    """The README's set-up on a fresh clone with a cold kernel cache, then a first CPU call."""
    clone = tmp / "clone"
    run("git clone", ["git", "clone", "-q", str(ROOT), str(clone)])
    env = _env(tmp / "cache-setup")
    run("./scripts/setup.sh on the clone, cold cache", ["./scripts/setup.sh"], cwd=clone, env=env)
    python = str(clone / ".venv" / "bin" / "python")
    run("first CPU call after setup.sh (new process)", [python, "-c", FIRST_CALL], env=env, cwd=tmp)


if __name__ == "__main__":
    main()
