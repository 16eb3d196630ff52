"""FusedDPOTrainer against stock trl.DPOTrainer on every loss type, every f-divergence,
discopop_tau, ld_alpha and a weighted mix: every logged value and the final parameters.

Each case trains both trainers 3 steps from one seed on a tiny Llama (SGD, and AdamW for a few
cases), so the whole file stays cheap; a wrong loss formula, a dropped option or a wrong length
weighting moves the logged loss, rewards or parameters by far more than the tolerance."""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import TRAINER_DEVICE, tiny_causal_lm  # noqa: E402
from test_trl import preference_dataset, tiny_tokenizer  # noqa: E402

from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402

STEPS = 3
SMOOTHED = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip


def loss_case(kind, **extra):
    return dict(loss_type=[kind], label_smoothing=SMOOTHED.get(kind, 0.0), **extra)


CASES = {
    **{kind: loss_case(kind) for kind in LOSS_TYPES},
    "sigmoid-forward_kl": loss_case("sigmoid", f_divergence_type="forward_kl"),
    "sigmoid-js_divergence": loss_case("sigmoid", f_divergence_type="js_divergence"),
    "ipo-alpha_divergence": loss_case(
        "ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3
    ),
    "discopop-tau0.7": loss_case("discopop", discopop_tau=0.7),
    "sigmoid-ld_alpha": loss_case("sigmoid", ld_alpha=0.3),
    "ipo-ld_alpha-precomputed": loss_case("ipo", ld_alpha=0.6, precompute_ref_log_probs=True),
    "mix-weighted-adamw": dict(
        loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], optim="adamw_torch"
    ),
    "robust-js-adamw": loss_case("robust", f_divergence_type="js_divergence", optim="adamw_torch"),
    # options TRL trains with outside the usual ranges (as dpo_kernels.make_spec takes them)
    "mix-negative-beta-smoothing-0.7": dict(
        loss_type=["sigmoid", "robust", "aot", "exo_pair", "ipo"], beta=-0.3, label_smoothing=0.7
    ),
    "apo_zero-beta0-sft": dict(loss_type=["apo_zero", "sft"], beta=0.0),
}

_DATA = {}


def llama(seed):
    return tiny_causal_lm("llama", vocab=28, seed=seed)


def train(trainer_cls, tmp_path, make=llama, kernel=None, **config):
    """Trains STEPS steps; returns the logged rows and the final parameters. make(seed): the
    policy (seed 0) and the reference (seed 1); kernel: FusedDPOTrainer's own options."""
    datasets.disable_caching()
    if "train" not in _DATA:
        _DATA["train"], _DATA["tok"] = preference_dataset(12), tiny_tokenizer()
    model = make(0)
    ref = make(1)
    adam = config.get("optim", "sgd") != "sgd"
    args = trl.DPOConfig(
        **{
            "output_dir": str(tmp_path / trainer_cls.__name__),
            "per_device_train_batch_size": 4,
            "max_steps": STEPS,
            "logging_steps": 1,
            "learning_rate": 1e-3 if adam else 0.5,
            "optim": "sgd",
            "report_to": [],
            "save_strategy": "no",
            **TRAINER_DEVICE,
            "seed": 0,
            "dataloader_num_workers": 0,
            "bf16": False,
            **config,
        }
    )
    trainer = trainer_cls(
        model=model, ref_model=ref, args=args, train_dataset=_DATA["train"],
        processing_class=_DATA["tok"], **(kernel or {}),
    )  # fmt: skip
    trainer.train()
    rows = [h for h in trainer.state.log_history if "loss" in h]
    return rows, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_every_logged_value_and_the_final_parameters_match_stock(case, tmp_path):
    stock, stock_params = train(trl.DPOTrainer, tmp_path, **CASES[case])
    ours, our_params = train(FusedDPOTrainer, tmp_path, **CASES[case])
    assert len(stock) == len(ours) == STEPS
    for step, (s, o) in enumerate(zip(stock, ours, strict=True)):
        assert set(s) - {"entropy"} <= set(o), (step, sorted(set(s) - set(o)))
        for k, v in s.items():
            assert o[k] == pytest.approx(v, rel=1e-5, abs=1e-5), (case, step, k, v, o[k])
    for name, p in stock_params.items():
        torch.testing.assert_close(our_params[name], p, rtol=1e-5, atol=1e-5, msg=name)
    # Training moved the policy: the comparison is not of two untouched models.
    start = tiny_causal_lm("llama", vocab=28, seed=0).state_dict()
    assert any((start[n] - p).abs().max() > 1e-4 for n, p in stock_params.items())


def _transformed(kind, seed):
    """A tiny model whose logits are not its LM head's output alone: Cohere's logit_scale,
    Gemma-2's final logit softcap (small enough to bend these logits)."""
    import transformers

    torch.manual_seed(seed)
    size = dict(vocab_size=28, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    if kind == "cohere-logit_scale":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**size, logit_scale=0.25))
    else:
        cfg = transformers.Gemma2Config(**size, head_dim=8, final_logit_softcapping=0.5)
        model = transformers.Gemma2ForCausalLM(cfg)
    return model.eval()


@pytest.mark.parametrize("fused_lm_head", [True, False], ids=["head", "logits"])
@pytest.mark.parametrize("kind", ["cohere-logit_scale", "gemma2-softcap"])
def test_model_logit_transform_trains_like_stock(kind, fused_lm_head, tmp_path):
    """The trainer's routes on a model whose forward transforms the head's logits: the loss fused
    into the head call (linear_dpo, the default) and the logits path, against stock."""

    def make(seed):
        return _transformed(kind, seed)

    config = loss_case("sigmoid")
    stock, stock_params = train(trl.DPOTrainer, tmp_path, make=make, **config)
    ours, our_params = train(FusedDPOTrainer, tmp_path, make=make,
                             kernel={"fused_lm_head": fused_lm_head}, **config)  # fmt: skip
    assert len(stock) == len(ours) == STEPS
    for step, (s, o) in enumerate(zip(stock, ours, strict=True)):
        assert set(s) <= set(o), (step, sorted(set(s) - set(o)))
        for k, v in s.items():
            assert o[k] == pytest.approx(v, rel=1e-5, abs=1e-5), (kind, step, k, v, o[k])
    for name, p in stock_params.items():
        torch.testing.assert_close(our_params[name], p, rtol=1e-5, atol=1e-5, msg=name)
    start = make(0).state_dict()
    assert any((start[n] - p).abs().max() > 1e-4 for n, p in stock_params.items())
