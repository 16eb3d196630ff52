"""FusedCPOTrainer / FusedORPOTrainer / FusedKTOTrainer against the stock TRL trainers.

Stock and fused train from the same seed on a tiny model for 2 steps; every logged value must
agree to 1e-5 (fp32) and the final parameters must match. Also: the fused head under DDP (and,
opt-in, FSDP1 / FSDP2 / ZeRO-3) in 2 gloo processes, on a scaled and a biased LM head, and the
options that raise at construction.
"""

import math

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import TRAINER_DEVICE, cpu_only, data_check, tiny_causal_lm  # noqa: E402
from test_trl import preference_dataset, tiny_tokenizer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from dpo_kernels.integrations.trl_siblings import (  # noqa: E402
    FusedCPOTrainer,
    FusedKTOTrainer,
    FusedORPOTrainer,
)

STEPS = 2
TIMING = ("_runtime", "_per_second")
COMMON = dict(
    per_device_train_batch_size=4,
    max_steps=STEPS,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    **TRAINER_DEVICE,
    seed=0,
    dataloader_num_workers=0,
    bf16=False,  # KTOConfig turns bf16 autocast on by default; these runs compare fp32
    gradient_checkpointing=False,  # TRL's default recomputes the forward: slower, same numbers
)


def sgd_or_adamw(optim):
    if optim == "sgd":  # SGD: a large step so that the runs move
        return {"optim": "sgd", "learning_rate": 0.5}
    return {"optim": "adamw_torch", "learning_rate": 1e-3, "adam_epsilon": 1e-6}


def unpaired_dataset(n=8, seed=0):
    rows = preference_dataset(n // 2, seed).to_list()
    out = []
    for i, r in enumerate(rows):
        # a desirable/undesirable mix that differs between batches
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": i % 3 == 0})
    return datasets.Dataset.from_list(out)


def run(trainer_cls, config_cls, tmp_path, *, ref=False, dataset=None, optim="sgd", fused=None,
        peft_config=None, model=None, **cfg):  # fmt: skip
    datasets.disable_caching()
    model = tiny_causal_lm("llama", vocab=28, seed=0) if model is None else model()
    args = config_cls(
        output_dir=str(tmp_path / trainer_cls.__name__), **{**COMMON, **sgd_or_adamw(optim), **cfg}
    )
    kwargs = {"ref_model": tiny_causal_lm("llama", vocab=28, seed=1)} if ref else {}
    if fused is not None:  # ours: the fused LM head (True) or the logits path (False)
        kwargs["fused_lm_head"] = fused
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    data = dataset if dataset is not None else preference_dataset(8)  # 2 steps of 4
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(4)),
        processing_class=tiny_tokenizer(),
        **kwargs,
    )
    initial = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    final = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    evaluation = {k: v for k, v in trainer.evaluate().items() if not k.endswith(TIMING)}
    return history, final, initial, evaluation


def assert_same(stock, ours, keys):
    (hs, ps, p0, es), (ho, po, _, eo) = stock, ours
    assert set(es) == set(eo) and "eval_loss" in es and "eval_rewards/chosen" in es, set(es)
    for k in es:  # evaluation after training, the same metrics under eval_ names
        assert eo[k] == pytest.approx(es[k], rel=1e-5, abs=1e-5), ("eval", k, es[k], eo[k])
    assert len(hs) == len(ho) == STEPS
    for step, (s, o) in enumerate(zip(hs, ho, strict=True)):
        assert set(s) - {"epoch"} == set(o) - {"epoch"}, (step, set(s) ^ set(o))
        for k in keys:
            assert k in s, (step, k)
        for k in s:
            assert o[k] == pytest.approx(s[k], rel=1e-5, abs=1e-5), (step, k, s[k], o[k])
    assert set(ps) == set(po)
    for name, p in ps.items():
        torch.testing.assert_close(po[name], p, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(p, p0[name]) for name, p in ps.items())  # training moved it


