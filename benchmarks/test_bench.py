"""pytest-benchmark versions of the `dpo-kernels bench` cases (not part of the default test run).

    pytest benchmarks/ --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]

One benchmark per (op, shape, dtype, method), grouped by op, shape and dtype, so
`--benchmark-compare` lines up the same case across commits. Every method's output is checked
against the float64 reference before it is timed.
"""

import pytest
import torch

from dpo_kernels import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    (case, name, builder, available)
    for cases in bench.QUICK_GRID.values()
    for case in cases
    for name, builder, available in bench.METHODS[case.op]
]


@pytest.mark.parametrize(
    "case,name,builder,available",
    CASES,
    ids=[f"{c.op}-{c.label}-{c.dtype}-{n}" for c, n, _, _ in CASES],
)
def test_fwd_bwd(benchmark, case, name, builder, available):
    reason = available()
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{case.op} {case.label} {case.dtype}"
    step = builder(case, DEVICE)
    _, ok = bench.max_error(step(), bench.expected(case, DEVICE))
    assert ok, f"{name} is wrong on {case}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
