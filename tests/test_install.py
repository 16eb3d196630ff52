"""Packaging and the on-first-use build of the C++ CPU kernels.

The wheel is pure Python plus the C++ sources; installed into a fresh venv (no site packages of
ours) it compiles the kernels on the first CPU call, once even when two processes start together,
and later processes load them from the cache. Importing never compiles; CUDA never builds.
One wheel, one venv and one cold build serve every test of the module.
"""

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CAP = torch.backends.cpu.get_cpu_capability().upper()
VARIANT = "avx512" if CAP.startswith("AVX512") else "avx2" if CAP.startswith("AVX2") else "default"

# A CPU op through the installed package, checked against a float64 formula; the two cold
# processes meet at a file barrier first so that they reach the build at the same moment.
PROBE = """
import os, sys, time
import torch
import dpo_kernels
from dpo_kernels import _build

site, barrier, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert dpo_kernels.__file__.startswith(site), dpo_kernels.__file__
assert not _build.is_loaded(), "import loaded the kernels"
if barrier != "-":
    open(f"{barrier}.{seed}", "w").close()
    while len([f for f in os.listdir(os.path.dirname(barrier)) if f.startswith("ready.")]) < 2:
        time.sleep(0.01)
torch.manual_seed(seed)
z = torch.randn(3, 5, 37)
y = torch.randint(0, 37, (3, 5))
assert dpo_kernels.resolve_backend(None, z.device) == "cpu"
out = dpo_kernels.sequence_logprobs(z, y)
ref = z.double().log_softmax(-1).gather(-1, y[..., None])[..., 0].sum(-1)
torch.testing.assert_close(out.logps.double(), ref, rtol=1e-5, atol=1e-5)
print("BUILD_INFO", torch.ops.dpo_kernels_cpu.build_info())
"""


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Builds the wheel (isolated, as pip does), installs it with the pinned torch into a fresh
    venv, and runs two probes at once on a cold cache."""
    tmp = tmp_path_factory.mktemp("install")
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp / "dist"), str(ROOT)])
    (wheel,) = (tmp / "dist").glob("*.whl")
    venv.create(tmp / "venv", with_pip=True)
    py = tmp / "venv" / "bin" / "python"
    pins = [f"torch=={torch.__version__.split('+')[0]}", "ninja"]
    _run([py, "-m", "pip", "install", "-q", "--no-compile", *pins])  # no .pyc: 2/3 of its CPU
    # --no-deps: the dependencies are installed above; triton (CUDA only) would be 250 MB here.
    _run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DPO_KERNELS_BACKEND")}
    env["DPO_KERNELS_CACHE_DIR"] = str(tmp / "cache")
    (tmp / "sync").mkdir()
    barrier = str(tmp / "sync" / "ready")
    procs = [
        subprocess.Popen(
            [py, "-c", PROBE, site.stdout.strip(), barrier, str(seed)],
            cwd=tmp,  # not the checkout: the installed package is imported
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    cold = []
    for p in procs:
        out, err = p.communicate()
        cold.append((p.returncode, out, err))
    yield {
        "wheel": wheel,
        "py": py,
        "site": site.stdout.strip(),
        "env": env,
        "cwd": tmp,
        "cache": tmp / "cache",
        "cold": cold,
    }
    shutil.rmtree(tmp / "venv", ignore_errors=True)  # a torch install: about 1 GB


@pytest.mark.slow
def test_wheel_is_pure_python_with_the_cpp_sources(installed):
    (requires,) = [ln for ln in (ROOT / "pyproject.toml").open() if ln.startswith("requires =")]
    requires = requires.split("#")[0]
    assert "torch" not in requires and "ninja" not in requires, requires
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = wheel.namelist()
        tags = wheel.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert installed["wheel"].name.endswith("-py3-none-any.whl")
    assert "Root-Is-Purelib: true" in tags
    compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib", ".dll", ".o"))]
    assert not compiled, f"the wheel holds compiled code: {compiled}"
    sources = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h")}
    shipped = {n.split("/")[-1] for n in names if n.startswith("dpo_kernels/csrc/")}
    assert shipped == sources


@pytest.mark.slow
def test_two_cold_processes_build_once_and_both_run(installed):
    for rc, out, err in installed["cold"]:
        assert rc == 0, err[-4000:]
        assert f"BUILD_INFO {VARIANT.upper()}" in out
    compiled = [err for _, _, err in installed["cold"] if "dpo_kernels: compiling" in err]
    assert len(compiled) == 1, [err for _, _, err in installed["cold"]]
    waited = [err for _, _, err in installed["cold"] if "waiting for another process" in err]
    assert len(waited) == 1, [err for _, _, err in installed["cold"]]
    (entry,) = installed["cache"].iterdir()
    assert VARIANT in entry.name and torch.__version__ in entry.name
    assert sorted(p.name for p in entry.iterdir()) == [f"dpo_kernels_cpu_{VARIANT}.so", "lock"]


@pytest.mark.slow
def test_later_processes_load_from_the_cache(installed):
    (lib,) = installed["cache"].glob("*/*.so")
    built_at = lib.stat().st_mtime_ns
    kw = {"cwd": installed["cwd"], "env": installed["env"]}
    warm = _run([installed["py"], "-c", PROBE, installed["site"], "-", "3"], **kw)
    assert f"BUILD_INFO {VARIANT.upper()}" in warm.stdout
    assert "compiling" not in warm.stderr and "waiting" not in warm.stderr, warm.stderr
    cli = _run([installed["py"].parent / "dpo-kernels", "build"], **kw)
    assert f"{VARIANT}: {lib}" in cli.stdout and f"({VARIANT.upper()})" in cli.stdout
    assert "compiling" not in cli.stderr, cli.stderr
    assert lib.stat().st_mtime_ns == built_at


def test_import_and_cuda_tensors_never_build(tmp_path):
    code = (
        "import torch, dpo_kernels\n"
        "from dpo_kernels import _build\n"
        "assert dpo_kernels.resolve_backend(None, torch.device('cuda')) == 'triton'\n"
        "z = torch.randn(2, 3, 11)\n"
        "y = torch.randint(0, 11, (2, 3))\n"
        "dpo_kernels.sequence_logprobs(z, y, backend='reference')\n"
        "assert not _build.is_loaded()\n"
    )
    env = {**os.environ, "DPO_KERNELS_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    _run([sys.executable, "-c", code], env=env, cwd=ROOT)
    assert not (tmp_path / "cache").exists()
