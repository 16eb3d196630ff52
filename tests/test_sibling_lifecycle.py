"""The model's life around training with the sibling drop-ins (FusedCPOTrainer,
FusedORPOTrainer, FusedKTOTrainer), each against its stock TRL trainer: save_model output that
loads without dpo_kernels, resume_from_checkpoint (also from a checkpoint stock wrote), a second
trainer on the same model object (and a FusedDPOTrainer before a sibling), and evaluate /
predict after training. tests/test_model_lifecycle.py does the same for FusedDPOTrainer."""

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
from test_trl_siblings import COMMON, unpaired_dataset  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402
from dpo_kernels.integrations.trl_siblings import (  # noqa: E402
    FusedCPOTrainer,
    FusedKTOTrainer,
    FusedORPOTrainer,
)

IDS = torch.tensor([[2, 5, 7, 9, 3, 4]])
TIMING = ("_runtime", "_per_second", "_preparation_time")
KINDS = {  # kind: (stock, ours, config)
    "cpo": (CPOTrainer, FusedCPOTrainer, CPOConfig),
    "orpo": (ORPOTrainer, FusedORPOTrainer, ORPOConfig),
    "kto": (trl.KTOTrainer, FusedKTOTrainer, trl.KTOConfig),
    "dpo": (trl.DPOTrainer, FusedDPOTrainer, trl.DPOConfig),
}
_DATA = {}


def _data(kind, n=8):
    key = ("unpaired" if kind == "kto" else "paired", n)
    if key not in _DATA:
        _DATA[key] = unpaired_dataset(n) if kind == "kto" else preference_dataset(n)
    return _DATA[key]


def _trainer(kind, fused, out, model=None, ref=None, n=8, eval_n=0, **config):
    """A stock (fused=False) or fused trainer of `kind` on `model` (a fresh tiny Llama by
    default); KTO and DPO get `ref` as their reference model."""
    datasets.disable_caching()
    stock, ours, config_cls = KINDS[kind]
    args = config_cls(**{**COMMON, "output_dir": str(out), "max_steps": 2, "learning_rate": 0.5,
                         "optim": "sgd", **config})  # fmt: skip
    data = _data(kind, n)
    kwargs = {"ref_model": ref} if kind in ("kto", "dpo") else {}
    return (ours if fused else stock)(
        model=tiny_causal_lm("llama", vocab=28, seed=0) if model is None else model,
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(eval_n)) if eval_n else None,
        processing_class=tiny_tokenizer(),
        **kwargs,
    )


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith(TIMING)}


def _logs(trainer, key="loss"):
    return [_untimed(h) for h in trainer.state.log_history if key in h]


def _assert_logs_equal(stock, ours):
    assert len(ours) == len(stock) > 0
    for step, (s, o) in enumerate(zip(stock, ours, strict=True)):
        assert set(o) == set(s), (step, set(s) ^ set(o))
        for k in s:
            assert o[k] == pytest.approx(s[k], rel=1e-5, abs=1e-5), (step, k, s[k], o[k])


def _ref(kind):
    return tiny_causal_lm("llama", vocab=28, seed=1) if kind in ("kto", "dpo") else None


