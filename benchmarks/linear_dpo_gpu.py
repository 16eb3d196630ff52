"""The fused linear DPO loss on a CUDA GPU against its 3 cuBLAS GEMMs (issue 16's GPU target).

At one shape (default: the issue's, 32 rows of 682 tokens, the first quarter prompt: 16384
counted tokens, H = 4096, V = 128256, bf16) it times, with `triton.testing.do_bench` (median):
- the 3 plain GEMMs over the counted tokens in the inputs' dtype (logits, dh, dW: the target's
  baseline), together and each alone, and the forms our CUDA route calls (float32 results, dW
  accumulated by the batched out-dtype matmul or, its fallback, a product and an add);
- one fwd+bwd of `linear_dpo_loss` at several memory budgets, with its extra peak memory and its
  loss and gradients against the default budget's;
and each budget against the 3 GEMMs timed alternately (`paired`), from an idle GPU and behind
other work (as in a training step), and after itself (the step's time by the same CUDA events
when no GEMMs precede it), with the SM clock and power `nvidia-smi` sampled during each call
(what tells a method's difference from a clock's: a step after 76 ms of GEMMs may run at a
power-capped clock);
then profiles one step at the default budget: CUDA time per kernel, and how long the GPU sat idle
between kernels within the step, with the largest gaps, the kernels on either side of each and
how late the host launched the kernel after it (the part of the idle time the host is to blame
for: Python, a sync), from which host ops (what to look at when the step is slower than its
kernels add up to). Prints a table; `--json` writes every number, `--trace` the profiler's
timeline (host ops and device kernels) of two steps back to back, for a trace viewer. Usage:
    python benchmarks/linear_dpo_gpu.py [--shape BxTxHxV] [--dtype bf16] [--budgets 1,2,4,8]
        [--json out.json] [--trace trace.json.gz]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import time
from typing import NamedTuple

import torch
import triton.testing

from dpo_kernels import linear_dpo_loss
from dpo_kernels.bench.cases import (
    DPO_BETA,
    DTYPES,
    Case,
    GradStep,
    linear_dpo_inputs,
    parse_shape,
)
from dpo_kernels.bench.measure import cuda_extra_peak
from dpo_kernels.linear_dpo import DEFAULT_MEMORY_BUDGET
from dpo_kernels.ops import triton_linear_logprobs as L


def bench(fn) -> float:
    """Median ms of fn() (CUDA: do_bench over about a second; CPU, for a smoke run: 3 calls)."""
    fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=100, rep=1000, return_mode="median")


class ClockSampler:
    """`nvidia-smi` sampling the SM clock (MHz) and board power (W) of the current GPU every
    `ms` ms in its own process (no GIL shared with the timed host work), while in a `with`
    block; `samples`: (epoch seconds, MHz, W). Does nothing without CUDA or nvidia-smi."""

    def __init__(self, ms: int = 10):
        self.ms, self.proc, self.samples = ms, None, []

    def __enter__(self):
        smi = shutil.which("nvidia-smi")
        if torch.cuda.is_available() and smi:
            self.proc = subprocess.Popen(
                [smi, f"--id={_smi_id()}", f"--loop-ms={self.ms}",
                 "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            time.sleep(0.2)  # its first sample
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.samples = parse_smi(self.proc.communicate()[0].splitlines())


def _smi_id() -> str:
    """The current GPU as nvidia-smi names it: by UUID (CUDA_VISIBLE_DEVICES may renumber)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    uuid = getattr(props, "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else str(torch.cuda.current_device())


def parse_smi(lines: list[str]) -> list[tuple[float, float, float]]:
    """nvidia-smi's "2026/11/26 10:00:00.123, 1755, 612.3" lines (local time) -> (epoch s, MHz,
    W); lines that do not parse ("[N/A]", a cut-off last line) are left out."""
    out = []
    for line in lines:
        try:
            stamp, mhz, watts = (f.strip() for f in line.split(","))
            t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((t, float(mhz), float(watts)))
        except ValueError:
            continue
    return out


def during(samples, spans) -> dict[str, float] | None:
    """Median SM clock (MHz) and mean power (W) of the samples taken inside any of the (start,
    end) epoch-second spans, with their count; None when none fell inside."""
    inside = [(mhz, w) for t, mhz, w in samples if any(a <= t <= b for a, b in spans)]
    if not inside:
        return None
    return {"mhz": statistics.median(m for m, _ in inside),
            "watts": statistics.fmean(w for _, w in inside), "samples": len(inside)}  # fmt: skip


def paired(base, fn, rounds: int = 30, busy=None) -> dict:
    """base() and fn() timed alternately, one call each per round (CUDA events around each, the
    L2 cache cleared before each; CPU smoke run: wall clock): median ms of each and the median of
    the per-round ratios fn / base. Both see the same clocks and temperature, which separate
    do_bench runs a minute apart need not (a few percent matters next to a 1.1x target). With
    nvidia-smi, the SM clock and power during each one's calls (`during`: base_clock, clock).

    Each call starts on an idle GPU, so the host's work before a call's first kernel counts;
    with `busy` (CUDA), busy() is queued before the start event, as the model's forward is before
    the loss in a training step, and host work that fits in its time does not count."""
    cuda = torch.cuda.is_available()
    cache = torch.empty(2**26 if cuda else 1, dtype=torch.int32, device="cuda" if cuda else "cpu")
    times: list[list[float]] = [[], []]
    spans: list[list[tuple[float, float]]] = [[], []]  # host epoch seconds around each call
    with ClockSampler() as clocks:
        for r in range(rounds + 2):  # the first 2 rounds warm up
            for i, f in enumerate((base, fn)):
                ms, span = _timed_call(f, cache, busy if cuda else None)
                if r >= 2:
                    times[i].append(ms)
                    spans[i].append(span)
    ratios = [b / a for a, b in zip(*times, strict=True)]
    return {"rounds": rounds, "base_ms": statistics.median(times[0]),
            "ms": statistics.median(times[1]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "base_clock": during(clocks.samples, spans[0]),
            "clock": during(clocks.samples, spans[1])}  # fmt: skip


def clocks(pd: dict) -> str:
    """`paired`'s clock and power during each side's calls, for a printed line ('' without)."""
    side = [(what, pd[k]) for what, k in (("GEMMs", "base_clock"), ("step", "clock")) if pd[k]]
    return "".join(f"; {what} {c['mhz']:.0f} MHz {c['watts']:.0f} W" for what, c in side)


def _timed_call(f, cache: torch.Tensor, busy) -> tuple[float, tuple[float, float]]:
    """(ms of f(), the host epoch seconds from its start event's record to its end): one call of
    `paired`, after clearing the L2 cache and queueing busy()."""
    cache.zero_()
    if busy is not None:
        busy()
    t0 = time.time()
    if cache.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), (t0, time.time())
    f()
    return (time.time() - t0) * 1e3, (t0, time.time())


def extra_peak(step: GradStep) -> int:
    """Bytes one step allocates beyond what is live before it (its gradients included); 0 on
    CPU (see `dpo-kernels bench` for CPU memory)."""
    step.release()
    return cuda_extra_peak(step) if torch.cuda.is_available() else 0


def host_syncs(step) -> list[str]:
    """Where one step makes the host wait for the GPU (torch's sync debug mode): file:line of
    each synchronizing call, with its count."""
    import collections
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(
        f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    )
    return [f"{n} x {k}" for k, n in where.most_common()]


class Gap(NamedTuple):
    """A hole in the device's timeline: its length and start (us), the op that ran last before it,
    the op after it and that op's key (its CUPTI correlation id, which its launch shares)."""

    us: float
    start: float
    before: str
    after: str
    key: object = None


def idle_gaps(intervals: list[tuple], top: int = 8) -> tuple[float, float, list[Gap]]:
    """(span, idle, largest gaps) of (name, start, end[, key]) intervals in us: idle is the span
    minus the union of the intervals; the gaps are the holes in that union, largest first."""
    if not intervals:
        return 0.0, 0.0, []
    intervals = sorted(intervals, key=lambda t: t[1])
    gaps, reach, before = [], intervals[0][2], intervals[0][0]
    for name, start, end, *key in intervals[1:]:
        if start > reach:
            gaps.append(Gap(start - reach, reach, before, name, key[0] if key else None))
        if end > reach:
            reach, before = end, name
    gaps.sort(key=lambda g: -g.us)
    return reach - intervals[0][1], sum(g.us for g in gaps), gaps[:top]


def late_launches(gaps: list[Gap], launches: dict) -> list[tuple[Gap, float | None, str]]:
    """Each gap with how late the host launched the op after it and where from: launches maps a
    key to (host time of the launch call, where). Lateness = launch time - gap start, in us: > 0,
    the device ran dry before the host got there (the host is the bottleneck: Python, a sync);
    <= 0, the op was queued in time and the device waited on something else. None: no launch
    record for that op."""
    out = []
    for g in gaps:
        t, where = launches.get(g.key, (None, ""))
        out.append((g, None if t is None else t - g.start, where))
    return out


def host_launches(events) -> dict:
    """Profiler events -> {correlation id: (host start of the CUDA runtime/driver call that
    launched it, the host ops it was called from, innermost first)}."""
    out = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or not e.name.startswith("cu"):
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name[:50])
            parent = parent.cpu_parent
        out[e.id] = (e.time_range.start, " < ".join(chain) or "(no host op: a Triton launch)")
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def gemm_times(h: torch.Tensor, w: torch.Tensor):
    """h: [M, H] counted rows, w: [V, H]. ({what: ms}, the 3 GEMMs as one callable): the 3 GEMMs
    in the inputs' dtype, and the float32-result forms the CUDA route uses (projection written
    fresh, dW accumulated)."""
    M, V = h.shape[0], w.shape[0]
    dz = (torch.randn(M, V, device=h.device) * 1e-3).to(w.dtype)
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(w)
    t = {
        "logits h@W.T": bench(lambda: torch.mm(h, w.T, out=z)),
        "dh dz@W": bench(lambda: torch.mm(dz, w, out=dh)),
        "dW dz.T@h": bench(lambda: torch.mm(dz.T, h, out=dw)),
    }

    def three():  # as the bench's `matmuls` row (peers.ldpo_matmuls)
        torch.mm(h, w.T, out=z)
        torch.mm(dz, w, out=dh)
        torch.mm(dz.T, h, out=dw)

    t["3 GEMMs"] = bench(three)
    z32 = torch.empty(M, V, device=h.device)
    t["logits, float32 out"] = bench(lambda: L.addmm_acc(z32, h, w.T, fresh=True))
    dw32 = torch.zeros(V, h.shape[1], device=h.device)
    t["dW, float32 accumulate"] = bench(lambda: L.addmm_acc(dw32, dz.T, h))
    by_add = L._ACC_BY_ADD
    L._ACC_BY_ADD = True  # the fallback form: float32 product, then an add
    t["dW, float32 product + add"] = bench(lambda: L.addmm_acc(dw32, dz.T, h))
    L._ACC_BY_ADD = by_add
    return t, three


