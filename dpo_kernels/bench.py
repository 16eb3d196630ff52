"""The main job: forward+backward of the fused ops against naive PyTorch (and peers), in a table.

Measurement rules (shared/DESIGN.md): times are medians after a warm-up, all methods of a case in
the same process run, speed-ups are ratios within that run. Peak memory comes from one subprocess
per method: MALLOC_MMAP_THRESHOLD_ is set so freed tensors go back to the OS,
`/proc/self/clear_refs` resets the high-water mark after a warm-up, and the extra peak is VmHWM
after one fwd+bwd minus VmRSS before it. On CUDA: triton.testing.do_bench and
torch.cuda.max_memory_allocated. Every output is checked against the float64 reference; a fast
wrong answer is marked WRONG.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STREAM_BYTES = 1 << 29  # 512 MiB buffers for the bandwidth probe


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    method: str
    time_ms: float | None = None
    speedup: float | None = None
    extra_mib: float | None = None
    mem_ratio: float | None = None
    max_err: float | None = None
    roofline: float | None = None  # fraction of the bandwidth bound reached
    status: str = "ok"  # ok | WRONG | skipped
    note: str = ""


# ------------------------------------------------------------------------------------------
# Inputs and methods. A method builds a step() -> (per-sequence logps, input gradient).

Step = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def logits_inputs(case: Case, device: str):
    """Logits [B, T, V], labels [B, T], mask [B, T]: the first quarter of tokens is the prompt."""
    B, T, V = case.shape
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(DTYPES[case.dtype]).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, : T // 4] = False
    return logits, labels, mask


def _naive(case, device) -> Step:
    logits, labels, mask = logits_inputs(case, device)
    z = logits.requires_grad_()

    def step():
        z.grad = None
        lp = z.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        logps = (lp * mask).sum(-1)
        logps.sum().backward()
        return logps.detach(), z.grad

    return step


def _ours(case, device) -> Step:
    from .functional import sequence_logprobs

    logits, labels, mask = logits_inputs(case, device)
    z = logits.requires_grad_()

    def step():
        z.grad = None
        logps = sequence_logprobs(z, labels, mask=mask).logps
        logps.sum().backward()
        return logps.detach(), z.grad

    return step


def _trl_selective(case, device) -> Step:
    from trl.trainer.utils import selective_log_softmax

    logits, labels, mask = logits_inputs(case, device)
    z = logits.requires_grad_()

    def step():
        z.grad = None
        logps = (selective_log_softmax(z, labels) * mask).sum(-1)
        logps.sum().backward()
        return logps.detach(), z.grad

    return step


def _has(module: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec(module) else f"{module} not installed"


# op -> [(method name, builder, availability check returning a reason or None)]
METHODS: dict[str, list[tuple[str, Callable[[Case, str], Step], Callable[[], str | None]]]] = {
    "logprobs": [
        ("naive", _naive, lambda: None),
        ("trl.selective_log_softmax", _trl_selective, lambda: _has("trl")),
        ("dpo_kernels", _ours, lambda: None),
    ],
}

DEFAULT_GRID = {
    "logprobs": [
        Case("logprobs", (4, 512, 32000), "fp32"),
        Case("logprobs", (4, 512, 32000), "bf16"),
        Case("logprobs", (2, 256, 128256), "bf16"),
    ],
}
QUICK_GRID = {"logprobs": [Case("logprobs", (2, 128, 32000), "fp32")]}


def expected(case: Case, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference logps and gradient of sum(logps) for the case's inputs."""
    logits, labels, mask = logits_inputs(case, device)
    z = logits.double().requires_grad_()
    logps, _ = reference.sequence_logprobs(z, labels, mask)
    logps.sum().backward()
    return logps.detach(), z.grad


def max_error(got: tuple[torch.Tensor, torch.Tensor], ref) -> tuple[float, bool]:
    """Largest error of logps (relative to their scale) and gradient; True when within tolerance."""
    lp, grad = got
    rlp, rgrad = ref
    lp_err = ((lp.double() - rlp).abs() / rlp.abs().clamp(min=1)).max().item()
    g_err = (grad.double() - rgrad).abs().max().item()
    ok = lp_err <= 1e-3 and g_err <= 2e-2  # bf16 gradients carry one bf16 rounding (~4e-3)
    return max(lp_err, g_err), ok


# ------------------------------------------------------------------------------------------
# Measurement


