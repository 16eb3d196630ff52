"""The main job: forward+backward of the fused ops against naive PyTorch (and peers), in a table.

Measurement rules (shared/DESIGN.md): times are medians after a warm-up, all methods of a case in
the same process run, speed-ups and memory ratios are over the op's first method (its baseline)
within that run. Peak memory comes from one fresh process per method (forked from a server that
has done the imports): MALLOC_MMAP_THRESHOLD_ is set so freed tensors go back to the OS,
`/proc/self/clear_refs` resets the high-water mark after a warm-up, and the extra peak is VmHWM
after one fwd+bwd minus VmRSS before it. On CUDA: triton.testing.do_bench and
torch.cuda.max_memory_allocated. Every output is checked against a float64 reference (gradients
through a seeded non-uniform incoming gradient, tolerances by dtype: cases.TOLERANCES); a fast
wrong answer, or a non-finite error, is marked WRONG.

Modules: `cases` (Case, Row, seeded inputs, GradStep, check), `peers` and `trainers` /
`siblings` (each method's step builder), `expected` (float64 references), `registry` (OPS and the
grids), `measure` (time, memory probe, bandwidth), `report` (table, markdown, plot); this module
runs them. `import dpo_kernels` loads none of it (`dpo-kernels bench` does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cases import DTYPES, TOLERANCES, Case, GradStep, Row, Step, check, parse_shape
from .measure import (
    must_move_bytes,
    probe_rows,
    probe_workers,
    stream_bandwidth,
    time_step,
    time_steps_in_turn,
)
from .registry import DEFAULT_GRID, DEFAULT_OPS, OPS, QUICK_GRID, Method, Op, expected
from .report import failures, format_table, machine_facts, markdown_section, plot, write_section

__all__ = [
    "DEFAULT_GRID", "DEFAULT_OPS", "DTYPES", "OPS", "QUICK_GRID", "REFERENCE", "TOLERANCES",
    "Case", "GradStep", "Method", "Op", "Row", "check", "expected", "failures", "format_table",
    "machine_facts", "markdown_section", "must_move_bytes", "parse_shape", "plot",
    "probe_workers", "run", "run_case", "stream_bandwidth", "time_step", "write_section",
]  # fmt: skip


REFERENCE = "float64 reference"  # the method name of the row that says the reference failed
NOTE_CHARS = 60  # of an exception's message in the table; the whole one is printed below it


def _fail(row: Row, status: str, exc: Exception) -> None:
    row.status, row.error = status, f"{type(exc).__name__}: {exc}"
    short = " ".join(row.error.split())
    row.note = short if len(short) <= NOTE_CHARS else short[: NOTE_CHARS - 3] + "..."
    row.value_err = row.grad_err = None


def run_case(
    case: Case,
    device: str,
    reps: int,
    bandwidth: float | None,
    memory: bool,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """One case, every method: timed, checked against the float64 reference. If the reference
    itself fails, one FAILED row (method REFERENCE) stands for the case; if it needs a package
    that is missing (an optional peer's: TRL, transformers), or every method is skipped, every
    row is skipped with the reason."""
    op = OPS[case.op]
    tokens = op.tokens(case)
    reasons = [m.skip(device) for m in op.methods]
    try:
        ref = None if all(reasons) else op.expected(case, device)
    except ImportError as exc:  # (ModuleNotFoundError too): nothing can be checked here
        reason = f"the float64 reference needs {exc.name or exc}"
        return [Row(case.op, case.label, case.dtype, m.name, tokens=tokens, status="skipped",
                    note=reason) for m in op.methods]  # fmt: skip
    except Exception as exc:
        row = Row(case.op, case.label, case.dtype, REFERENCE)
        _fail(row, "FAILED", exc)
        return [row]
    rows: list[Row] = []
    steps: list[tuple[Row, Method, Step]] = []  # built, warmed up and checked; timed below
    for method, reason in zip(op.methods, reasons, strict=True):
        if progress:
            progress(f"{case.op} {case.label} {case.dtype} {method.name}")
        row = Row(case.op, case.label, case.dtype, method.name, tokens=tokens)
        rows.append(row)
        if reason:
            row.status, row.note = "skipped", reason
            continue
        try:
            step = method.build(case, device)
            out = step()  # the warm-up, and the result to check
            if out is None:
                row.note = "timing reference, no result"
            else:
                row.value_err, row.grad_err, ok = check(out, ref, case.dtype)
                row.status = "ok" if ok else "WRONG"
            del out
            if isinstance(step, GradStep):  # the warm-up's gradients: not held while others run
                step.release()
            if device == "cuda":  # do_bench per method (the GPU's time, not the host's turns)
                row.time_ms = time_step(step, device, reps)
            else:
                steps.append((row, method, step))
            del step
        except Exception as exc:  # a peer that fails is a skipped row, ours a FAILED one
            _fail(row, "FAILED" if method.ours else "skipped", exc)
    del ref  # the float64 reference: not held while the steps are timed or the probes allocate
    # (Timed in turns, every method's inputs and last gradients are alive at once.)
    timed = time_steps_in_turn([entry[2] for entry in steps], reps)
    for (row, method), (ms, exc) in zip([entry[:2] for entry in steps], timed, strict=True):
        if exc is not None:
            _fail(row, "FAILED" if method.ours else "skipped", exc)
        row.time_ms = ms
    del steps
    for row in rows:
        if row.time_ms is None:
            continue
        row.tokens_per_s = tokens / row.time_ms * 1e3
        moved = must_move_bytes(case)
        if bandwidth and moved:
            row.roofline = moved / bandwidth * 1e3 / row.time_ms
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
    """Run every case of the grid; returns the rows and facts about the machine (with the backend
    our rows ran on). `progress` is called with "op shape dtype method" as each method starts."""
    from .. import resolve_backend

    facts = {"backend": resolve_backend(None, torch.device(device))}  # raises on a bad one
    bandwidth = stream_bandwidth(device)
    rows: list[Row] = []
    for case in (c for cs in grid.values() for c in cs):
        rows += run_case(case, device, reps, bandwidth, memory, progress)
    return rows, {**machine_facts(device, bandwidth), **facts}
