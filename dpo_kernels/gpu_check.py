"""Compile every Triton kernel for A100 (sm_80) and H100 (sm_90) without a GPU, and read the result.

Each case calls a real launcher on small CPU tensors with the kernel swapped for a recorder, so the
arguments, launch configuration and Triton's own specialization (alignment, ==1 strides) are the
ones a real launch would use. The recorded launch is compiled with `triton.compile` for a
`GPUTarget`, and the cubin is read with the `cuobjdump` that triton ships: registers, local-memory
(spill) bytes, shared memory, and the widths of the global loads.

    python -m dpo_kernels.gpu_check [--json PATH]

Must run without TRITON_INTERPRET (the interpreter replaces the kernels at import).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

ARCHS = (80, 90)


@dataclass
class KernelReport:
    case: str
    kernel: str
    arch: int
    num_warps: int
    registers: int
    local_bytes: int  # spills / stack in local memory; must be 0
    shared_bytes: int
    global_loads: dict[str, int]  # SASS load opcode -> count, e.g. {"LDG.E.128": 4}
    global_stores: dict[str, int]  # SASS store opcode -> count, e.g. {"STG.E.128": 4}


class _Recorder:
    """Stands in for a JITFunction; remembers the launch instead of running it."""

    def __init__(self, fn):
        self.fn = fn
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


@contextlib.contextmanager
def _recording(module, names: list[str]) -> Iterator[dict[str, _Recorder]]:
    recorders = {n: _Recorder(getattr(module, n)) for n in names}
    try:
        for n, r in recorders.items():
            setattr(module, n, r)
        yield recorders
    finally:
        for n, r in recorders.items():
            setattr(module, n, r.fn)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_launch(fn, args: tuple, kwargs: dict, arch: int):
    """Compile one recorded launch of `fn` for sm_<arch>, exactly as Triton's runtime would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target, options.__dict__)