def test_sibling_save_model_loads_without_dpo_kernels_as_stock_saves(tmp_path):
    """save_model after training, for each sibling: the same files, config, tensors (names,
    shapes, dtypes; values to 1e-6) as stock's; loaded by plain transformers in a process without
    dpo_kernels, the saved model gives the trained in-memory model's logits and greedy tokens."""
    from safetensors.torch import load_file

    dirs = []
    for kind in ("cpo", "orpo", "kto"):
        saved = {}
        for fused in (False, True):
            model = tiny_causal_lm("llama", vocab=28, seed=0)
            trainer = _trainer(kind, fused, tmp_path / kind / str(fused), model, _ref(kind))
            trainer.train()
            path = tmp_path / kind / str(fused) / "saved"
            trainer.save_model(str(path))
            with torch.no_grad():
                torch.save(model(input_ids=IDS).logits.cpu(), path / "logits.pt")
                gen = model.generate(IDS, max_new_tokens=4, do_sample=False)
                torch.save(gen.cpu(), path / "generated.pt")
            saved[fused] = path
        stock, ours = saved[False], saved[True]
        assert sorted(os.listdir(ours)) == sorted(os.listdir(stock)), kind
        for name in ("config.json", "generation_config.json"):
            assert json.loads((ours / name).read_text()) == json.loads((stock / name).read_text())
        a, b = load_file(stock / "model.safetensors"), load_file(ours / "model.safetensors")
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            k: (v.shape, v.dtype) for k, v in a.items()
        }
        for k, v in a.items():
            torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=f"{kind} {k}")
        torch.testing.assert_close(torch.load(ours / "generated.pt"),
                                   torch.load(stock / "generated.pt"))  # fmt: skip
        dirs.append(str(ours))
    check = (
        "import sys, torch, transformers\n"
        "for path in sys.argv[1:]:\n"
        "    m = transformers.AutoModelForCausalLM.from_pretrained(path).eval()\n"
        "    ids = torch.tensor([[2, 5, 7, 9, 3, 4]])\n"
        "    with torch.no_grad():\n"
        "        got = m(input_ids=ids).logits\n"
        "        gen = m.generate(ids, max_new_tokens=4, do_sample=False)\n"
        "    torch.testing.assert_close(got, torch.load(path + '/logits.pt'))\n"
        "    assert torch.equal(gen, torch.load(path + '/generated.pt')), path\n"
        "assert not any(k.startswith('dpo_kernels') for k in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", check, *dirs], check=True, env=env, cwd=tmp_path)


RESUME = {
    "cpo-sgd": ("cpo", {}),
    "orpo-sgd": ("orpo", {}),
    "kto-kl-sgd": ("kto", {}),
    "kto-precomputed-adamw": (
        "kto", {"optim": "adamw_torch", "learning_rate": 1e-3, "precompute_ref_log_probs": True}
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RESUME))
def test_sibling_resume_matches_the_uninterrupted_run_and_stock(case, tmp_path):
    """4 steps of 2 examples saved every 2; resumed from checkpoint-2: the uninterrupted run's
    parameters bitwise, and stock's resumed run's parameters and logged values. Ours resumed from
    the checkpoint stock wrote continues as stock does (the checkpoints are interchangeable)."""
    kind, config = RESUME[case]
    run = dict(config, max_steps=4, save_strategy="steps", save_steps=2,
               per_device_train_batch_size=2)  # fmt: skip
    final, logs = {}, {}
    for fused, resume in ((False, None), (False, "checkpoint-2"), (True, None),
                          (True, "checkpoint-2"), (True, "stock")):  # fmt: skip
        out = tmp_path / str(fused)
        trainer = _trainer(kind, fused, out, ref=_ref(kind), **run)
        ckpt = {None: None, "checkpoint-2": str(out / "checkpoint-2"),
                "stock": str(tmp_path / "False" / "checkpoint-2")}[resume]  # fmt: skip
        if resume == "stock":
            trainer.args.output_dir = str(tmp_path / "from_stock")
        trainer.train(resume_from_checkpoint=ckpt)
        final[fused, resume] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        logs[fused, resume] = _logs(trainer)
    for fused in (False, True):
        for n, p in final[fused, None].items():
            torch.testing.assert_close(final[fused, "checkpoint-2"][n], p, rtol=0, atol=0, msg=n)
    tol = 1e-5 if config.get("optim") == "adamw_torch" else 1e-6
    for other in ("checkpoint-2", "stock"):
        for n, p in final[False, "checkpoint-2"].items():
            torch.testing.assert_close(final[True, other][n], p, rtol=tol, atol=tol, msg=n)
    _assert_logs_equal(logs[False, "checkpoint-2"], logs[True, "checkpoint-2"])
    _assert_logs_equal(logs[False, "checkpoint-2"][2:], logs[True, "stock"][2:])


