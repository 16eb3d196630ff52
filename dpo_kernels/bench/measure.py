"""Measurement: median time of a step, the extra peak memory of one step in a fresh process, and
the machine's copy bandwidth (the roofline's slope). See the package docstring for the rules."""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch

from .cases import DTYPES, Case, GradStep, Row, Step

STREAM_BYTES = 1 << 29  # 512 MiB buffers for the bandwidth probe


def time_step(step: Step, device: str, reps: int) -> float:
    """Median milliseconds of step(); the caller has run it once (the warm-up)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    [(ms, exc)] = time_steps_in_turn([step], reps)
    if exc is not None:
        raise exc
    return ms


def time_steps_in_turn(steps: list[Step], reps: int) -> list[tuple[float | None, Exception | None]]:
    """CPU: median milliseconds of each step, timed in turns (one call of each per round, `reps`
    rounds), so that a neighbour's load on a shared machine hits every method alike rather than
    the one whose block it fell in (a 2-core run under load once showed one row at 18x its quiet
    time).
    (None, the exception) for a step that raised; it leaves the rotation."""
    times: list[list[float]] = [[] for _ in steps]
    errors: list[Exception | None] = [None] * len(steps)
    for _ in range(reps):
        for i, step in enumerate(steps):
            if errors[i] is not None:
                continue
            t0 = time.perf_counter()
            try:
                step()
            except Exception as exc:  # (the caller marks the row)
                errors[i] = exc
                continue
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [(None, e) if e is not None else (statistics.median(t), None)
            for t, e in zip(times, errors, strict=True)]  # fmt: skip


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cuda_extra_peak(step: Step) -> int:
    """Bytes one call of step() allocates on the current GPU beyond what is live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def probe_memory(case: Case, method: str, device: str) -> int:
    """Extra peak bytes of one fwd+bwd (run in a fresh process; see the module docstring)."""
    import gc

    from .registry import OPS  # it imports every method's module: not at this module's import

    build = next(m.build for m in OPS[case.op].methods if m.name == method)
    step = build(case, device)
    step()  # warm-up: allocator pools, lazy inits, the first gradient
    if isinstance(step, GradStep):
        step.release()
    gc.collect()
    if device == "cuda":
        return cuda_extra_peak(step)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors go back to the OS at once
PEERS = ("trl", "transformers", "cut_cross_entropy", "liger_kernel")


@functools.cache
def _probe_context(device: str):
    """Where the memory probes run. On CPU, a forkserver with MALLOC_ENV in its environment from
    its start, that has imported torch, this module and the installed peers: every probe is a
    fresh process forked from it, which inherits the malloc setting and does not pay the imports
    again. On CUDA, spawned interpreters: a process forked from one whose imports may have touched
    CUDA cannot use it."""
    import importlib.util
    import multiprocessing
    from multiprocessing import forkserver

    if device == "cuda":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["dpo_kernels.bench", *(m for m in PEERS if importlib.util.find_spec(m))]
    )
    key, value = MALLOC_ENV
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved
    return ctx


def _probe_child(conn, case: Case, method: str, device: str) -> None:
    key, value = MALLOC_ENV
    if device == "cpu" and os.environ.get(key) != value:  # a forkserver someone else started
        raise RuntimeError(f"memory probe without {key}={value}")
    conn.send(probe_memory(case, method, device))


def measure_memory(case: Case, method: str, device: str) -> int | None:
    """Extra peak bytes of `method` on `case`, probed in a fresh process; None if it failed."""
    ctx = _probe_context(device)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_child, args=(send, case, method, device))
    proc.start()
    send.close()
    try:
        extra = recv.recv()
    except EOFError:  # it died: an exception, or out of memory
        extra = None
    proc.join()
    return extra if proc.exitcode == 0 else None


def probe_workers(device: str) -> int:
    """How many memory probes run at once: as many as there are cores on CPU (each reads its own
    process's peak only); one on CUDA, where probes would share the GPU's memory and each would
    start a CUDA context of its own."""
    return 1 if device == "cuda" else os.cpu_count() or 1


def probe_rows(case: Case, rows: list[Row], device: str) -> None:
    """Extra peak memory of each row's method, one process each, after the case's timings."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=probe_workers(device)) as pool:
        extras = list(pool.map(lambda r: measure_memory(case, r.method, device), rows))
    for row, extra in zip(rows, extras, strict=True):
        row.extra_mib = None if extra is None else extra / 2**20


def stream_bandwidth(device: str) -> float:
    """Measured bytes/s of a large read+write copy on this machine (the roofline's slope): the
    fastest of several copies, since the bound is what the machine can do and a busy neighbour
    only slows some of them."""
    n = STREAM_BYTES // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="min")
    else:
        b.copy_(a)
        ts = []
        for _ in range(9):
            t0 = time.perf_counter()
            b.copy_(a)
            ts.append(time.perf_counter() - t0)
        ms = min(ts) * 1e3
    return 2 * a.numel() * 4 / (ms * 1e-3)


def must_move_bytes(case: Case) -> int | None:
    """Bytes logprobs fwd+bwd must move: read the counted rows twice, write the whole gradient
    once. None for the other ops, which are bound by matmuls (see the linear op's "matmuls")."""
    if case.op != "logprobs":
        return None
    B, T, V = case.shape
    esize = DTYPES[case.dtype].itemsize
    counted_rows = B * (T - T // 4)
    return (2 * counted_rows + B * T) * V * esize
