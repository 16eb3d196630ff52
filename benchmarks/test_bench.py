"""pytest-benchmark versions of the `dpo-kernels bench` cases (not part of the default test run).

    pytest benchmarks/ --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]

One benchmark per (op, shape, dtype, method) of the quick grid (every op), grouped by op, shape
and dtype, so `--benchmark-compare` lines up the same case across commits. Every method's output
is checked against the float64 reference before it is timed.
"""

import functools

import pytest
import torch

from dpo_kernels import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    (case, method)
    for cases in bench.QUICK_GRID.values()
    for case in cases
    for method in bench.OPS[case.op].methods
]


@functools.cache
def expected(case: bench.Case):
    return bench.expected(case, DEVICE)


@pytest.mark.parametrize(
    "case,method", CASES, ids=[f"{c.op}-{c.label}-{c.dtype}-{m.name}" for c, m in CASES]
)
def test_fwd_bwd(benchmark, case, method):
    reason = method.skip(DEVICE)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{case.op} {case.label} {case.dtype}"
    step = method.build(case, DEVICE)
    out = step()  # the warm-up, and the result to check
    if out is not None:
        *_, ok = bench.check(out, expected(case), case.dtype)
        assert ok, f"{method.name} is wrong on {case}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=0)
