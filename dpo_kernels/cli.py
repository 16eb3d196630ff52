"""Command line: `dpo-kernels bench` (also `python -m dpo_kernels bench`)."""

from __future__ import annotations

import argparse
import sys

import torch


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.lower().split("x"))


def main(argv: list[str] | None = None) -> int:
    from . import bench

    p = argparse.ArgumentParser(prog="dpo-kernels")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="fused ops vs naive PyTorch and peers: time, memory, error")
    b.add_argument("--quick", action="store_true", help="one small case per op")
    b.add_argument("--ops", default=",".join(bench.DEFAULT_GRID), help="comma-separated ops")
    b.add_argument("--shapes", help="comma-separated shapes like 4x512x32000 (replace the grid)")
    b.add_argument("--dtype", help="comma-separated dtypes among fp32,bf16,fp16")
    b.add_argument("--reps", type=int, default=5, help="timed repetitions per method")
    b.add_argument("--no-memory", action="store_true", help="skip the per-method memory probes")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--json", help="write rows and machine facts to this file")
    a = p.parse_args(argv)

    grid = bench.QUICK_GRID if a.quick else bench.DEFAULT_GRID
    ops = a.ops.split(",")
    unknown = set(ops) - set(bench.METHODS)
    if unknown:
        p.error(f"unknown op(s) {sorted(unknown)}; choose from {sorted(bench.METHODS)}")
    grid = {op: list(grid.get(op, [])) for op in ops}
    if a.shapes:
        shapes = [_parse_shape(s) for s in a.shapes.split(",")]
        dtypes = sorted({c.dtype for cs in grid.values() for c in cs}) or ["fp32"]
        grid = {op: [bench.Case(op, s, d) for s in shapes for d in dtypes] for op in ops}
    if a.dtype:
        dts = a.dtype.split(",")
        bad = set(dts) - set(bench.DTYPES)
        if bad:
            p.error(f"unknown dtype(s) {sorted(bad)}; choose from {sorted(bench.DTYPES)}")
        grid = {
            op: list(dict.fromkeys(bench.Case(op, c.shape, d) for c in cs for d in dts))
            for op, cs in grid.items()
        }

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows, facts = bench.run(grid, a.device, a.reps, not a.no_memory, progress)
    print(
        f"# {facts['device']}, torch {facts['torch']}, {facts['threads']} threads, "
        f"stream {facts['stream_GBps']:.1f} GB/s, {facts['date']}"
    )
    print(bench.format_table(rows))
    if a.json:
        import dataclasses
        import json

        with open(a.json, "w") as f:
            json.dump({"facts": facts, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return 1 if any(r.status == "WRONG" and r.method == "dpo_kernels" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
