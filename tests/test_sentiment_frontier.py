"""examples/sentiment_frontier.py --quick: DPO raises the true reward; fused and stock TRL agree."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_true_reward_is_the_documented_formula():
    import sentiment_frontier as sf
    import torch

    lang = sf.Language.build(0)
    ids = {w: i for i, w in enumerate(lang.words)}
    # prompt ends in `not`, so the first completion word is negated; p23 has magnitude 2,
    # n0 magnitude 0.5, p8 magnitude 1; a `not` before a neutral word does nothing.
    prompt = ["w1", "w2", "w3", "not"]
    completion = ["p8", "w5", "p23", "not", "n0", "not", "w7", "n20"] + ["w9"] * 4
    seq = torch.tensor([[ids[w] for w in prompt + completion]])
    score = -1.0 + 2.0 + 0.5 - 2.0
    assert lang.reward(seq).item() == pytest.approx(1 / (1 + math.exp(-score / 2)), abs=1e-12)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    # The script's folder, not the checkout, is first on its sys.path: import this checkout's
    # dpo_kernels, not whichever one is installed.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "sentiment_frontier.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "frontier.json").read_text()), proc.stdout


def test_quick_run_writes_the_plot_json_and_table(quick_run):
    out, result, stdout = quick_run
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert {r["trainer"] for r in result["runs"]} == {"fused", "stock"}
    for r in result["runs"]:
        steps = [p["step"] for p in r["points"]]
        assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 4
        assert len(r["losses"]) == steps[-1]
    assert "beta" in stdout and "SFT: reward" in stdout


def test_fused_and_stock_trl_losses_agree_over_the_run(quick_run):
    _, result, _ = quick_run
    fused = next(r for r in result["runs"] if r["trainer"] == "fused")
    stock = next(r for r in result["runs"] if r["trainer"] == "stock")
    assert fused["beta"] == stock["beta"]
    assert len(fused["losses"]) == len(stock["losses"]) >= 20
    assert fused["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    for step, (f, s) in enumerate(zip(fused["losses"], stock["losses"], strict=True)):
        assert abs(f - s) <= 1e-4, (step, f, s)
    assert max(fused["losses"]) - min(fused["losses"]) > 0.05  # the run is not trivially flat
    for pf, ps in zip(fused["points"], stock["points"], strict=True):
        assert pf["reward"] == pytest.approx(ps["reward"], abs=1e-2)


def test_dpo_raises_the_true_reward_well_beyond_sampling_noise(quick_run):
    _, result, _ = quick_run
    sft = result["sft"]
    assert sft["reward"] == pytest.approx(0.5, abs=0.05)  # the SFT model is not already positive
    for r in result["runs"]:
        last = r["points"][-1]
        gain = last["reward"] - sft["reward"]
        noise = math.hypot(last["reward_se"], sft["reward_se"])
        assert gain > 0.05 and gain > 5 * noise, (r["trainer"], gain, noise)
        assert last["kl"] > 5 * last["kl_se"]  # the policy moved away from the SFT model