SEQUENCES = {
    "cpo-then-cpo": ("cpo", "cpo"),
    "orpo-then-orpo": ("orpo", "orpo"),
    "kto-then-kto": ("kto", "kto"),
    "dpo-then-cpo": ("dpo", "cpo"),
    "cpo-then-kto": ("cpo", "kto"),
}


@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_second_trainer_on_one_model_trains_and_generates_like_stock(sequence, tmp_path):
    """Iterative training: a second trainer (the same sibling, or another; a FusedDPOTrainer
    first) on the trained model object and the same reference logs what stock's second trainer
    logs; afterwards the model's plain forward and generate() equal those of an unpatched copy
    (a fresh model of its class with its weights), and stock's."""
    import copy

    out = {}
    for fused in (False, True):
        model = tiny_causal_lm("llama", vocab=28, seed=0)
        ref = tiny_causal_lm("llama", vocab=28, seed=1)
        logs = []
        for i, kind in enumerate(SEQUENCES[sequence]):
            trainer = _trainer(kind, fused, tmp_path / f"{fused}{i}", model,
                               ref if kind in ("kto", "dpo") else None)  # fmt: skip
            trainer.train()
            logs.append(_logs(trainer))
        plain = type(model)(model.config).eval()
        plain.load_state_dict(model.state_dict())
        plain.generation_config = copy.deepcopy(model.generation_config)
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
            torch.testing.assert_close(logits, plain(input_ids=IDS).logits, rtol=0, atol=0)
            gen = model.generate(IDS, max_new_tokens=4, do_sample=False)
            assert torch.equal(gen, plain.generate(IDS, max_new_tokens=4, do_sample=False))
        out[fused] = logs, logits, gen
    (s_logs, s_logits, s_gen), (o_logs, o_logits, o_gen) = out[False], out[True]
    for s, o in zip(s_logs, o_logs, strict=True):
        _assert_logs_equal(s, o)
    torch.testing.assert_close(o_logits, s_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(o_gen, s_gen)


@pytest.mark.parametrize("kind", ["cpo", "kto"])
def test_sibling_evaluate_and_predict_after_training_match_stock(kind, tmp_path):
    """Evaluation during training (eval_strategy="steps"), then predict() with compute_metrics
    (CPO: the logged mean logits as predictions; KTO: the model's logits from an extra forward,
    4 and an odd 3 examples per batch), and for KTO evaluate() on raw datasets passed to it (one,
    and a dict of two): stock's metrics and predictions."""
    import numpy as np

    def metrics(pred):
        p = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return {"pred_mean": float(np.mean(np.asarray(p, dtype=np.float64)))}

    out = {}
    for fused in (False, True):
        trainer = _trainer(kind, fused, tmp_path / str(fused), ref=_ref(kind), eval_n=7,
                           eval_strategy="steps", eval_steps=1,
                           per_device_eval_batch_size=4)  # fmt: skip
        trainer.train()
        got = {"history": _logs(trainer, "eval_loss")}
        trainer.compute_metrics = metrics
        pred = trainer.predict(trainer.eval_dataset)
        got["predict"] = [_untimed(pred.metrics)]
        got["predictions"] = pred.predictions
        trainer.compute_metrics = None
        if kind == "kto":
            raw = _data(kind)
            got["raw"] = [_untimed(trainer.evaluate(raw.select(range(3))))]
            both = trainer.evaluate({"a": raw.select(range(4)), "b": raw.select(range(4, 8))})
            got["dict"] = [_untimed(both)]
            assert "eval_a_loss" in both and "eval_b_loss" in both
        out[fused] = got
    for key in out[False]:
        if key == "predictions":
            s, o = out[False][key], out[True][key]
            s, o = (s if isinstance(s, tuple) else (s,)), (o if isinstance(o, tuple) else (o,))
            for a, b in zip(s, o, strict=True):
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        else:
            _assert_logs_equal(out[False][key], out[True][key])
