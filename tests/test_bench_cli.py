"""`dpo-kernels bench`: flags, the table, WRONG marking, --json and --plot (tiny cases, no timing
assertions: the numbers themselves live in BENCHMARKS.md)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_kernels import bench, cli

TINY = ["--ops", "logprobs", "--shapes", "1x8x50,1x8x90", "--dtype", "fp32", "--reps", "1"]


def test_import_dpo_kernels_leaves_out_the_benchmark_and_the_gpu_check():
    """The benchmark (peers, trainers, plots) and the GPU compile check are tools, not the
    library: `import dpo_kernels` must not load them. (torch itself loads
    torch.utils.throughput_benchmark: only our modules are looked at.)"""
    code = (
        "import sys, dpo_kernels; print([m for m in sys.modules if m.startswith('dpo_kernels') "
        "and ('bench' in m or 'gpu_check' in m)])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture(autouse=True)
def _no_bandwidth_probe(monkeypatch):
    monkeypatch.setattr(bench, "stream_bandwidth", lambda device: 1e10)


@pytest.fixture
def grids(monkeypatch):
    """The grids main() would run, without running them."""
    seen = []

    def fake_run(grid, device, reps, memory, progress):
        seen.append(grid)
        return [], bench.machine_facts(device, 1e10)

    monkeypatch.setattr(bench, "run", fake_run)
    return seen


def test_every_op_has_a_grid_with_two_points_to_plot_and_a_quick_case(grids):
    assert cli.main(["bench"]) == 0
    assert list(grids[-1]) == list(bench.DEFAULT_OPS)
    cli.main(["bench", "--ops", ",".join(bench.OPS)])
    for op, cases in grids[-1].items():
        by_vocab = bench.OPS[op].x_axis == "vocabulary size"
        assert len({c.shape[-1] if by_vocab else c.shape for c in cases}) >= 2, op
        assert bench.QUICK_GRID[op], op


def test_shapes_dtypes_and_ops_select_the_cases(grids):
    cli.main(["bench", "--ops", "logprobs,linear", "--quick"])
    assert set(grids[-1]) == {"logprobs", "linear"}
    cli.main(["bench", "--ops", "logprobs", "--shapes", "2x16x100,4x16x100", "--dtype", "bf16"])
    assert grids[-1] == {
        "logprobs": [bench.Case("logprobs", (2, 16, 100), "bf16"),
                     bench.Case("logprobs", (4, 16, 100), "bf16")]
    }  # fmt: skip
    cli.main(["bench", "--ops", "dpo_step,logprobs", "--dtype", "fp32,bf16"])
    assert {c.dtype for c in grids[-1]["dpo_step"]} == {"fp32"}  # it runs in fp32 only


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ops", "softmax"], "unknown op"),
        (["--dtype", "fp8"], "unknown dtype"),
        (["--ops", "linear", "--shapes", "4x512x32000"], "linear takes shapes BxTxHxV"),
        (["--shapes", "4x512x32000"], "pass --ops with ops that take them (logprobs, dpo_step"),
        (["--ops", "logprobs", "--shapes", "4x0x32000"], "positive"),
        (["--shapes", "4by512"], "--shapes takes shapes like"),
        (["--ops", "dpo_step", "--dtype", "bf16"], "dpo_step runs in fp32 only"),
        (["--reps", "0"], "must be at least 1"),
        (["--device", "tpu"], "invalid choice"),
        (["--speed"], "unrecognized arguments"),
        (["--dtype", ""], "unknown dtype"),
        (["--json", "/no-such-folder/rows.json"], "the folder /no-such-folder does not exist"),
        (["--plot", "/no-such-folder/plot.png"], "the folder /no-such-folder does not exist"),
        (["--json", "/tmp"], "give a file name to write"),
        (["--json", ""], "give a file name to write"),
        (["--plot", "/tmp/plot.xyz"], "name a file ending in one of"),
        (["--ops", "linear_dpo", "--shapes", "3x8x16x64"], "an even B"),
        (["--ops", "dpo_step", "--shapes", "1x1x64"], "takes T >= 2"),
        (["--reps", "abc"], "takes a whole number, got 'abc'"),
        (["--dtype", "bf16"], "choose ops that run in bf16 with --ops"),
        pytest.param(
            ["--device", "cuda"],
            "sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_flags_are_rejected(grids, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not grids


def test_plot_without_matplotlib_is_rejected_before_running(grids, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name)
    )
    with pytest.raises(SystemExit):
        cli.main(["bench", "--plot", "out.png"])
    assert "pip install 'dpo-kernels[bench]'" in capsys.readouterr().err
    assert not grids


def _with_method(monkeypatch, op: str, method: bench.Method) -> None:
    spec = bench.OPS[op]
    monkeypatch.setitem(bench.OPS, op, dataclasses.replace(spec, methods=[*spec.methods, method]))


def _off_by_one_percent(case, device):
    step = bench.peers.naive(case, device)
    return lambda: (lambda values, grads: (values * 1.01, grads))(*step())


def _raises(case, device):
    raise RuntimeError("this peer does not run here")


def test_a_wrong_answer_is_marked_wrong_and_a_failing_peer_is_skipped(monkeypatch, capsys):
    _with_method(monkeypatch, "logprobs", bench.Method("fast.but.wrong", _off_by_one_percent))
    _with_method(monkeypatch, "logprobs", bench.Method("broken", _raises))
    assert cli.main(["bench", *TINY, "--no-memory"]) == 0  # a wrong peer is not our failure
    table = capsys.readouterr().out
    rows = {line.split()[3]: line for line in table.splitlines() if line.startswith("logprobs")}
    assert rows["fast.but.wrong"].rstrip().endswith("WRONG")
    assert rows["dpo_kernels"].rstrip().endswith("ok")
    assert "skipped (RuntimeError: this peer does not run here)" in rows["broken"]
    assert table.splitlines()[1].split()[:4] == ["op", "shape", "dtype", "method"]


def test_exit_status_is_1_when_ours_is_wrong(monkeypatch):
    wrong = bench.Method("ours.wrong", _off_by_one_percent, ours=True)
    _with_method(monkeypatch, "logprobs", wrong)
    assert cli.main(["bench", *TINY, "--no-memory"]) == 1


def test_exit_status_is_1_when_ours_fails(monkeypatch, capsys):
    """A peer that raises is a skipped row; ours raising is a FAILED row and exit status 1."""
    _with_method(monkeypatch, "logprobs", bench.Method("ours.broken", _raises, ours=True))
    assert cli.main(["bench", *TINY, "--no-memory"]) == 1
    table, below = capsys.readouterr().out.split("\nfailures:\n")  # the whole messages below
    rows = [line for line in table.splitlines() if "ours.broken" in line]
    assert rows and all("FAILED (RuntimeError: this peer does not run here)" in r for r in rows)
    assert below.count("ours.broken: FAILED: RuntimeError: this peer does not run here") == 2


def test_json_has_the_facts_and_one_row_per_case_and_method(tmp_path):
    path = tmp_path / "rows.json"
    assert cli.main(["bench", *TINY, "--no-memory", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["facts"]["command"].startswith("dpo-kernels bench --ops logprobs")
    methods = [m.name for m in bench.OPS["logprobs"].methods]
    assert [(r["shape"], r["method"]) for r in data["rows"]] == [
        (s, m) for s in ("1x8x50", "1x8x90") for m in methods
    ]
    naive = data["rows"][0]
    assert naive["speedup"] == 1.0 and naive["tokens"] == 8 and naive["status"] == "ok"
    assert all(r["value_err"] < 1e-5 for r in data["rows"] if r["status"] == "ok")
    assert all(r["grad_err"] < 1e-5 for r in data["rows"] if r["status"] == "ok")


def test_memory_probe_runs_in_a_subprocess_and_gives_ratios(tmp_path, monkeypatch):
    spec = bench.OPS["logprobs"]
    ours = [m for m in spec.methods if m.name in ("naive", "dpo_kernels")]
    monkeypatch.setitem(bench.OPS, "logprobs", dataclasses.replace(spec, methods=ours))
    path = tmp_path / "rows.json"
    cli.main(["bench", "--ops", "logprobs", "--shapes", "2x64x2000", "--dtype", "fp32",
              "--reps", "1", "--json", str(path)])  # fmt: skip
    rows = json.loads(path.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["extra_mib"] is not None and r["extra_mib"] >= 0 for r in rows)
    assert rows[0]["mem_ratio"] == 1.0


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    assert cli.main(["bench", *TINY, "--no-memory", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_probes_run_one_at_a_time_and_sections_replace(tmp_path):
    from dpo_kernels import bench

    assert bench.probe_workers("cuda") == 1
    assert bench.probe_workers("cpu") >= 1
    facts = {"device": "GPU X", "torch": "2.x", "stream_GBps": 1.0, "date": "d", "command": "c"}
    row = bench.Row("logprobs", "2x8x37", "fp32", "ours", time_ms=1.5, status="ok")
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\n## CPU\n\ntext\n")
    bench.write_section(str(path), bench.markdown_section([row], facts, "CUDA: GPU X"))
    row.time_ms = 2.5
    bench.write_section(str(path), bench.markdown_section([row], facts, "CUDA: GPU X"))
    text = path.read_text()
    assert text.count("## CUDA: GPU X") == 1 and "| 2.50 |" in text and "| 1.50 |" not in text
    assert text.startswith("# Benchmarks\n\n## CPU\n\ntext\n")


def test_sibling_trainer_steps_match_their_float64_loss(tmp_path):
    """cpo_step, orpo_step, kto_step: the stock trainer and ours (fused head, logits) all within
    tolerance of the float64 loss and gradient (CPO/ORPO: the stock trainer in float64; KTO: its
    loss written in the bench), on one tiny pair."""
    pytest.importorskip("trl")
    path = tmp_path / "rows.json"
    ops = "cpo_step,orpo_step,kto_step"
    assert cli.main(["bench", "--ops", ops, "--shapes", "1x12x40", "--reps", "1", "--no-memory",
                     "--json", str(path)]) == 0  # fmt: skip
    rows = json.loads(path.read_text())["rows"]
    assert [(r["op"], r["method"]) for r in rows] == [
        (op, m.name) for op in ops.split(",") for m in bench.OPS[op].methods
    ]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["value_err"] < 1e-5 and r["grad_err"] < 1e-4, r
    # every sequence is T tokens of known words (prompt, completion, EOS): none merged or unknown
    _, batch = bench.siblings.sibling_trainer("kto_step", None, bench.Case("kto_step", (1, 12, 40),
                                              "fp32"), "cpu")  # fmt: skip
    assert batch["input_ids"].shape == (2, 12) and bool((batch["input_ids"] > 1).sum() == 2 * 11)


GPU_SCRIPT = Path(__file__).parent.parent / "benchmarks" / "linear_dpo_gpu.py"


def _gpu_script():
    spec = importlib.util.spec_from_file_location("linear_dpo_gpu", GPU_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_linear_dpo_gpu_idle_gaps():
    # benchmarks/linear_dpo_gpu.py's idle accounting, on intervals that nest and overlap: the
    # GPU is busy over their union, idle in the holes, and each hole names the op that ran last
    # before it (the one reaching furthest, not the last to start) and the one after it (with
    # its key, when the intervals carry one).
    script = _gpu_script()
    ops = [("e", 30, 31, 7), ("a", 0, 10, 1), ("b", 5, 8, 2), ("c", 12, 20, 3), ("d", 19, 25, 4),
           ("f", 22, 24, 5)]  # fmt: skip
    span, idle, gaps = script.idle_gaps(ops)
    assert (span, idle) == (31, 7)
    assert gaps == [(5, 25, "d", "e", 7), (2, 10, "a", "c", 3)]
    assert script.idle_gaps([(n, s, e) for n, s, e, _ in ops])[2][1] == (2, 10, "a", "c", None)
    assert script.idle_gaps(ops, top=1)[2] == gaps[:1]
    assert script.idle_gaps([]) == (0.0, 0.0, [])


def test_linear_dpo_gpu_late_launches():
    # Each gap is matched to the launch of the op after it (by correlation id): launched after
    # the gap began, the host was late by the difference; before it, the lateness is negative;
    # no launch record, None. The launch's host ops are named innermost first, up to 4.
    import types

    script = _gpu_script()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, start, eid, device=cpu, parent=None):
        return types.SimpleNamespace(name=name, id=eid, device_type=device, cpu_parent=parent,
                                     time_range=types.SimpleNamespace(start=start))  # fmt: skip

    mm = event("aten::mm", 90, 100, parent=event("aten::matmul", 80, 99))
    events = [
        event("cudaLaunchKernel", 95, 7, parent=mm),
        event("cuLaunchKernel", 8, 3),  # a Triton launch: no aten op around it
        event("aten::add", 50, 7),  # an op, not a launch: its id is not a correlation id
        event("gemm_kernel", 96, 7, device=cuda),
    ]
    launches = script.host_launches(events)
    assert launches == {7: (95, "aten::mm < aten::matmul"),
                        3: (8, "(no host op: a Triton launch)")}  # fmt: skip
    gaps = [script.Gap(5, 25, "d", "e", 7), script.Gap(2, 10, "a", "c", 3),
            script.Gap(1, 40, "x", "y", 11)]  # fmt: skip
    got = script.late_launches(gaps, launches)
    assert [(late, where) for _, late, where in got] == [
        (70, "aten::mm < aten::matmul"), (-2, "(no host op: a Triton launch)"), (None, "")
    ]  # fmt: skip
    assert [g for g, _, _ in got] == gaps


def test_linear_dpo_gpu_clock_samples():
    # nvidia-smi's lines parse to (epoch s, MHz, W), the unparsable ones left out; each side of a
    # paired run gets the median clock and mean power of the samples inside its calls' spans.
    import datetime

    script = _gpu_script()
    lines = ["2026/11/26 10:00:00.100, 1980, 120.50", "2026/11/26 10:00:00.110, 1755, 690.0",
             "2026/11/26 10:00:00.120, [N/A], 650.0", "2026/11/26 10:00:00.130, 1600, 700.0",
             "2026/11/26 10:00:00.14"]  # fmt: skip
    samples = script.parse_smi(lines)
    t0 = datetime.datetime(2026, 11, 26, 10, 0, 0, 100000).timestamp()
    assert [(round(t - t0, 3), m, w) for t, m, w in samples] == [
        (0.0, 1980.0, 120.5), (0.01, 1755.0, 690.0), (0.03, 1600.0, 700.0)
    ]  # fmt: skip
    got = script.during(samples, [(t0 + 0.005, t0 + 0.015), (t0 + 0.025, t0 + 0.05)])
    assert got == {"mhz": 1677.5, "watts": 695.0, "samples": 2}
    assert script.during(samples, [(t0 + 0.011, t0 + 0.029)]) is None
    assert script.clocks({"base_clock": None, "clock": got}) == "; step 1678 MHz 695 W"


def test_linear_dpo_gpu_smoke_run(tmp_path):
    # The whole script at a tiny shape on CPU, as a GPU session would run it (a crash found on a
    # lent GPU costs minutes of it): every section comes out, the budgets agree with each other.
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(GPU_SCRIPT), "--shape", "2x16x32x64", "--dtype", "fp32",
                    "--budgets", "0.000001,1", "--json", str(out)], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    data = json.loads(out.read_text())
    assert data["counted_tokens"] == 24 and len(data["fused"]) == 3
    for row in data["fused"]:  # the 1 KiB budget goes through the recompute route
        assert row["loss_diff"] < 1e-6 and row["dh_diff"] < 1e-5 and row["dw_diff"] < 1e-5, row
        for paired in (row["paired"], row["paired_busy"], row.get("after_self")):
            if paired is None:
                continue
            assert paired["rounds"] == 30
            assert paired["ratio_min"] <= paired["ratio"] <= paired["ratio_max"]
            assert paired["clock"] is None  # no nvidia-smi samples on CPU
    assert sum("after_self" in row for row in data["fused"]) == 1  # the default budget's
    assert data["idle_us"]["span"] > 0 and data["profile_us"]


# ------------------------------------------------------------------------------------------
# The checks: a NaN anywhere, a scaled gradient, an ignored incoming gradient are WRONG.

LINEAR = ["--ops", "linear", "--shapes", "1x8x16x64", "--dtype", "fp32", "--reps", "1",
          "--no-memory"]  # fmt: skip


def _only_naive_and(monkeypatch, op: str, method: bench.Method) -> None:
    spec = bench.OPS[op]
    monkeypatch.setitem(bench.OPS, op, dataclasses.replace(spec, methods=[spec.methods[0], method]))


def _nan_in_weight_grad(case, device):
    step = bench.peers.linear_naive(case, device)

    def nan_step():
        values, (dh, dw) = step()
        dw = dw.clone()
        dw[0, 0] = float("nan")
        return values, (dh, dw)

    return nan_step


def test_a_nan_in_a_later_gradient_is_wrong(monkeypatch, capsys):
    """max() over the gradients' errors dropped a NaN that was not the first one."""
    _only_naive_and(monkeypatch, "linear", bench.Method("ours.nan", _nan_in_weight_grad, ours=True))
    assert cli.main(["bench", *LINEAR]) == 1
    row = next(ln for ln in capsys.readouterr().out.splitlines() if "ours.nan" in ln)
    assert row.rstrip().endswith("WRONG") and "nan" in row