GPU_SHAPE = "32x682x4096x128256"  # the issue's; hours on a CPU


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", help=f"BxTxHxV, B even (default on CUDA: {GPU_SHAPE})")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--budgets", default="1,2,4,8", help="GiB, comma-separated")
    ap.add_argument("--json")
    ap.add_argument("--trace", help="a .json or .json.gz path for the two steps' timeline")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape is None and device == "cpu":
        ap.error(
            f"no CUDA device: the default shape {GPU_SHAPE} would take hours on the CPU; "
            "pass --shape for a CPU smoke run, e.g. --shape 2x16x32x64 --dtype fp32"
        )
    args.shape = args.shape or GPU_SHAPE
    try:
        shape = parse_shape(args.shape)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1 or shape[0] % 2:
        ap.error(f"--shape takes BxTxHxV (positive, B = 2P rows: even), got {args.shape!r}")
    case = Case("linear_dpo", shape, args.dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"
    hidden, weight, labels, mask, _, rc, rr = linear_dpo_inputs(case, device)
    M = int(mask.sum())
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"shape {args.shape} {args.dtype}: {M} counted tokens")  # fmt: skip
    out: dict = {"device": name, "shape": args.shape,
                 "dtype": args.dtype, "counted_tokens": M}  # fmt: skip

    out["gemms_ms"], three = gemm_times(hidden[mask], weight.detach())  # h, w get grads below
    h, w = hidden.requires_grad_(), weight.requires_grad_()

    def fused(budget):
        def loss():
            return linear_dpo_loss(h, w, labels, mask=mask, ref_chosen_logps=rc,
                                   ref_rejected_logps=rr, beta=DPO_BETA,
                                   memory_budget=budget).loss[None]  # fmt: skip

        return GradStep([h, w], loss)

    busy = None
    if device == "cuda":  # about 6 ms of matmuls on an H200
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        c = torch.empty_like(a)

        def busy():
            for _ in range(4):
                torch.mm(a, a, out=c)

    default = DEFAULT_MEMORY_BUDGET[device]
    ref_loss, (ref_dh, ref_dw) = fused(default)()
    rows = []
    budgets = sorted({int(float(b) * 2**30) for b in args.budgets.split(",")} | {default})
    for budget in budgets:
        step = fused(budget)
        loss, (dh, dw) = step()
        rows.append({
            "budget_gib": budget / 2**30,
            "default": budget == default,
            "ms": bench(step),
            "paired": paired(three, step),
            "paired_busy": paired(three, step, busy=busy),
            "extra_mib": extra_peak(step) / 2**20,
            "loss_diff": (loss - ref_loss).abs().item(),
            "dh_diff": rel_diff(dh, ref_dh),
            "dw_diff": rel_diff(dw, ref_dw),
        })  # fmt: skip
        if budget == default:  # by the same events, no GEMMs before it
            rows[-1]["after_self"] = paired(step, step)
    out["fused"] = rows
    del three

    step = fused(default)
    step()
    out["host_syncs"] = host_syncs(step) if device == "cuda" else []
    activity = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else None
    with torch.profiler.profile(activities=[activity or torch.profiler.ProfilerActivity.CPU]) as p:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    total = "device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(p.key_averages(), key=lambda e: -getattr(e, total))
    out["profile_us"] = [(e.key[:70], e.count, getattr(e, total)) for e in events[:15]]
    # What ran on the device (CUDA: kernels, copies, fills; CPU smoke run: the top-level ops).
    cuda = torch.autograd.DeviceType.CUDA
    ran = [(e.name[:60], e.time_range.start, e.time_range.end, e.id) for e in p.events()
           if (e.device_type == cuda if device == "cuda" else e.cpu_parent is None)]  # fmt: skip
    span, idle, gaps = idle_gaps(ran, top=len(ran))  # every gap, for the host's share below
    gaps = late_launches(gaps, host_launches(p.events()))
    host_bound = sum(min(g.us, late) for g, late, _ in gaps if late is not None and late > 0)
    out["idle_us"] = {"span": span, "idle": idle, "host_late": host_bound,
                      "largest": [(*g, late, where) for g, late, where in gaps[:8]]}  # fmt: skip

    base = out["gemms_ms"]["3 GEMMs"]
    print("\nGEMMs alone (ms):")
    for k, v in out["gemms_ms"].items():
        print(f"  {k:28s} {v:8.2f}")
    print("\nlinear_dpo_loss fwd+bwd    ms   x 3 GEMMs   extra MiB   |loss-d|  dh rel  dW rel")
    for r in rows:
        mark = " (default)" if r["default"] else ""
        print(f"  budget {r['budget_gib']:5.2f} GiB {r['ms']:8.2f} {r['ms'] / base:8.3f}x "
              f"{r['extra_mib']:10.0f} {r['loss_diff']:9.2e} {r['dh_diff']:7.1e} "
              f"{r['dw_diff']:7.1e}{mark}")  # fmt: skip
    for key, what in (("paired", "from an idle GPU"), ("paired_busy", "behind 6 ms of matmuls")):
        print(f"\neach budget and the 3 GEMMs timed alternately (paired), {what}:")
        for r in rows:
            pd = r[key]
            print(f"  budget {r['budget_gib']:5.2f} GiB {pd['ms']:8.2f} vs {pd['base_ms']:8.2f} ms:"
                  f" median {pd['ratio']:.3f}x (range {pd['ratio_min']:.3f}-{pd['ratio_max']:.3f},"
                  f" {pd['rounds']} rounds){clocks(pd)}")  # fmt: skip
    for r in rows:
        if "after_self" in r:
            pd = r["after_self"]
            print(f"\nthe default budget's step timed by the same events after itself: "
                  f"{pd['ms']:.2f} ms (do_bench {r['ms']:.2f}){clocks(pd)}")  # fmt: skip
    print(f"\nhost syncs in one step at the default budget: {out['host_syncs'] or 'none'}")
    print(f"\none step at the default budget, {device} time per kernel (us):")
    for key, count, us in out["profile_us"]:
        print(f"  {us:10.0f}  x{count:<4d} {key}")
    print(f"\nthe same step: {span:.0f} us from its first {device} op to its last, {idle:.0f} us "
          f"idle between them ({len(ran)} ops), {host_bound:.0f} us of it waiting for the host "
          "to launch the next op; largest gaps (us, before -> after; host launch time - gap "
          "start, us; the host ops that launched it):")  # fmt: skip
    for g, late, where in gaps[:8]:
        late = "?" if late is None else f"{late:+.0f}"
        print(f"  {g.us:10.0f}  {g.before} -> {g.after}\n{'':14s}launch {late} us: {where}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as p:
            for _ in range(2):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
        p.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