def read_cubin(cubin: bytes) -> tuple[int, int, int, dict[str, int], dict[str, int]]:
    """(registers, local bytes, shared bytes, {load opcode: n}, {store opcode: n}) via cuobjdump."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run(
            [_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True
        ).stdout

    def field(name: str) -> int:
        m = re.search(rf"\b{name}:(\d+)", res)
        return int(m.group(1)) if m else 0

    loads = collections.Counter(re.findall(r"\b(LDG\.E[.\w]*)", sass))
    stores = collections.Counter(re.findall(r"\b(STG\.E[.\w]*)", sass))
    return field("REG"), field("LOCAL") + field("STACK"), field("SHARED"), dict(loads), dict(stores)


# Llama 2, odd (tokenizer + 1 pad), GPT-2, Llama 3, Qwen 2.5: multiples of 16 and not.
VOCABS = (32000, 32001, 50257, 128256, 151665)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
QUICK_VOCABS = (32000, 32001)


def _tag(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _logprobs_cases() -> list[tuple[str, Callable[[], None], object, list[str]]]:
    from .ops import triton_logprobs as K

    def fwd(dtype, V, mask, ref, stats=False):
        def run():
            full = torch.empty(2, 9, V, dtype=dtype)  # never read: the kernel is not run
            labels = torch.randint(0, V, (2, 9))[:, 1:]
            m = torch.ones(2, 8, dtype=torch.bool) if mask else None
            r = full[:, 1:].clone() if ref else None
            K.logprobs_forward(full[:, :-1], labels, m, r, -100, stats)

        return run

    def bwd(dtype, V):
        def run():
            full = torch.empty(2, 9, V, dtype=dtype)
            labels = torch.randint(0, V, (2, 8))
            g = torch.randn(2).unsqueeze(1).expand(2, 8)  # what autograd passes for a .sum(-1)
            K.logprobs_backward(g, full[:, :-1], labels, None, torch.zeros(2, 8), -100)

        return run

    cases = []
    for dtype in DTYPES:
        for V in VOCABS:
            tag = f"{_tag(dtype)} V={V}"
            cases.append((f"logprobs_fwd {tag}", fwd(dtype, V, False, False)))
            cases.append((f"logprobs_fwd {tag} mask+ref", fwd(dtype, V, True, True)))
            cases.append((f"logprobs_fwd {tag} stats", fwd(dtype, V, True, False, True)))
            cases.append((f"logprobs_fwd {tag} stats+ref", fwd(dtype, V, True, True, True)))
            cases.append((f"logprobs_bwd {tag}", bwd(dtype, V)))
    names = ["_logprobs_fwd_kernel", "_logprobs_bwd_kernel"]
    return [(name, run, K, names) for name, run in cases]


def _dpo_loss_cases() -> list[tuple[str, Callable[[], None], object, list[str]]]:
    from .common import LOSS_TYPES, DPOLossSpec
    from .ops import triton_dpo_loss as K

    def run(types, fdiv):
        def go():
            x = [torch.randn(64) - 30 for _ in range(4)] + [torch.full((64,), 20.0)] * 2
            spec = DPOLossSpec(types, (1.0,) * len(types), 0.1, 0.1, fdiv)
            K.dpo_loss_and_grads(*x, spec)

        return go

    every = tuple(t for t in LOSS_TYPES if t in K.KERNEL_TYPES and t != "exo_pair")
    return [
        ("dpo_loss sigmoid", run(("sigmoid",), "reverse_kl"), K, ["_dpo_loss_kernel"]),
        ("dpo_loss all types", run(every, "reverse_kl"), K, ["_dpo_loss_kernel"]),
        ("dpo_loss ipo alpha-div", run(("ipo",), "alpha_divergence"), K, ["_dpo_loss_kernel"]),
    ]


def _sibling_loss_cases() -> list[tuple[str, Callable[[], None], object, list[str]]]:
    from .common import SiblingSpec
    from .ops import triton_sibling_losses as K

    def run(spec):
        def go():
            a, b = torch.randn(64) - 30, torch.randn(64) - 30
            n = torch.full((64,), 20.0) if spec.family != "kto" else (torch.rand(64) < 0.5) * 1.0
            K.sibling_loss_and_grads(spec, a, b, n, n, torch.zeros(()))

        return go

    specs = {
        "cpo sigmoid alpha nll": SiblingSpec("cpo", "sigmoid", 0.1, 0.1, alpha=0.2, cpo_alpha=1.0),
        "cpo ipo": SiblingSpec("cpo", "ipo", 0.1),
        "orpo": SiblingSpec("orpo", "orpo", 0.1),
        "kto": SiblingSpec("kto", "kto", 0.1),
    }
    return [(f"sibling_loss {k}", run(v), K, ["_sibling_loss_kernel"]) for k, v in specs.items()]


def _linear_cases() -> list[tuple[str, Callable[[], None], object, list[str]]]:
    from .common import LogitTransform
    from .ops import triton_linear_logprobs as K

    def fwd_bwd(dtype, V, softcap, stats=False):
        def run():
            # One token tile, every vocabulary block (the last one is V % VOCAB_BLOCK wide).
            M, H = 16, 16
            hidden = torch.randn(M, H).to(dtype)
            weight = torch.randn(V, H).to(dtype)
            targets = torch.randint(0, V, (M,))
            transform = LogitTransform(softcap=softcap)
            lse = K.linear_logprobs_forward(hidden, weight, None, targets, transform, stats)[1]
            g = torch.ones(M)
            K.linear_logprobs_backward(
                g, hidden, weight, None, targets, lse, transform, (True,) * 3
            )

        return run

    cases = []
    for dtype in DTYPES:
        for V in VOCABS:
            tag = f"linear {_tag(dtype)} V={V}"
            cases.append((tag, fwd_bwd(dtype, V, None)))
            cases.append((tag + " softcap", fwd_bwd(dtype, V, 30.0)))
            cases.append((tag + " stats", fwd_bwd(dtype, V, None, True)))
    names = ["_linear_fwd_kernel", "_linear_bwd_kernel"]
    return [(name, run, K, names) for name, run in cases] + _dz_cases()


def _dz_cases() -> list[tuple[str, Callable[[], None], object, list[str]]]:
    """The fused linear losses' single pass on CUDA with bf16/fp16 inputs: the gradient kernel
    reads the float32 logits (padded rows) and writes dz in the inputs' dtype (linear_dpo_rows)."""
    from .common import LogitTransform
    from .linear_dpo_rows import Rows
    from .ops import triton_linear_logprobs as K

    def dz(dtype, V, softcap):
        def run():
            n = 16
            rows = Rows("triton", dtype, torch.device("cpu"), LogitTransform(softcap=softcap))
            x = torch.empty(n, K.padded(V))[:, :V]  # as Rows.tile lays out the chunk's logits
            out = torch.empty(n, K.padded(V), dtype=dtype)[:, :V]
            g, lse = torch.randn(n), torch.randn(n)
            rows.grad(x, torch.randint(0, V, (n,)), g, lse, out=out)

        return run

    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        for V in VOCABS:
            tag = f"linear_dz {_tag(dtype)} V={V}"
            cases += [(tag, dz(dtype, V, None)), (tag + " softcap", dz(dtype, V, 30.0))]
    return [(name, run, K, ["_linear_bwd_kernel"]) for name, run in cases]


