"""Command line: `dpo-kernels bench` and `dpo-kernels build` (also `python -m dpo_kernels ...`)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


class Progress:
    """Which method of which case is running: a tqdm bar on stderr, or one stderr line each."""

    def __init__(self, total: int) -> None:
        self.total, self.started = total, 0
        self.bar = None
        if importlib.util.find_spec("tqdm"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="method", leave=False)

    def __call__(self, label: str) -> None:
        self.started += 1
        if self.bar is None:
            print(f"[{self.started}/{self.total}] {label}", file=sys.stderr, flush=True)
        else:
            self.bar.set_description_str(label, refresh=False)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _dtypes_of(cases: list) -> list[str]:
    return sorted({c.dtype for c in cases}) or ["fp32"]


def _grid(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    """The cases to run: the default (or quick) grid of the chosen ops, or --shapes, in --dtype."""
    from . import bench

    ops = a.ops.split(",")
    unknown = set(ops) - set(bench.OPS)
    if unknown:
        p.error(f"unknown op(s) {sorted(unknown)}; choose from {sorted(bench.OPS)}")
    base = bench.QUICK_GRID if a.quick else bench.DEFAULT_GRID
    grid = {op: list(base.get(op, [])) for op in ops}
    if a.shapes is not None:
        try:
            shapes = [bench.parse_shape(s) for s in a.shapes.split(",")]
        except ValueError:
            p.error(f"--shapes takes shapes like 4x512x32000, got {a.shapes!r}")
        for op in ops:
            dims = bench.OPS[op].dims
            bad = [s for s in shapes if len(s) != len(dims.split("x")) or min(s) < 1]
            if bad:
                rank = {len(s) for s in shapes}
                fits = [o for o, c in bench.OPS.items() if {len(c.dims.split("x"))} == rank]
                hint = ""
                if len(rank) == 1 and len(dims.split("x")) not in rank and fits:
                    hint = f"pass --ops with ops that take them ({', '.join(fits)})"
                p.error(f"op {op} takes shapes {dims} (positive), got {bad}; {hint}".rstrip("; "))
            if dims.startswith("PxT") and any(s[1] < 2 for s in shapes):  # trainer steps
                p.error(f"op {op} takes T >= 2 (with one token per row no next token is scored)")
            if dims.startswith("PxT") and any(s[2] < 3 for s in shapes):
                p.error(f"op {op} takes V >= 3 (token ids 0 and 1 are padding and EOS; the "
                        "random words are drawn from 2..V-1)")  # fmt: skip
            odd = [s for s in shapes if bench.OPS[op].pairs and s[0] % 2]
            if odd:
                p.error(f"op {op} takes B = 2P rows [chosen; rejected] (an even B), got {odd}")
        grid = {
            op: [bench.Case(op, s, d) for s in shapes for d in _dtypes_of(cases)]
            for op, cases in grid.items()
        }
    if a.dtype is not None:
        dts = a.dtype.split(",")
        bad = set(dts) - set(bench.DTYPES)
        if bad:
            p.error(f"unknown dtype(s) {sorted(bad)}; choose from {sorted(bench.DTYPES)}")
        grid = {
            op: list(dict.fromkeys(bench.Case(op, c.shape, d) for c in cs for d in dts))
            for op, cs in grid.items()
        }
    for op, cases in grid.items():
        supported = bench.OPS[op].dtypes
        grid[op] = [c for c in cases if c.dtype in supported]
        if cases and not grid[op]:
            asked = {c.dtype for c in cases}
            others = [o for o, spec in bench.OPS.items() if asked <= set(spec.dtypes)]
            p.error(
                f"op {op} runs in {','.join(supported)} only; choose ops that run in "
                f"{','.join(sorted(asked))} with --ops (among {','.join(others)})"
            )
    return grid


def build_command(variant: str | None) -> int:
    """Builds (or finds in the cache) the C++ CPU kernels, retrying a failed build, and loads this
    CPU's variant to check it; prints where they are. Exit status 1 if a build fails."""
    from . import _build

    mine = _build.variant_for_this_cpu()
    variants = list(_build.VARIANTS) if variant == "all" else [variant or mine]
    status = 0
    for v in variants:
        try:
            print(f"{v}: {_build.build(v, force=True)}")
        except (_build.BuildError, OSError) as exc:  # OSError: say, a read-only cache folder
            print(f"dpo_kernels: could not build the {v} C++ CPU kernels: {exc}", file=sys.stderr)
            status = 1
    if mine in variants and status == 0:
        if _build.load() != mine:
            print(
                f"dpo_kernels: could not load the kernels: {_build.load_error()}", file=sys.stderr
            )
            return 1
        print(f"loaded: torch.ops.dpo_kernels_cpu ({torch.ops.dpo_kernels_cpu.build_info()})")
    return status


