"""Compiles and loads the C++ CPU kernels (csrc/) for the torch and the CPU in use.

Nothing is compiled at install time: the wheel is pure Python plus the C++ sources (shipped as
dpo_kernels/csrc; a checkout uses csrc/ next to the package). The first call on CPU tensors (or
`dpo-kernels build`) compiles the one variant this CPU needs (AVX-512, AVX2 or default, from
torch.backends.cpu.get_cpu_capability()) with torch.utils.cpp_extension in a child process, and
keeps the library in a cache directory keyed by torch version, Python, CPU variant and a hash of the
sources and flags; later processes just load it. A file lock makes processes that start together
(torchrun) build once: the others wait for it. CUDA tensors never get here.

Without a compiler, or if the build fails, the package warns once and CPU tensors use the
plain-PyTorch reference. A failed build is remembered in its cache entry (so that every rank of a
job does not retry it); `dpo-kernels build` retries.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

# Compiler flags per CPU capability. CPU_CAPABILITY names the inline namespace of the vector code
# (csrc/vec_rows.h) and is what build_info() reports; CPU_CAPABILITY_<X> selects at::vec's
# vector width, as in PyTorch's own per-capability builds.
VARIANTS: dict[str, list[str]] = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "default": [],
}
CACHE_ENV = "DPO_KERNELS_CACHE_DIR"
# Bump when the way a library is built or named changes (it is part of the cache key).
SCHEME = 1

_HERE = Path(__file__).resolve().parent


class BuildError(RuntimeError):
    """The C++ CPU kernels could not be built here; the message says why and what to do."""


def variant_for_this_cpu() -> str:
    """The variant to build: the widest vector ISA that torch itself uses on this CPU."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    on_x86 = platform.machine().lower() in ("x86_64", "amd64")
    if on_x86 and cap.startswith("AVX512"):
        return "avx512"
    if on_x86 and cap.startswith("AVX2"):
        return "avx2"
    return "default"


def source_dir() -> Path | None:
    """The C++ sources: dpo_kernels/csrc in an installed wheel, csrc/ in a checkout."""
    for d in (_HERE / "csrc", _HERE.parent / "csrc"):
        if any(d.glob("*.cpp")):
            return d
    return None


def cache_root() -> Path:
    """$DPO_KERNELS_CACHE_DIR, else $XDG_CACHE_HOME/dpo_kernels, else ~/.cache/dpo_kernels."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "dpo_kernels"


def _flags(variant: str) -> tuple[list[str], list[str]]:
    cap = variant.upper()
    macros = [
        f"-DCPU_CAPABILITY={cap}",
        *([f"-DCPU_CAPABILITY_{cap}"] if VARIANTS[variant] else []),
    ]
    return ["-O3", "-fopenmp", *macros, *VARIANTS[variant]], ["-fopenmp"]


def _lib_name(variant: str) -> str:
    return f"dpo_kernels_cpu_{variant}"


def entry_dir(variant: str) -> Path:
    """The cache entry of `variant` for this torch, Python, machine and these sources."""
    src = source_dir()
    if src is None:
        raise BuildError(f"the C++ sources are missing (looked in {_HERE / 'csrc'})")
    h = hashlib.sha256()
    cflags, ldflags = _flags(variant)
    for part in (
        SCHEME,
        torch.__version__,
        torch.version.git_version,
        torch.compiled_with_cxx11_abi(),
        sys.version,
        platform.machine(),
        os.environ.get("CXX", "c++"),
        cflags,
        ldflags,
    ):
        h.update(repr(part).encode() + b"\0")
    for f in sorted([*src.glob("*.cpp"), *src.glob("*.h")]):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / f"{tag}-{platform.machine()}-{variant}-{h.hexdigest()[:16]}"


class _FileLock:
    """An exclusive lock on a file, released by the OS if the holder dies (fcntl; no-op where
    fcntl is missing, e.g. Windows). Says once on stderr when it has to wait."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _FileLock:
        self.file = open(self.path, "a")  # closed in __exit__
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux or macOS
            return self
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                "dpo_kernels: waiting for another process that is compiling the C++ CPU kernels",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()  # closing releases the lock