def _scaled_grad(case, device):
    step = bench.peers.naive(case, device)
    return lambda: (lambda values, grads: (values, (grads[0] * 1.015,)))(*step())


def _ignores_incoming_grad(case, device):
    """Right values, and the gradient of their plain sum whatever gradient comes in."""
    logits, labels, mask = bench.cases.logits_inputs(case, device)

    def step():
        z = logits.clone().requires_grad_()
        values = bench.peers._naive_logps(z, labels, mask)
        values.sum().backward()
        return values.detach(), (z.grad,)

    return step


@pytest.mark.parametrize("build", [_scaled_grad, _ignores_incoming_grad])
def test_an_fp32_gradient_off_by_a_little_is_wrong(monkeypatch, capsys, build):
    _only_naive_and(monkeypatch, "logprobs", bench.Method("ours.off", build, ours=True))
    assert cli.main(["bench", *TINY, "--no-memory"]) == 1
    rows = [ln for ln in capsys.readouterr().out.splitlines() if "ours.off" in ln]
    assert len(rows) == 2 and all(r.rstrip().endswith("WRONG") for r in rows)


def test_tolerances_are_per_dtype_and_the_incoming_gradient_is_not_uniform():
    assert bench.TOLERANCES["fp32"][1] < bench.TOLERANCES["fp16"][1] < bench.TOLERANCES["bf16"][1]
    g = bench.cases.incoming_grad(torch.zeros(64))
    assert len(set(g.tolist())) > 4 and (g != 1).all() and (g < 0).any() and (g > 0).any()
    assert torch.equal(g, bench.cases.incoming_grad(torch.zeros(64, dtype=torch.float64)).float())
    assert bench.cases.incoming_grad(torch.zeros(())) < 0  # a scalar's too: a sign error shows