def main(argv: list[str] | None = None) -> int:
    from . import bench

    p = argparse.ArgumentParser(prog="dpo-kernels")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="fused ops vs naive PyTorch and peers: time, memory, error")
    b.add_argument("--quick", action="store_true", help="one small case per op")
    b.add_argument(
        "--ops",
        default=",".join(bench.DEFAULT_OPS),
        help=f"comma-separated ops among {','.join(bench.OPS)} (default: %(default)s)",
    )
    b.add_argument(
        "--shapes",
        help="comma-separated shapes replacing the grid: "
        + ", ".join(f"{op} {o.dims}" for op, o in bench.OPS.items()),
    )
    b.add_argument("--dtype", help="comma-separated dtypes among fp32,bf16,fp16")
    b.add_argument(
        "--reps", type=_positive, default=5, help="timed repetitions per method (default: 5)"
    )
    b.add_argument("--no-memory", action="store_true", help="skip the per-method memory probes")
    b.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    b.add_argument("--json", help="write rows and machine facts to this file")
    b.add_argument("--plot", help="write a PNG of time and memory against vocabulary or tokens")
    k = sub.add_parser(
        "build",
        help="compile the C++ CPU kernels for this torch and CPU now, into the cache (CI, Docker)",
    )
    k.add_argument(
        "--variant",
        choices=["avx512", "avx2", "default", "all"],
        help="the CPU variant(s) to build (default: the one this CPU runs)",
    )
    a, extra = p.parse_known_args(argv)
    if extra:  # with the subcommand's usage, not the top level's
        (b if a.command == "bench" else k).error(f"unrecognized arguments: {' '.join(extra)}")
    if a.command == "build":
        return build_command(a.variant)

    if a.plot and not importlib.util.find_spec("matplotlib"):
        b.error("--plot needs matplotlib: pip install 'dpo-kernels[bench]'")
    if a.device == "cuda" and not torch.cuda.is_available():
        b.error("--device cuda: this torch sees no CUDA device (a CPU build, or no GPU here)")
    for flag, path in (("--json", a.json), ("--plot", a.plot)):  # before the run, not after it
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not path or os.path.isdir(path):
            b.error(f"{flag} {path!r}: give a file name to write")
        if not os.path.isdir(folder):
            b.error(f"{flag} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            b.error(f"{flag} {path}: the folder {folder} is not writable")
    if a.plot:
        from matplotlib.figure import Figure

        kinds = Figure().canvas.get_supported_filetypes()
        suffix = os.path.splitext(a.plot)[1].lstrip(".").lower()
        if suffix not in kinds:
            b.error(f"--plot {a.plot}: name a file ending in one of .{', .'.join(sorted(kinds))}")
    grid = _grid(b, a)
    try:  # a bad DPO_KERNELS_BACKEND: now, not as a FAILED row of every case after the run
        from . import resolve_backend

        resolve_backend(None, torch.device(a.device))
    except (ValueError, RuntimeError) as exc:
        b.error(" ".join(str(exc).split()))
    if a.device == "cpu":  # DeepSpeed (a TRL peer's import) would print its accelerator guess
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # on stdout, into the table
    progress = Progress(sum(len(bench.OPS[c.op].methods) for cs in grid.values() for c in cs))
    try:
        rows, facts = bench.run(grid, a.device, a.reps, not a.no_memory, progress)
    finally:
        progress.close()
    facts["command"] = " ".join(["dpo-kernels", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"# {facts['device']}, torch {facts['torch']}, {facts['threads']} threads, "
        f"stream {facts['stream_GBps']:.1f} GB/s, {facts['date']}; "
        + bench.report.backend_note(facts)
    )
    print(bench.format_table(rows))
    if failed_rows := bench.failures(rows):
        print("\nfailures:\n" + failed_rows)
    if a.json:
        import dataclasses
        import json

        with open(a.json, "w") as f:
            json.dump({"facts": facts, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    if a.plot:
        bench.plot(rows, facts, a.plot)
    ours = {(op, m.name) for op, o in bench.OPS.items() for m in o.methods if m.ours}
    # FAILED: ours raised, or the float64 reference did (nothing could be checked)
    failed = any(r.status == "FAILED" or (r.status == "WRONG" and (r.op, r.method) in ours)
                 for r in rows)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