def count_routes(monkeypatch) -> dict[str, int]:
    """Counts the calls of the 3-matmul pair runner (`linear_pair_loss`, under the linear
    sibling losses) and of the fused head's log-probs op."""
    import dpo_kernels.fused_head as fh
    import dpo_kernels.linear_preference_losses as lpl

    calls = {"pair": 0, "logprobs": 0}

    def counting(name, f):
        def wrapped(*a, **k):
            calls[name] += 1
            return f(*a, **k)

        return wrapped

    monkeypatch.setattr(lpl, "linear_pair_loss", counting("pair", lpl.linear_pair_loss))
    seq = fh.linear_sequence_logprobs
    monkeypatch.setattr(fh, "linear_sequence_logprobs", counting("logprobs", seq))
    return calls


PAIRED_KEYS = [
    "loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
    "nll_loss",
]  # fmt: skip


@pytest.mark.parametrize(
    "cfg,optim,fused",
    [
        ({"loss_type": "sigmoid", "label_smoothing": 0.1}, "sgd", True),
        ({"loss_type": "hinge", "alpha": 0.3, "beta": 1.0}, "sgd", False),
        ({"loss_type": "ipo", "cpo_alpha": 0.5}, "adamw", True),
        ({"loss_type": "alphapo", "alpha": 0.2, "simpo_gamma": 0.7, "beta": 2.0}, "sgd", False),
        ({"loss_type": "alphapo", "alpha": 0.2, "simpo_gamma": 0.7, "beta": 2.0}, "sgd", True),
        ({"loss_type": "simpo", "label_smoothing": 0.1, "beta": 2.0}, "adamw", True),
        # options TRL trains with outside the usual ranges (beta 0 but where a loss divides by it)
        ({"loss_type": "sigmoid", "label_smoothing": 0.7, "beta": -0.5}, "sgd", True),
        ({"loss_type": "hinge", "beta": 0.0}, "sgd", False),
        ({"loss_type": "simpo", "label_smoothing": -0.1, "beta": -1.5}, "sgd", True),
    ],
    ids=[
        "sigmoid-smoothing-head", "hinge-alpha-logits", "ipo-adamw-head", "alphapo-logits",
        "alphapo-head", "cpo-simpo-adamw-head", "negative-beta-smoothing-0.7-head",
        "hinge-beta0-logits", "simpo-negative-beta-and-smoothing-head",
    ],
)  # fmt: skip
def test_cpo_matches_stock(cfg, optim, fused, tmp_path, monkeypatch):
    """Also counts the routes: with the fused head every loss (train and eval) is the 3-matmul
    op inside the head call, and the log-probs op is never called."""
    calls = count_routes(monkeypatch)
    stock = run(CPOTrainer, CPOConfig, tmp_path, optim=optim, **cfg)
    assert calls == {"pair": 0, "logprobs": 0}
    ours = run(FusedCPOTrainer, CPOConfig, tmp_path, optim=optim, fused=fused, **cfg)
    assert_same(stock, ours, PAIRED_KEYS)
    # STEPS training batches and one evaluation batch of 4 pairs
    assert calls == ({"pair": STEPS + 1, "logprobs": 0} if fused else {"pair": 0, "logprobs": 0})


@pytest.mark.parametrize(
    "fused,beta", [(True, 0.5), (False, 0.5), (True, 0.0), (False, -0.5)],
    ids=["head", "logits", "beta0-head", "negative-beta-logits"],
)  # fmt: skip
def test_orpo_matches_stock(fused, beta, tmp_path):
    """beta weighs ORPO's odds-ratio term: 0 (plain SFT on the chosen) and negative train too."""
    stock = run(ORPOTrainer, ORPOConfig, tmp_path, beta=beta)
    ours = run(FusedORPOTrainer, ORPOConfig, tmp_path, beta=beta, fused=fused)
    assert_same(stock, ours, [*PAIRED_KEYS, "log_odds_ratio", "log_odds_chosen"])


KTO_KEYS = [
    "loss", "grad_norm", "kl", "entropy", "num_tokens", "logits/chosen", "logits/rejected",
    "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins",
]  # fmt: skip


