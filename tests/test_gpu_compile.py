"""Every Triton kernel compiles for sm_80 and sm_90 with no GPU; no spills; at most 128 registers;
128-bit vocabulary loads (and stores in the backward) at every vocabulary size, aligned or not.

The test compiles `gpu_check --quick` (V = 32000 and 32001: a multiple of 16 and an odd size; the
other sizes of the full grid compile to the same kernels, so `python -m dpo_kernels.gpu_check`
prints them too, at a few times the cost)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_kernels.gpu_check", "--quick", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout)  # the table of registers and load widths, shown with pytest -s
    assert out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_both_archs(reports):
    compiled = {(r["kernel"], r["arch"]) for r in reports}
    kernels = {r["kernel"] for r in reports}
    assert kernels, "no kernel was compiled"
    assert "_sibling_loss_kernel" in kernels  # CPO / ORPO / KTO losses
    assert "_scale_kernel" in kernels  # the fused linear losses' backward
    assert compiled == {(k, a) for k in kernels for a in (80, 90)}


def test_no_local_memory_spills(reports):
    spilled = [(r["case"], r["kernel"], r["arch"]) for r in reports if r["local_bytes"]]
    assert not spilled


def test_at_most_128_registers(reports):
    # 128 registers per thread keep 2 programs of 8 warps (16 warps) resident per SM at least.
    heavy = [(r["case"], r["kernel"], r["arch"], r["registers"]) for r in reports
             if r["registers"] > 128]  # fmt: skip
    assert not heavy


def test_cases_name_their_vocabulary(reports):
    vocab_cases = {r["case"] for r in reports if r["kernel"].startswith(("_logprobs", "_linear"))}
    assert all("V=" in c for c in vocab_cases)
    for V in (32000, 32001):  # aligned and odd rows, for each path and dtype
        for kind in ("logprobs_fwd", "logprobs_bwd", "linear"):
            for dtype in ("bfloat16", "float16", "float32"):
                assert any(c.startswith(f"{kind} {dtype} V={V}") for c in vocab_cases)
    assert any("stats" in c for c in vocab_cases) and any("ref" in c for c in vocab_cases)


def test_vocab_loops_use_128_bit_accesses(reports):
    # Every kernel streams a vocabulary row (of logits, or of a projection tile); the backward
    # kernels also write one (the logits' gradient, or the tile overwritten with it).
    assert {"_linear_fwd_kernel", "_linear_bwd_kernel"} <= {r["kernel"] for r in reports}
    for r in reports:
        if r["kernel"].startswith(("_logprobs", "_linear", "_scale")):
            assert r["global_loads"].get("LDG.E.128", 0) > 0, (r["case"], r["global_loads"])
        if r["kernel"] in (
            "_logprobs_bwd_kernel",
            "_linear_bwd_kernel",
            "_scale_kernel",
        ):
            assert r["global_stores"].get("STG.E.128", 0) > 0, (r["case"], r["global_stores"])
