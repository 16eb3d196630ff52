"""Reporting: the text table, a BENCHMARKS.md section, the plot, and facts about the machine."""

from __future__ import annotations

import os
import time

import torch

from .cases import Row, parse_shape
from .registry import OPS


def format_table(rows: list[Row]) -> str:
    head = ["op", "shape", "dtype", "method", "ms", "speed-up", "tok/s", "extra MiB",
            "mem ratio", "value err", "grad err", "roofline", "status"]  # fmt: skip

    def f(v, spec, unit=""):
        return "-" if v is None else format(v, spec) + unit

    lines = [head]
    for r in rows:
        roof = None if r.roofline is None else 100 * r.roofline
        tps = None if r.tokens_per_s is None else r.tokens_per_s / 1e3
        lines.append([
            r.op, r.shape, r.dtype, r.method, f(r.time_ms, ".1f"), f(r.speedup, ".2f", "x"),
            f(tps, ".1f", "k"), f(r.extra_mib, ".0f"), f(r.mem_ratio, ".2f"),
            f(r.value_err, ".1e"), f(r.grad_err, ".1e"), f(roof, ".0f", "%"),
            r.status + (f" ({r.note})" if r.note else ""),
        ])  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def failures(rows: list[Row]) -> str:
    """The whole message of each row that raised, one line each ('' if none): the table's notes
    are shortened."""
    return "\n".join(
        f"{r.op} {r.shape} {r.dtype} {r.method}: {r.status}: {' '.join(r.error.split())}"
        for r in rows
        if r.error
    )


def machine_facts(device: str, bandwidth: float) -> dict:
    """What the numbers were measured on."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu x{os.cpu_count()}"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            name = f"{models[0]} x{os.cpu_count()}" if models else name
    return {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stream_GBps": bandwidth / 1e9,
        "date": time.strftime("%Y-%m-%d"),
    }


def backend_note(facts: dict) -> str:
    """Which backend our rows ran on, in words: the reference one is plain PyTorch, not kernels."""
    backend = facts.get("backend", "?")
    if backend == "reference":
        return "our rows on the reference backend (plain PyTorch, not our kernels)"
    return f"our rows on the {backend} backend"


def _x(r: Row) -> int:
    """A row's place on the plot's x axis: its vocabulary size or its tokens, as its op says."""
    return parse_shape(r.shape)[-1] if OPS[r.op].x_axis == "vocabulary size" else r.tokens


def plot(rows: list[Row], facts: dict, path: str) -> None:
    """A PNG: median time (top) and extra peak memory (bottom) against the vocabulary size or the
    tokens, one column of panels per op, one line per method (dashed: a second dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter, NullLocator

    ops = list(dict.fromkeys(r.op for r in rows))
    methods = dict.fromkeys(r.method for r in rows if r.time_ms is not None)
    tab20 = plt.get_cmap("tab20")  # 10 hues, then their light variants
    colors = {m: tab20((2 * i) % 20 + (2 * i) // 20 % 2) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2, len(ops), figsize=(4.6 * len(ops), 7.5), squeeze=False)
    for j, op in enumerate(ops):
        timed = [r for r in rows if r.op == op and r.time_ms is not None]
        dtypes = list(dict.fromkeys(r.dtype for r in timed))
        for method, dtype in dict.fromkeys((r.method, r.dtype) for r in timed):
            line = sorted((r for r in timed if (r.method, r.dtype) == (method, dtype)), key=_x)
            xs = [_x(r) for r in line]
            label = method + (f" {dtype}" if len(dtypes) > 1 else "")
            label += " (WRONG)" if any(r.status == "WRONG" for r in line) else ""
            style = {"color": colors[method], "marker": "o", "label": label,
                     "linestyle": "--" if dtypes.index(dtype) else "-"}  # fmt: skip
            axes[0, j].plot(xs, [r.time_ms for r in line], **style)
            mem = [(x, r.extra_mib) for x, r in zip(xs, line, strict=True) if r.extra_mib]
            if mem:
                axes[1, j].plot(*zip(*mem, strict=True), **style)
        axes[0, j].set(title=op, ylabel="ms per fwd+bwd step (median)")
        axes[1, j].set(ylabel="extra peak MiB", xlabel=OPS[op].x_axis)
        ticks = sorted({_x(r) for r in timed})
        for ax in axes[:, j]:  # log scales, ticks at the measured points, plain numbers
            ax.set(xscale="log", yscale="log")
            ax.set_xticks(ticks, [f"{x:,}" for x in ticks], minor=False)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(EngFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        axes[0, j].legend(fontsize=7)
    fig.suptitle(
        f"dpo-kernels bench: {facts['device']}, torch {facts['torch']}, {facts['threads']} "
        f"threads, {facts['date']}; {backend_note(facts)}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_section(rows: list[Row], facts: dict, title: str) -> str:
    """A BENCHMARKS.md section: a heading, the machine and command, and the rows as a table."""
    head = ["op", "shape", "dtype", "method", "ms", "speed-up", "tok/s", "extra MiB",
            "mem ratio", "value err", "grad err", "roofline", "status"]  # fmt: skip

    def f(v, spec, unit=""):
        return "-" if v is None else format(v, spec) + unit

    lines = [
        f"## {title}",
        "",
        f"Device: {facts['device']}; torch {facts['torch']}; {backend_note(facts)}; measured "
        "copy bandwidth "
        f"{facts['stream_GBps']:.1f} GB/s; date {facts['date']}. Command: "
        f"`{facts.get('command', 'dpo-kernels bench')}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        roof = None if r.roofline is None else 100 * r.roofline
        tps = None if r.tokens_per_s is None else r.tokens_per_s / 1e3
        cells = [
            r.op, r.shape, r.dtype, r.method, f(r.time_ms, ".2f"), f(r.speedup, ".2f", "x"),
            f(tps, ".1f", "k"), f(r.extra_mib, ".0f"), f(r.mem_ratio, ".2f"),
            f(r.value_err, ".1e"), f(r.grad_err, ".1e"), f(roof, ".0f", "%"),
            r.status + (f" ({r.note})" if r.note else ""),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_section(path: str, section: str) -> None:
    """Puts `section` into the markdown file at `path`, replacing a section with the same heading
    (its first line) up to the next `## ` heading, or appending it."""
    heading = section.splitlines()[0]
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n") == heading), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))  # fmt: skip
        tail = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    with open(path, "w") as f:
        f.write(text)