@pytest.mark.parametrize(
    "cfg,optim,fused,fused_losses",
    [
        ({"loss_type": "kto", "desirable_weight": 1.3, "undesirable_weight": 0.8}, "sgd", True,
         STEPS + 1),
        ({"loss_type": "kto", "precompute_ref_log_probs": True}, "adamw", False, 0),
        ({"loss_type": "apo_zero_unpaired", "beta": 0.5}, "sgd", True, STEPS + 1),
        # 3 completions a step: linear_kto_loss cannot pair them (log-probs + kto_loss); the
        # evaluation batch of 4 goes fused
        ({"loss_type": "kto", "per_device_train_batch_size": 3}, "sgd", True, 1),
        ({"loss_type": "kto", "beta": -0.5}, "sgd", True, STEPS + 1),  # as TRL: any finite beta
        ({"loss_type": "apo_zero_unpaired", "beta": -0.3}, "sgd", False, 0),
    ],
    ids=["kto-weights-head", "kto-precomputed-adamw-logits", "apo_zero_unpaired-head",
         "kto-odd-batch-head", "kto-negative-beta-head", "apo-negative-beta-logits"],
)  # fmt: skip
def test_kto_matches_stock(cfg, optim, fused, fused_losses, tmp_path, monkeypatch):
    """Also counts the losses computed in the head call by the 3-matmul op (train and eval)."""
    calls = count_routes(monkeypatch)
    data = unpaired_dataset()
    kw = dict(ref=True, dataset=data, optim=optim, **cfg)
    stock = run(trl.KTOTrainer, trl.KTOConfig, tmp_path, **kw)
    ours = run(FusedKTOTrainer, trl.KTOConfig, tmp_path, fused=fused, **kw)
    keys = [k for k in KTO_KEYS if cfg["loss_type"] == "kto" or k != "kl"]
    if "per_device_train_batch_size" in cfg:  # a batch of 3 may lack one label (as in stock)
        keys = [k for k in keys if "rejected" not in k and "chosen" not in k and "margins" not in k]
    assert_same(stock, ours, keys)
    assert calls["pair"] == fused_losses