def time_step(step: Step, device: str, reps: int) -> float:
    """Median milliseconds of step() after one warm-up."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(case: Case, method: str, device: str) -> int:
    """Extra peak bytes of one fwd+bwd (run in a fresh subprocess; see the module docstring)."""
    import gc

    builder = {name: b for name, b, _ in METHODS[case.op]}[method]
    step = builder(case, device)
    step()  # warm-up: allocator pools, lazy inits, the first gradient
    _release_grad(step)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def _release_grad(step: Step) -> None:
    for cell in step.__closure__ or ():
        v = cell.cell_contents
        if isinstance(v, torch.Tensor) and v.requires_grad:
            v.grad = None


def measure_memory(case: Case, method: str, device: str) -> int | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    arg = json.dumps({"case": dataclasses.asdict(case), "method": method, "device": device})
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_kernels.bench", "--probe", arg],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    return int(proc.stdout.strip().splitlines()[-1])


def stream_bandwidth(device: str) -> float:
    """Measured bytes/s of a large read+write copy on this machine (the roofline's slope)."""
    n = STREAM_BYTES // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    else:
        b.copy_(a)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            b.copy_(a)
            ts.append(time.perf_counter() - t0)
        ms = statistics.median(ts) * 1e3
    return 2 * a.numel() * 4 / (ms * 1e-3)


def must_move_bytes(case: Case) -> int:
    """Bytes fwd+bwd must move: read the counted rows twice, write the whole gradient once."""
    B, T, V = case.shape
    esize = DTYPES[case.dtype].itemsize
    counted_rows = B * (T - T // 4)
    return (2 * counted_rows + B * T) * V * esize


def run_case(
    case: Case, device: str, reps: int, bandwidth: float | None, memory: bool
) -> list[Row]:
    ref = expected(case, device)
    rows: list[Row] = []
    for name, builder, available in METHODS[case.op]:
        row = Row(case.op, case.label, case.dtype, name)
        reason = available()
        if reason:
            row.status, row.note = "skipped", reason
            rows.append(row)
            continue
        try:
            step = builder(case, device)
            row.max_err, ok = max_error(step(), ref)
            row.status = "ok" if ok else "WRONG"
            row.time_ms = time_step(step, device, reps)
            del step
        except Exception as exc:  # a peer that fails on this case is a skipped row, not a crash
            row.status, row.note = "skipped", f"{type(exc).__name__}: {str(exc)[:60]}"
            rows.append(row)
            continue
        if memory:
            extra = measure_memory(case, name, device)
            row.extra_mib = None if extra is None else extra / 2**20
        if bandwidth:
            row.roofline = must_move_bytes(case) / bandwidth * 1e3 / row.time_ms
        rows.append(row)
    base = next((r for r in rows if r.method == "naive" and r.time_ms), None)
    for r in rows:
        if base and r.time_ms:
            r.speedup = base.time_ms / r.time_ms
        if base and base.extra_mib and r.extra_mib is not None:
            r.mem_ratio = r.extra_mib / base.extra_mib
    return rows


def format_table(rows: list[Row]) -> str:
    head = ["op", "shape", "dtype", "method", "ms", "speed-up", "extra MiB", "mem ratio",
            "max err", "roofline", "status"]  # fmt: skip

    def f(v, spec, unit=""):
        return "-" if v is None else format(v, spec) + unit

    lines = [head]
    for r in rows:
        roof = None if r.roofline is None else 100 * r.roofline
        lines.append([
            r.op, r.shape, r.dtype, r.method, f(r.time_ms, ".1f"), f(r.speedup, ".2f", "x"),
            f(r.extra_mib, ".0f"), f(r.mem_ratio, ".2f"), f(r.max_err, ".1e"), f(roof, ".0f", "%"),
            r.status + (f" ({r.note})" if r.note else ""),
        ])  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(
    grid: dict[str, list[Case]],
    device: str,
    reps: int = 5,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Row], dict]:
    """Run every case of the grid; returns the rows and facts about the machine."""
    bandwidth = stream_bandwidth(device)
    facts = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stream_GBps": bandwidth / 1e9,
        "date": time.strftime("%Y-%m-%d"),
    }
    rows: list[Row] = []
    cases = [c for cs in grid.values() for c in cs]
    for i, case in enumerate(cases):
        if progress:
            progress(f"[{i + 1}/{len(cases)}] {case.op} {case.label} {case.dtype}")
        rows += run_case(case, device, reps, bandwidth, memory)
    return rows, facts


def _probe_main(arg: str) -> int:
    spec = json.loads(arg)
    c = spec["case"]
    case = Case(c["op"], tuple(c["shape"]), c["dtype"])
    print(probe_memory(case, spec["method"], spec["device"]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        sys.exit(_probe_main(sys.argv[2]))
    from .cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