def _scale_cases() -> list[tuple[str, Callable[[], None], object, list[str]]]:
    """The fused linear losses' backward: their gradients times the incoming one, in place
    (float32) or rounded to the inputs' dtype (bf16, fp16)."""
    from .ops import triton_scale as K

    def run(dtype):
        return lambda: K.scale(torch.zeros(10000), torch.ones(1), dtype)

    return [(f"scale {_tag(d)}", run(d), K, ["_scale_kernel"])
            for d in (torch.float32, torch.bfloat16, torch.float16)]  # fmt: skip


def cases() -> list[tuple[str, Callable[[], None], object, list[str]]]:
    """(case name, launcher call, module holding the kernels, kernel names) for every op."""
    return (_logprobs_cases() + _dpo_loss_cases() + _sibling_loss_cases() + _linear_cases()
            + _scale_cases())  # fmt: skip


def _launch_key(fn, args: tuple, kwargs: dict) -> tuple:
    """What Triton specializes a launch on: its constexprs, and for every other argument the
    dtype (tensors) or the type and divisibility-by-16 / ==1 of its value (ints)."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            key.append((type(a).__name__, a if isinstance(a, bool) else None))
        else:
            key.append(("int", a % 16 == 0, a == 1, abs(a) >= 2**31))
    return (fn.__name__, tuple(key), tuple(sorted((k, str(v)) for k, v in kwargs.items())))


def selected(case: str, quick: bool = False, only: str | None = None) -> bool:
    """Whether `case` runs: with `quick`, only the QUICK_VOCABS of the cases that take a V; with
    `only`, only the cases whose name contains it."""
    if quick and "V=" in case and not any(f"V={v}" in case for v in QUICK_VOCABS):
        return False
    return not only or only in case


def check_all(archs=ARCHS, quick: bool = False, only: str | None = None) -> list[KernelReport]:
    """One report per case, kernel, distinct compiled variant and arch. Launches that Triton would
    specialize the same way are compiled (and read) once; cuobjdump reads them on every core while
    the next ones compile (its disassembly is most of the time)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run gpu_check without TRITON_INTERPRET=1")
    pending = []
    seen: dict[tuple, tuple] = {}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for case, run, module, names in cases():
            if not selected(case, quick, only):
                continue
            with _recording(module, names) as recs:
                run()
            for name, rec in recs.items():
                done = set()
                for args, kwargs in rec.launches:
                    for arch in archs:
                        key = (_launch_key(rec.fn, args, kwargs), arch)
                        if key in done:
                            continue
                        done.add(key)
                        if key not in seen:
                            k = compile_launch(rec.fn, args, kwargs, arch)
                            seen[key] = (
                                k.metadata.num_warps,
                                pool.submit(read_cubin, k.asm["cubin"]),
                            )
                        pending.append((case, name, arch, key))
        read = {key: (warps, *job.result()) for key, (warps, job) in seen.items()}
    return [KernelReport(case, name, arch, *read[key]) for case, name, arch, key in pending]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dpo_kernels.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--json", help="write the reports here as JSON")
    p.add_argument(
        "--quick", action="store_true", help=f"only V in {QUICK_VOCABS} (one of each alignment)"
    )
    p.add_argument("--only", help="only the cases whose name contains this text")
    a = p.parse_args(argv)
    names = [c[0] for c in cases() if selected(c[0], a.quick)]
    if a.only and not any(a.only in n for n in names):
        p.error(f"--only {a.only!r} matches no case{' of --quick' if a.quick else ''}; the case "
                f"names: {', '.join(names)}")  # fmt: skip
    reports = check_all(quick=a.quick, only=a.only)
    print(f"{'case':40} {'kernel':22} {'sm':>3} {'warps':>5} {'regs':>4} {'local':>5}  memory ops")
    for r in reports:
        ops = {**r.global_loads, **r.global_stores}
        print(
            f"{r.case:40} {r.kernel:22} {r.arch:>3} {r.num_warps:>5} {r.registers:>4} "
            f"{r.local_bytes:>5}  " + " ".join(f"{k}x{v}" for k, v in sorted(ops.items()))
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    return 1 if any(r.local_bytes for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
