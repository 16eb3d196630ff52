"""The main job: forward+backward of the fused ops against naive PyTorch (and peers), in a table.

Measurement rules (shared/DESIGN.md): times are medians after a warm-up, all methods of a case in
the same process run, speed-ups and memory ratios are over the op's first method (its baseline)
within that run. Peak memory comes from one fresh process per method (forked from a server that
has done the imports): MALLOC_MMAP_THRESHOLD_ is set so freed tensors go back to the OS,
`/proc/self/clear_refs` resets the high-water mark after a warm-up, and the extra peak is VmHWM
after one fwd+bwd minus VmRSS before it. On CUDA: triton.testing.do_bench and
torch.cuda.max_memory_allocated. Every output is checked against a float64 reference; a fast
wrong answer is marked WRONG.

Modules: `cases` (Case, Row, seeded inputs, GradStep, check), `peers` and `trainers` /
`siblings` (each method's step builder), `expected` (float64 references), `registry` (OPS and the
grids), `measure` (time, memory probe, bandwidth), `report` (table, markdown, plot); this module
runs them. `import dpo_kernels` loads none of it (`dpo-kernels bench` does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cases import DTYPES, Case, GradStep, Row, check, parse_shape
from .measure import must_move_bytes, probe_rows, probe_workers, stream_bandwidth, time_step
from .registry import DEFAULT_GRID, DEFAULT_OPS, OPS, QUICK_GRID, Method, Op, expected
from .report import format_table, machine_facts, markdown_section, plot, write_section

__all__ = [
    "DEFAULT_GRID", "DEFAULT_OPS", "DTYPES", "OPS", "QUICK_GRID", "Case", "GradStep", "Method",
    "Op", "Row", "check", "expected", "format_table", "machine_facts", "markdown_section",
    "must_move_bytes", "parse_shape", "plot", "probe_workers", "run", "run_case",
    "stream_bandwidth", "time_step", "write_section",
]  # fmt: skip


def run_case(
    case: Case,
    device: str,
    reps: int,
    bandwidth: float | None,
    memory: bool,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    op = OPS[case.op]
    ref = op.expected(case, device)
    tokens = op.tokens(case)
    rows: list[Row] = []
    for method in op.methods:
        if progress:
            progress(f"{case.op} {case.label} {case.dtype} {method.name}")
        row = Row(case.op, case.label, case.dtype, method.name, tokens=tokens)
        rows.append(row)
        reason = method.skip(device)
        if reason:
            row.status, row.note = "skipped", reason
            continue
        try:
            step = method.build(case, device)
            out = step()  # the warm-up, and the result to check
            if out is None:
                row.note = "timing reference, no result"
            else:
                row.value_err, row.grad_err, ok = check(out, ref)
                row.status = "ok" if ok else "WRONG"
            del out
            row.time_ms = time_step(step, device, reps)
            del step
        except Exception as exc:  # a peer that fails is a skipped row, ours a FAILED one
            row.status = "FAILED" if method.ours else "skipped"
            row.note = f"{type(exc).__name__}: {str(exc)[:60]}"
            row.value_err = row.grad_err = None
            continue
        row.tokens_per_s = tokens / row.time_ms * 1e3
        moved = must_move_bytes(case)
        if bandwidth and moved:
            row.roofline = moved / bandwidth * 1e3 / row.time_ms
    del ref  # the float64 reference: not held while the probes allocate (on the same GPU)
    if device == "cuda":
        torch.cuda.empty_cache()
    if memory:
        probe_rows(case, [r for r in rows if r.value_err is not None], device)
    base = rows[0]
    for r in rows:
        if base.time_ms and r.time_ms:
            r.speedup = base.time_ms / r.time_ms
        if base.extra_mib and r.extra_mib is not None:
            r.mem_ratio = r.extra_mib / base.extra_mib
    return rows


def run(
    grid: dict[str, list[Case]],
    device: str,
    reps: int = 5,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Row], dict]:
    """Run every case of the grid; returns the rows and facts about the machine. `progress` is
    called with "op shape dtype method" as each method starts."""
    bandwidth = stream_bandwidth(device)
    rows: list[Row] = []
    for case in (c for cs in grid.values() for c in cs):
        rows += run_case(case, device, reps, bandwidth, memory, progress)
    return rows, machine_facts(device, bandwidth)