def test_a_reference_missing_a_package_skips_the_case(monkeypatch, capsys):
    """A float64 reference that needs a missing package (the trainer ops' stock trainers without
    TRL) skips every row of the case with the reason, exit 0, as a missing peer does; a case
    whose every method is skipped does not compute its reference at all."""

    def needs_trl(case, device):
        raise ModuleNotFoundError("No module named 'trl'", name="trl")

    spec = bench.OPS["logprobs"]
    monkeypatch.setitem(bench.OPS, "logprobs", dataclasses.replace(spec, expected=needs_trl))
    assert cli.main(["bench", *TINY, "--no-memory"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("logprobs")]
    assert len(rows) == 2 * len(spec.methods)
    assert all("skipped (the float64 reference needs trl)" in r for r in rows)
    skipped = [dataclasses.replace(m, skip=lambda device: "not here") for m in spec.methods]
    monkeypatch.setitem(bench.OPS, "logprobs", dataclasses.replace(
        spec, methods=skipped, expected=_raises))  # fmt: skip
    assert cli.main(["bench", *TINY, "--no-memory"]) == 0


def test_the_warm_up_gradients_are_freed_before_the_turns(monkeypatch):
    """Timed in turns, every method of a case is alive at once: the gradients of each warm-up
    (checked, then of no use) are freed first, so the bench's peak holds one method's less."""
    from dpo_kernels.bench import measure

    turns = measure.time_steps_in_turn
    seen = []

    def spy(steps, reps):
        seen.extend(t.grad for s in steps if isinstance(s, bench.GradStep) for t in s.leaves)
        return turns(steps, reps)

    monkeypatch.setattr(bench, "time_steps_in_turn", spy)
    assert cli.main(["bench", *TINY, "--no-memory"]) == 0
    assert seen and all(g is None for g in seen)


# ------------------------------------------------------------------------------------------
# The backend our rows ran on; a bad DPO_KERNELS_BACKEND; whole failure messages.


def test_the_backend_of_our_rows_is_in_the_header_and_the_json(monkeypatch, tmp_path, capsys):
    from dpo_kernels import resolve_backend

    backend = resolve_backend(None, torch.device("cpu"))
    spec = bench.OPS["logprobs"]
    monkeypatch.setitem(bench.OPS, "logprobs", dataclasses.replace(spec, methods=spec.methods[-1:]))
    path = tmp_path / "rows.json"
    assert cli.main(["bench", *TINY, "--no-memory", "--json", str(path)]) == 0
    assert f"our rows on the {backend} backend" in capsys.readouterr().out.splitlines()[0]
    assert json.loads(path.read_text())["facts"]["backend"] == backend
    plain = "our rows on the reference backend (plain PyTorch, not our kernels)"
    assert bench.report.backend_note({"backend": "reference"}) == plain


def test_a_bad_backend_is_refused_before_running(grids, monkeypatch, capsys):
    monkeypatch.setenv("DPO_KERNELS_BACKEND", "fast")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--quick"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: dpo-kernels bench" in err
    assert "got 'fast' (from the environment variable DPO_KERNELS_BACKEND)" in err
    assert not grids


def _raises_long(case, device):
    raise RuntimeError("this op needs a thing that is not here; " + "x" * 80 + " THE FIX: do y")


def test_a_long_failure_is_printed_whole_below_the_table(monkeypatch, capsys):
    _only_naive_and(monkeypatch, "logprobs", bench.Method("ours.long", _raises_long, ours=True))
    assert cli.main(["bench", *TINY, "--no-memory"]) == 1
    out = capsys.readouterr().out
    table, below = out.split("\nfailures:\n")
    assert "THE FIX" not in table and all(len(ln) < 250 for ln in table.splitlines())
    assert below.count("ours.long: FAILED: RuntimeError: this op needs") == 2
    assert below.count("THE FIX: do y") == 2


def test_a_failing_reference_is_a_failed_row_not_a_traceback(monkeypatch, tmp_path, capsys):
    def broken(case, device):
        raise RuntimeError("the float64 reference broke")

    monkeypatch.setitem(bench.OPS, "logprobs", dataclasses.replace(bench.OPS["logprobs"],
                                                                   expected=broken))  # fmt: skip
    path = tmp_path / "rows.json"
    assert cli.main(["bench", *TINY, "--no-memory", "--json", str(path)]) == 1
    rows = json.loads(path.read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [(bench.REFERENCE, "FAILED")] * 2
    assert "FAILED (RuntimeError: the float64 reference broke)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ops", "dpo_step", "--shapes", "1x8x2"], "dpo_step takes V >= 3"),
        (["--ops", "kto_step", "--shapes", "1x8x1"], "kto_step takes V >= 3"),
        (["--shapes", ""], "--shapes takes shapes like"),
        (["--speed"], "unrecognized arguments: --speed"),
        (["--ops", "softmax"], "unknown op"),
    ],
)
def test_bad_flags_give_the_bench_usage(grids, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "usage: dpo-kernels bench" in err
    assert not grids


# ------------------------------------------------------------------------------------------
# The scripts in benchmarks/ and gpu_check: bad flags are argparse errors.


def _script(name: str):
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "fused,bogus"], "unknown method(s) ['bogus']"),
        (["--shape", "2x8x16"], "--shape takes BxTxHxV"),
        (["--shape", "3x8x16x64"], "--shape takes BxTxHxV"),
        (["--rounds", "0", "--shape", "2x8x16x64", "--methods", "matmuls"], "whole number >= 1"),
    ],
)
def test_interleaved_script_rejects_bad_flags(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        _script("linear_dpo_interleaved").main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_on_cpu_needs_a_shape(capsys):
    with pytest.raises(SystemExit) as exc:
        _gpu_script().main(["--json", "/dev/null"])
    assert exc.value.code == 2 and "pass --shape" in capsys.readouterr().err


def test_gpu_check_only_must_match_a_case():
    """In its own process without the interpreter, as gpu_check runs (in this one, Triton's
    compile-mode state would outlive the test and break the interpreted kernels after it)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "dpo_kernels.gpu_check", "--only", "typo"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--only 'typo' matches no case" in proc.stderr
    assert "logprobs_fwd bfloat16 V=32000" in proc.stderr


def test_methods_are_timed_in_turns_on_cpu(monkeypatch, capsys):
    """On CPU every method of a case is built, warmed up and checked first, then timed one call
    of each per round (a neighbour's load on a shared machine then hits every row alike: timed
    in blocks, one row under load once came out 8x too slow); a step that raises while being
    timed is a skipped row for a peer, a FAILED one (exit 1) for ours."""
    calls = []

    def spy(name, fail_at=None):
        def build(case, device):
            step = bench.peers.naive(case, device)

            def run():
                calls.append(name)
                if len([c for c in calls if c == name]) == fail_at:
                    raise RuntimeError(f"{name} broke")
                return step()

            return run

        return build

    monkeypatch.setitem(bench.OPS, "logprobs", dataclasses.replace(
        bench.OPS["logprobs"], methods=[bench.Method("a", spy("a")), bench.Method("b", spy("b")),
                                        bench.Method("c", spy("c", fail_at=3))]))  # fmt: skip
    one = ["bench", "--ops", "logprobs", "--shapes", "1x8x50", "--dtype", "fp32", "--no-memory"]
    assert cli.main([*one, "--reps", "3"]) == 0
    warm, timed = calls[:3], calls[3:]
    assert warm == ["a", "b", "c"]
    assert timed == ["a", "b", "c", "a", "b", "c", "a", "b"]  # c broke in round 2, then left
    table = capsys.readouterr().out
    rows = {line.split()[3]: line for line in table.splitlines() if line.startswith("logprobs")}
    assert "skipped (RuntimeError: c broke)" in rows["c"] and rows["a"].rstrip().endswith("ok")
    ours = bench.Method("ours.late", spy("ours.late", fail_at=2), ours=True)
    _with_method(monkeypatch, "logprobs", ours)
    assert cli.main([*one, "--reps", "3"]) == 1


def test_a_peer_whose_own_objective_is_not_finite_is_not_ok():
    """A peer checked by its values alone (its gradients are of its own loss) must still have a
    finite loss: Liger's fused DPO loss at one row computes the right sums, a NaN loss and zero
    gradients."""
    from dpo_kernels.bench.cases import GradStep

    x = torch.ones(3, requires_grad=True)
    step = GradStep([x], lambda: (x * 2, (x * float("nan")).sum()), own_objective=True)
    with pytest.raises(FloatingPointError, match="own objective is not finite"):
        step()
    if importlib.util.find_spec("liger_kernel") is None:
        return
    from dpo_kernels.bench import peers

    with pytest.raises(ValueError, match="B = 1 is odd"):
        peers.liger_dpo(bench.Case("linear", (1, 8, 16, 50), "fp32"), "cpu")
    values, _ = peers.liger_dpo(bench.Case("linear", (2, 8, 16, 50), "fp32"), "cpu")()
    assert values.shape == (2,) and torch.isfinite(values).all()


def test_trl_selective_rows_sum_in_float32():
    """TRL's bf16 per-token log-probs summed in float32, as its trainer does: the bf16 row checks
    TRL's log-softmax, not a bf16 rounding of the sums that the wrapper would add."""
    pytest.importorskip("trl")
    from dpo_kernels.bench import peers

    case = bench.Case("logprobs", (2, 64, 500), "bf16")
    values, _ = peers.trl_selective(case, "cpu")()
    assert values.dtype == torch.float32
    ref = bench.OPS["logprobs"].expected(case, "cpu")[0]
    assert ((values.double() - ref).abs() / ref.abs()).max() < 1e-3