# Run in a child process, so that the build loads its library there, not here (one process can
# register the dpo_kernels_cpu namespace once only), and its output can be kept out of sight.
_CHILD = """
import json, sys
from torch.utils.cpp_extension import load
load(**json.loads(sys.argv[1]), is_python_module=False, verbose=True)
"""


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; install g++ or set CXX)"
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except ImportError:  # pragma: no cover
        return None
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _compile(variant: str, work: Path) -> tuple[Path | None, str]:
    """Compiles and links `variant` under `work`; returns (library or None, compiler output).

    First as one translation unit that includes every csrc/*.cpp: the ATen headers, most of the
    compile time, are then parsed once instead of once per file (about half the CPU time). If that
    fails (say two files define the same file-local name), file by file, as usual."""
    src = source_dir()
    assert src is not None
    cflags, ldflags = _flags(variant)
    cpps = sorted(src.glob("*.cpp"))
    unity = work / "unity" / f"{_lib_name(variant)}_all.cpp"
    unity.parent.mkdir(parents=True)
    unity.write_text("".join(f'#include "{p}"\n' for p in cpps))
    log = ""
    for sources, out in (([unity], unity.parent), (cpps, work / "files")):
        out.mkdir(parents=True, exist_ok=True)
        args = {
            "name": _lib_name(variant),
            "sources": [str(p) for p in sources],
            "extra_cflags": cflags,
            "extra_ldflags": ldflags,
            "build_directory": str(out),
        }
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log += proc.stdout
        lib = out / f"{_lib_name(variant)}.so"
        if proc.returncode == 0 and lib.exists():
            return lib, log
    return None, log


def build(variant: str | None = None, force: bool = False) -> Path:
    """Builds `variant` (default: this CPU's) into the cache unless it is there; returns the
    library's path. Raises BuildError, with the reason, if it cannot. `force` retries a build
    that failed before."""
    variant = variant or variant_for_this_cpu()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    entry = entry_dir(variant)
    lib = entry / f"{_lib_name(variant)}.so"
    if lib.exists():
        return lib
    missing = _compiler_missing()
    if missing:
        raise BuildError(missing)
    entry.mkdir(parents=True, exist_ok=True)
    failed = entry / "FAILED"
    with _FileLock(entry / "lock"):
        if lib.exists():  # another process built it while this one waited
            return lib
        if failed.exists() and not force:
            raise BuildError(failed.read_text())
        print(
            f"dpo_kernels: compiling the C++ CPU kernels ({variant}, torch {torch.__version__}) "
            f"once for this machine, about a minute; cache: {entry}",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        work = entry / "build"
        shutil.rmtree(work, ignore_errors=True)
        built, log = _compile(variant, work)
        if built is None:
            tail = "\n".join(log.strip().splitlines()[-25:])
            msg = f"compiling the {variant} kernels failed (log: {work / 'build.log'}):\n{tail}"
            (work / "build.log").write_text(log)
            failed.write_text(msg)
            raise BuildError(msg)
        tmp = entry / f"{lib.name}.tmp{os.getpid()}"
        shutil.copy2(built, tmp)
        os.replace(tmp, lib)  # atomic: a reader sees no library or a whole one
        failed.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)  # the objects: only the library is kept
        print(
            f"dpo_kernels: C++ CPU kernels ready ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return lib


_lock = threading.Lock()
_state: dict[str, object] = {}  # "variant" (str | None) and "error" (str | None) once loaded


def load() -> str | None:
    """Builds if needed and loads this CPU's variant into torch.ops.dpo_kernels_cpu, once per
    process. Returns the variant, or None (warning once) when the kernels are not available."""
    if "variant" in _state:
        return _state["variant"]  # type: ignore[return-value]
    with _lock:
        if "variant" in _state:
            return _state["variant"]  # type: ignore[return-value]
        variant, error = variant_for_this_cpu(), None
        try:
            torch.ops.load_library(str(build(variant)))
        except (BuildError, OSError) as exc:
            variant, error = None, str(exc)
            warnings.warn(
                f"dpo_kernels: the C++ CPU kernels are not available ({error}); CPU tensors use "
                "the slow plain-PyTorch reference. Fix the cause, then run `dpo-kernels build`.",
                stacklevel=4,
            )
        _state["error"] = error
        _state["variant"] = variant
        return variant


def load_error() -> str | None:
    """Why load() found no kernels (None if they loaded or load() has not run)."""
    return _state.get("error")  # type: ignore[return-value]


def is_loaded() -> bool:
    """Whether load() has run in this process (it never runs at import)."""
    return "variant" in _state
