"""Interleaved timing of the linear_dpo case: ours fused, ours unfused, CCE and the 3 plain
matmuls, one step of each in turn per round, so that a shared machine's load hits all of them
alike; prints each method's median over the rounds and its ratio to CCE's, with the load average.

    PYTHONPATH=. python benchmarks/linear_dpo_interleaved.py [--shape 8x256x512x32000] [--rounds 7]
        [--methods fused,unfused,cce,matmuls,matmuls_4chunks,matmuls_4chunks_vocab] [--threads N]

`matmuls_4chunks`: the same 3 matmuls in one chunk per pair (P chunks), as the fused op runs
them at the default budget, each projection one `torch.mm`; `matmuls_4chunks_vocab`: the same with
the projection split by vocabulary over the threads, as the fused op projects on CPU
(csrc/vocab_blocked_mm.cpp). The two differ only in how each chunk is projected.
`project_4chunks` / `project_4chunks_vocab`: only the projections of those two.
`buffers_fresh` / `buffers_reused`: one pair's float32 tile and the float32 weight gradient
written once, freshly allocated (as the fused op's are each step) or reused: the difference is
what first touching fresh memory (page faults) costs a step.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import torch

from dpo_kernels import _build, bench
from dpo_kernels.bench import peers


def chunked_matmuls(case: bench.Case, chunks: int, by_vocab: bool = False, only_project=False):
    """The 3 plain matmuls of the fused op over the counted tokens, in `chunks` row chunks (as
    the fused op runs them, one pair per chunk at the default budget): what chunking costs.
    by_vocab: each chunk projected by the C++ op that splits the vocabulary over the threads;
    only_project: the projections alone."""
    if by_vocab:
        _build.load()
        project = torch.ops.dpo_kernels_cpu.vocab_blocked_mm
    else:

        def project(out, h, w):
            torch.mm(h, w.T, out=out)

    hidden, weight, _, mask = peers.linear_inputs(case, "cpu")
    h = hidden[mask]
    dz = torch.randn(h.shape[0], weight.shape[0])
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(weight)
    bounds = [h.shape[0] * i // chunks for i in range(chunks + 1)]

    def step():
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            project(z[a:b], h[a:b], weight)
            if only_project:
                continue
            torch.mm(dz[a:b], weight, out=dh[a:b])
            if i == 0:
                torch.mm(dz[a:b].T, h[a:b], out=dw)
            else:
                dw.addmm_(dz[a:b].T, h[a:b])

    return step


def buffers(case: bench.Case, fresh: bool):
    """One pair's float32 tile and the float32 weight gradient, filled once: freshly allocated
    (first touch, as in the fused op) or reused."""
    _, weight, _, mask = peers.linear_inputs(case, "cpu")
    tile = (int(mask.sum()) // (case.shape[0] // 2), weight.shape[0])
    kept = torch.empty(tile), torch.empty_like(weight)

    def step():
        for t in (torch.empty(tile), torch.empty_like(weight)) if fresh else kept:
            t.fill_(1.0)

    return step


BUILDERS = {
    "fused": peers.ldpo_fused,
    "unfused": peers.ldpo_unfused,
    "cce": peers.ldpo_cce,
    "matmuls": peers.ldpo_matmuls,
    "matmuls_4chunks": lambda case, _: chunked_matmuls(case, case.shape[0] // 2),
    "matmuls_4chunks_vocab": lambda case, _: chunked_matmuls(case, case.shape[0] // 2, True),
    "project_4chunks": lambda case, _: chunked_matmuls(case, case.shape[0] // 2, False, True),
    "project_4chunks_vocab": lambda case, _: chunked_matmuls(case, case.shape[0] // 2, True, True),
    "buffers_fresh": lambda case, _: buffers(case, True),
    "buffers_reused": lambda case, _: buffers(case, False),
}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 1, got {text!r}")
    return int(text)


def _parse(argv) -> argparse.Namespace:
    """The flags, checked: an unknown method, a shape not BxTxHxV with an even B, or a count
    below 1 is an argparse error."""
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8x256x512x32000", help="BxTxHxV, B = 2P rows (even)")
    p.add_argument("--rounds", type=_positive, default=7)
    p.add_argument("--methods", default="fused,unfused,cce,matmuls",
                   help=f"comma-separated among {','.join(BUILDERS)}")  # fmt: skip
    p.add_argument(
        "--threads", type=_positive, default=None, help="torch threads (default: torch's)"
    )
    args = p.parse_args(argv)
    unknown = [n for n in args.methods.split(",") if n not in BUILDERS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {','.join(BUILDERS)}")
    try:
        shape = bench.parse_shape(args.shape)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1 or shape[0] % 2:
        p.error(f"--shape takes BxTxHxV (positive, B = 2P rows: even), got {args.shape!r}")
    args.shape_ints = shape
    return args


def main(argv=None) -> dict[str, float]:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    case = bench.Case("linear_dpo", args.shape_ints, "fp32")
    names = args.methods.split(",")
    steps = {n: BUILDERS[n](case, "cpu") for n in names}
    for step in steps.values():  # warm-up (compiles CCE's kernels)
        step()
        step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n, step in steps.items():
            if hasattr(step, "release"):
                step.release()
            t0 = time.perf_counter()
            step()
            times[n].append((time.perf_counter() - t0) * 1e3)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(
        f"shape {args.shape} fp32, {torch.get_num_threads()} threads, rounds {args.rounds}, "
        f"load average {os.getloadavg()}"
    )
    for n in names:
        ratio = f"  {med[n] / med['cce']:.3f}x cce" if "cce" in med else ""
        print(f"{n:16s} {med[n]:8.1f} ms (min {min(times[n]):.1f}){ratio}")
    return med


if __name__ == "__main__":
    main()
