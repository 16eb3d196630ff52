"""The model's life around training with the fused trainers: a plain forward, generate() and a
second trainer on the same model object afterwards, save_model / from_pretrained in a process that
never imports dpo_kernels, and resume_from_checkpoint, each against stock TRL."""

import json
import os
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import tiny_causal_lm  # noqa: E402
from test_trl import preference_dataset, tiny_tokenizer  # noqa: E402
from test_trl_siblings import COMMON  # noqa: E402

from dpo_kernels.fused_head import install_fused_head  # noqa: E402
from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402

IDS = torch.tensor([[2, 5, 7, 9, 3, 4]])
_DATA = {}


def _trainer(cls, tmp_path, model, ref, **config):
    datasets.disable_caching()
    if "train" not in _DATA:
        _DATA["train"], _DATA["tok"] = preference_dataset(8), tiny_tokenizer()
    args = trl.DPOConfig(**{**COMMON, "output_dir": str(tmp_path / cls.__name__), "max_steps": 2,
                            "learning_rate": 0.5, "optim": "sgd", **config})  # fmt: skip
    return cls(
        model=model, ref_model=ref, args=args, train_dataset=_DATA["train"],
        processing_class=_DATA["tok"],
    )  # fmt: skip


def test_a_second_patch_behind_a_foreign_wrapper_keeps_the_plain_forward():
    """TRL wraps the forward at every trainer's construction (`add_fused_lm_head`, whose
    `__wrapped__` is the class's forward, hiding an earlier patch): a second install must not
    overwrite what the first one calls, or every plain forward recurses forever."""
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_causal_lm("llama", vocab=28)
    expect = type(model).forward(model, input_ids=IDS).logits
    for _ in range(2):  # two trainers on one model: TRL's wrapper, then ours
        add_fused_lm_head(model)
        install_fused_head(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expect)
        assert model.generate(IDS, max_new_tokens=2, do_sample=False).shape == (1, 8)


def test_two_fused_trainers_on_one_model_train_and_generate_like_stock(tmp_path):
    """Iterative DPO: a second FusedDPOTrainer on the trained model (and the same reference)
    trains as stock's second DPOTrainer does, and the model still runs a plain forward."""
    out = {}
    for cls in (trl.DPOTrainer, FusedDPOTrainer):
        model = tiny_causal_lm("llama", vocab=28, seed=0)
        ref = tiny_causal_lm("llama", vocab=28, seed=1)
        logs = []
        for _ in range(2):
            trainer = _trainer(cls, tmp_path, model, ref)
            trainer.train()
            logs += [h["loss"] for h in trainer.state.log_history if "loss" in h]
        with torch.no_grad():
            out[cls] = logs, model(input_ids=IDS).logits, ref(input_ids=IDS).logits
    (s_logs, s_logits, s_ref), (o_logs, o_logits, o_ref) = out.values()
    assert o_logs == pytest.approx(s_logs, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(o_logits, s_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_ref, s_ref)


def test_save_model_loads_without_dpo_kernels_as_stock_saves(tmp_path):
    """save_model after training: the same files, tensors (names, shapes, dtypes) and config as
    stock's; loaded by plain transformers in a process without dpo_kernels, the saved model gives
    the trained in-memory model's logits."""
    from safetensors.torch import load_file

    saved = {}
    for cls in (trl.DPOTrainer, FusedDPOTrainer):
        model = tiny_causal_lm("llama", vocab=28, seed=0)
        trainer = _trainer(cls, tmp_path, model, tiny_causal_lm("llama", vocab=28, seed=1))
        trainer.train()
        path = tmp_path / cls.__name__ / "saved"
        trainer.save_model(str(path))
        with torch.no_grad():
            torch.save(model(input_ids=IDS).logits.cpu(), path / "logits.pt")
        saved[cls] = path
    stock, ours = saved.values()
    assert sorted(os.listdir(ours)) == sorted(os.listdir(stock))
    assert json.loads((ours / "config.json").read_text()) == json.loads(
        (stock / "config.json").read_text()
    )
    a, b = load_file(stock / "model.safetensors"), load_file(ours / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: (v.shape, v.dtype) for k, v in a.items()
    }
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=k)
    check = (
        "import sys, torch, transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    got = m(input_ids=torch.tensor([[2, 5, 7, 9, 3, 4]])).logits\n"
        "assert not any(k.startswith('dpo_kernels') for k in sys.modules)\n"
        "torch.testing.assert_close(got, torch.load(sys.argv[1] + '/logits.pt'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", check, str(ours)], check=True, env=env, cwd=tmp_path)


@pytest.mark.parametrize("config", [{}, {"optim": "adamw_torch", "learning_rate": 1e-3,
                                         "precompute_ref_log_probs": True}],
                         ids=["sgd", "adamw-precomputed"])  # fmt: skip
def test_resume_from_checkpoint_matches_the_uninterrupted_run_and_stock(config, tmp_path):
    """4 steps saved every 2; resumed from checkpoint-2: the final parameters of the
    uninterrupted run, and stock's resumed run's parameters and logged losses."""
    final, losses = {}, {}
    for cls in (trl.DPOTrainer, FusedDPOTrainer):
        for resume in (None, "checkpoint-2"):
            run = dict(config, max_steps=4, save_strategy="steps", save_steps=2)
            trainer = _trainer(cls, tmp_path, tiny_causal_lm("llama", vocab=28, seed=0),
                               tiny_causal_lm("llama", vocab=28, seed=1), **run)  # fmt: skip
            ckpt = None if resume is None else str(tmp_path / cls.__name__ / resume)
            trainer.train(resume_from_checkpoint=ckpt)
            params = trainer.model.named_parameters()
            final[cls, resume] = {n: p.detach().clone() for n, p in params}
            losses[cls, resume] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for cls in (trl.DPOTrainer, FusedDPOTrainer):
        for n, p in final[cls, None].items():
            torch.testing.assert_close(final[cls, "checkpoint-2"][n], p, rtol=0, atol=0, msg=n)
    resumed = [final[cls, "checkpoint-2"] for cls in (trl.DPOTrainer, FusedDPOTrainer)]
    for n, p in resumed[0].items():
        torch.testing.assert_close(resumed[1][n], p, rtol=1e-5, atol=1e-5, msg=n)
    s, o = (losses[cls, "checkpoint-2"] for cls in (trl.DPOTrainer, FusedDPOTrainer))
    assert len(s) == len(o) == 4 and o == pytest.approx(s, rel=1e-5, abs=1e-5)