@pytest.mark.parametrize(
    "fused,noise", [(None, None), (False, 5.0)], ids=["head", "neftune-logits"]
)
def test_kto_peft_matches_stock(fused, noise, tmp_path):
    """LoRA, no ref_model: the reference is the model with its adapter disabled. With NEFTune it
    draws noise too (in training mode): on the logits path the passes run in stock's order, so
    the draws are stock's, draw for draw."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    kw = dict(dataset=unpaired_dataset(), peft_config=lora, loss_type="kto")
    if noise is not None:
        kw["neftune_noise_alpha"] = noise
    stock = run(trl.KTOTrainer, trl.KTOConfig, tmp_path, **kw)
    ours = run(FusedKTOTrainer, trl.KTOConfig, tmp_path, fused=fused, **kw)
    assert any("lora" in k for k in stock[1])
    assert_same(stock, ours, KTO_KEYS)


def test_unsupported_option_raises(tmp_path):
    model = tiny_causal_lm("llama", vocab=28, seed=0)
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 0.1
    args = CPOConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match="output_router_logits"):
        FusedCPOTrainer(
            model=model,
            args=args,
            train_dataset=preference_dataset(4),
            processing_class=tiny_tokenizer(),
        )


@pytest.mark.parametrize("fused", [True, False], ids=["head", "logits"])
def test_moe_router_logits_with_a_zero_coefficient_train_as_stock(fused, tmp_path):
    """output_router_logits on and router_aux_loss_coef 0: stock warns and adds nothing; CPO and
    ORPO train alike (they were refused as if the aux loss were used)."""
    from test_moe_aux import tiny_moe

    def model():
        m = tiny_moe(0)
        m.config.output_router_logits, m.config.router_aux_loss_coef = True, 0.0
        return m

    for trainer, ours, config in ((CPOTrainer, FusedCPOTrainer, CPOConfig),
                                  (ORPOTrainer, FusedORPOTrainer, ORPOConfig)):  # fmt: skip
        stock = run(trainer, config, tmp_path, model=model)
        assert_same(stock, run(ours, config, tmp_path, model=model, fused=fused), ["loss"])


def test_fused_head_refuses_softcap(tmp_path):
    model = tiny_causal_lm("llama", vocab=28, seed=0)
    model.config.final_logit_softcapping = 30.0  # read by head_transform, as on Gemma-2
    args = ORPOConfig(output_dir=str(tmp_path), **COMMON)
    kw = dict(model=model, args=args, train_dataset=preference_dataset(4))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        FusedORPOTrainer(**kw, processing_class=tiny_tokenizer())
    FusedORPOTrainer(**kw, processing_class=tiny_tokenizer(), fused_lm_head=False)  # logits path


def test_bad_loss_option_raises_at_construction(tmp_path):
    """simpo divides by beta (TRL raises ZeroDivisionError at its first step with beta = 0)."""
    args = CPOConfig(output_dir=str(tmp_path), **COMMON, loss_type="simpo", beta=0.0)
    with pytest.raises(ValueError, match="beta must not be 0 with loss_type 'simpo'"):
        FusedCPOTrainer(
            model=tiny_causal_lm("llama", vocab=28, seed=0),
            args=args,
            train_dataset=preference_dataset(4),
            processing_class=tiny_tokenizer(),
        )


ENGINE_EXTRA = {
    "ddp": {"find_unused": True},
    "fsdp1": {"strategy": "FULL_SHARD", "orig": True},
    "fsdp2": {},
    "deepspeed": {"zero": 3},
}


WRAPPER = {
    "ddp": "DistributedDataParallel",
    "fsdp1": "FullyShardedDataParallel",
    "fsdp2": "FSDPLlamaForCausalLM",
    "deepspeed": "DeepSpeedEngine",
}


@cpu_only
@pytest.mark.parametrize("engine", list(ENGINE_EXTRA))
def test_siblings_fused_head_under_engine(engine, tmp_path):
    """2 gloo processes, one launch: ORPO (the fused head, the chosen NLL and the mean logits
    inside the model's forward), CPO and KTO (the loss in the head call, 3 matmuls; KTO's KL
    gathered over processes first), stock vs fused, to 1e-5. CI runs DDP
    (find_unused_parameters); FSDP1, FSDP2 and ZeRO-3 run with DPO_KERNELS_ALL_ENGINES=1 (about
    30 s each)."""
    import importlib.util
    import os

    from test_engines import launch

    if engine != "ddp" and not os.environ.get("DPO_KERNELS_ALL_ENGINES"):
        pytest.skip("set DPO_KERNELS_ALL_ENGINES=1 to run the siblings under FSDP and ZeRO-3")
    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    # CPO's gradient norms are about 3 here; FSDP runs unclipped, and at lr=0.5 its steps amplify
    # fp32 rounding (1e-7 at step 1) past 1e-5 by step 4: a smaller step for it.
    lr = {"cpo": 0.1}
    cfgs = [
        {
            "name": kind,
            "trainer": kind,
            "tied": False,
            "lr": lr.get(kind, 0.5),
            **ENGINE_EXTRA[engine],
        }
        for kind in ("cpo", "orpo", "kto")
    ]
    keys = {"cpo": {"nll_loss"}, "orpo": {"nll_loss", "log_odds_ratio"}, "kto": {"kl", "entropy"}}
    for rank, results in enumerate(launch(engine, cfgs, tmp_path)):
        for kind in ("cpo", "orpo", "kto"):
            r = results[kind]
            assert "error" not in r, (rank, kind, r.get("error"))
            assert r["facts"]["wrapper"] == WRAPPER[engine], r["facts"]
            if engine == "ddp":
                assert r["facts"]["find_unused"] is True, r["facts"]
            if engine == "deepspeed":
                assert r["facts"]["zero"] == 3, r["facts"]
            assert r["loss_moved"] > 1e-3 and r["param_moved"] > 1e-3, r
            assert {"loss", "logits/chosen", *keys[kind]} <= set(r["keys"]), r
            assert r["max_metric_dev"] <= 1e-5 and r["max_param_dev"] <= 1e-5, (kind, r)


def _cohere(vocab=28):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.CohereConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25,
    )  # fmt: skip
    return transformers.CohereForCausalLM(cfg)


def _biased_llama(vocab=28):
    model = tiny_causal_lm("llama", vocab=vocab, seed=0)
    model.lm_head = torch.nn.Linear(32, vocab, bias=True)
    torch.nn.init.normal_(model.lm_head.bias)
    return model


@pytest.mark.parametrize("make_model", [_cohere, _biased_llama], ids=["logit_scale", "bias"])
@pytest.mark.parametrize("kind", ["cpo", "orpo"])
def test_fused_head_metrics_match_stock_with_scale_and_bias(kind, make_model, tmp_path):
    """One batch through stock and fused (the head inside the forward) on a model whose logits are
    scaled (Cohere) or biased: loss, gradient and every metric, logits/* included. The fused head
    never calls the LM head's own forward (it raises here)."""
    stock_cls, cls, cfg_cls = {
        "cpo": (CPOTrainer, FusedCPOTrainer, CPOConfig),
        "orpo": (ORPOTrainer, FusedORPOTrainer, ORPOConfig),
    }[kind]
    results = []
    for trainer_cls in (stock_cls, cls):
        model = make_model()
        args = cfg_cls(output_dir=str(tmp_path), **COMMON)
        trainer = trainer_cls(
            model=model, args=args, train_dataset=preference_dataset(4),
            processing_class=tiny_tokenizer(),
        )  # fmt: skip
        if trainer_cls is cls:

            def forbidden(*_):
                raise AssertionError("the fused head built the logits")

            model.get_output_embeddings().forward = forbidden
        batch = next(iter(trainer.get_train_dataloader()))
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), metrics, grads))
    (ls, ms, gs), (lo, mo, go) = results
    assert lo == pytest.approx(ls, rel=1e-5, abs=1e-6)
    assert set(ms) == set(mo) and "logits/chosen" in ms
    for k in ms:
        assert mo[k] == pytest.approx(float(ms[k]), rel=1e-5, abs=1e-6), (k, ms[k], mo[k])
    assert set(gs) == set(go)
    for n in gs:
        torch.testing.assert_close(go[n], gs[n], rtol=1e-5, atol=1e-6)


def test_kto_fused_head_refuses_prompt_learning(tmp_path):
    peft = pytest.importorskip("peft")
    prompt = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    args = trl.KTOConfig(output_dir=str(tmp_path), **COMMON)
    kw = dict(args=args, train_dataset=unpaired_dataset(4), processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="prompt-learning"):
        FusedKTOTrainer(model=tiny_causal_lm("llama", vocab=28), peft_config=prompt, **kw)


def test_kto_prompt_learning_predictions_match_stock(tmp_path):
    """The logits path with a prompt-tuning adapter: predict() hands compute_metrics the model's
    logits with the virtual tokens' positions, as stock does (the log-probs skip them)."""
    peft = pytest.importorskip("peft")
    got = []
    for cls, kw in ((trl.KTOTrainer, {}), (FusedKTOTrainer, {"fused_lm_head": False})):
        args = trl.KTOConfig(output_dir=str(tmp_path), **COMMON, per_device_eval_batch_size=4)
        data = unpaired_dataset(4)
        trainer = cls(
            model=tiny_causal_lm("llama", vocab=28, seed=0), args=args, train_dataset=data,
            eval_dataset=data, processing_class=tiny_tokenizer(), **kw,
            peft_config=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        )  # fmt: skip
        out = trainer.predict(trainer.eval_dataset)  # tokenized, with the KL completions
        got.append((np.asarray(out.predictions), out.metrics["test_loss"]))
    (stock, stock_loss), (ours, our_loss) = got
    assert ours.shape == stock.shape
    np.testing.assert_allclose(ours, stock, rtol=1e-5, atol=1e-6)
    assert our_loss == pytest.approx(stock_loss, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_cpo_completion_truncated_to_nothing(loss_type, tmp_path):
    # max_length=5 leaves some completions empty: stock's averages are 0/0 (NaN parameters);
    # ours count such a completion as one token, as dpo_loss does, and its logs agree with the
    # loss (logps/* are the averages the rewards are beta times). ORPO refuses the batch (below).
    cfg = dict(max_length=5, loss_type=loss_type, cpo_alpha=0.0 if loss_type == "simpo" else 1.0)
    history, final, _, _ = run(FusedCPOTrainer, CPOConfig, tmp_path, **cfg)
    assert all(torch.isfinite(p).all() for p in final.values())
    for h in history:
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]), h
        for side in ("chosen", "rejected"):
            assert h[f"rewards/{side}"] == pytest.approx(0.1 * h[f"logps/{side}"], rel=1e-5)


@data_check
def test_orpo_refuses_a_completion_truncated_to_nothing(tmp_path):
    with pytest.raises(ValueError, match="truncated to nothing by max_length"):
        run(FusedORPOTrainer, ORPOConfig, tmp_path, max_length=5)


def test_lm_head_adapter_refused_at_construction_with_the_fused_head(tmp_path):
    # LoRA on lm_head: the fused head would read the base weight alone; refused when the trainer
    # is built (not at its first step), while the logits path takes it
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])

    with pytest.raises(ValueError, match=r"not a plain nn\.Linear.*use fused_lm_head=False or"):
        run(FusedCPOTrainer, CPOConfig, tmp_path, peft_config=lora(), fused=True)
    _, final, initial, _ = run(FusedCPOTrainer, CPOConfig, tmp_path, peft_config=lora(),
                               fused=False)  # fmt: skip
    moved = [k for k in final if "lm_head.lora_B" in k and not torch.equal(final[k], initial[k])]
    assert moved, "the lm_head adapter did not train"


@pytest.mark.parametrize("fused", [True, False], ids=["head", "logits"])
def test_kto_matches_stock_with_a_logit_scale(fused, tmp_path):
    """KTO's loss in the head call (linear_kto, the default) and the logits path on a model
    whose logits are scaled (Cohere): every logged value, logits/* included, and the parameters."""
    kw = dict(ref=True, dataset=unpaired_dataset(), loss_type="kto", model=_cohere)
    stock = run(trl.KTOTrainer, trl.KTOConfig, tmp_path, **kw)
    ours = run(FusedKTOTrainer, trl.KTOConfig, tmp_path, fused=fused, **kw)
    assert_same(stock, ours, KTO_KEYS)


def _recurrent_gemma():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=28, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, lru_width=32, attention_window_size=16,
        logits_soft_cap=0.3, block_types=["recurrent", "attention"],
    )  # fmt: skip
    return transformers.RecurrentGemmaForCausalLM(cfg).eval()


@pytest.mark.parametrize("fused", [True, False], ids=["head", "logits"])
def test_kto_precomputed_reference_is_scored_like_the_policy(fused, tmp_path):
    """precompute_ref_log_probs=True without a ref_model: the reference is the policy at its
    initial weights, so before any update the rewards and the KL estimate are 0. The precomputed
    sums come from the same op as the policy's: TRL's own precompute (its add_fused_lm_head)
    skips RecurrentGemma's final logits_soft_cap, which the model's forward applies (rewards
    0.009 / 0.043 and KL 0.24 here before 2026-11-27)."""
    args = trl.KTOConfig(
        output_dir=str(tmp_path), **{**COMMON, "max_steps": 1, "learning_rate": 0.0},
        optim="sgd", precompute_ref_log_probs=True,
    )  # fmt: skip
    trainer = FusedKTOTrainer(
        model=_recurrent_gemma(), args=args, train_dataset=unpaired_dataset(),
        processing_class=tiny_tokenizer(), fused_lm_head=fused,
    )  # fmt: skip
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    for k in ("rewards/chosen", "rewards/rejected", "kl"):
        assert log[k] == pytest.approx(0.0, abs=1e-6), (k, log[k])
    assert log["loss"] == pytest.approx(0.5, abs=1e-7)
