"""FusedDPOTrainer on a Mixture-of-Experts model: the router load-balancing loss is added with
router_aux_loss_coef and logged as `aux_loss`, as stock trl.DPOTrainer does (single process)."""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from conftest import TRAINER_DEVICE  # noqa: E402
from test_trl import preference_dataset, tiny_tokenizer  # noqa: E402

from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402


def tiny_moe(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=28, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.3,
        max_position_embeddings=128,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(cfg)


def train(cls, tmp_path, fused_lm_head=True):
    datasets.disable_caching()
    args = trl.DPOConfig(
        output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, max_steps=4,
        logging_steps=1, learning_rate=0.5, optim="sgd", report_to=[], save_strategy="no",
        **TRAINER_DEVICE, seed=0, dataloader_num_workers=0, bf16=False, disable_tqdm=True,
    )  # fmt: skip
    kwargs = {} if cls is trl.DPOTrainer else {"fused_lm_head": fused_lm_head}
    trainer = cls(
        model=tiny_moe(0), ref_model=tiny_moe(1), args=args, train_dataset=preference_dataset(),
        processing_class=tiny_tokenizer(), **kwargs,
    )  # fmt: skip
    assert trainer.aux_loss_enabled
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("fused_lm_head", [True, False], ids=["fused-head", "logits"])
def test_moe_router_aux_loss_matches_stock_trl(fused_lm_head, tmp_path):
    stock = train(trl.DPOTrainer, tmp_path)
    ours = train(FusedDPOTrainer, tmp_path, fused_lm_head)
    assert len(stock) == len(ours) == 4
    for step, (s, o) in enumerate(zip(stock, ours, strict=True)):
        assert s.keys() == o.keys() and "aux_loss" in s, (step, s.keys() ^ o.keys())
        assert s["aux_loss"] > 0.5  # 1.0 for perfectly balanced routing: a real, weighted term
        for k in s.keys() - {"learning_rate", "epoch"}:
            assert o[k] == pytest.approx(s[k], rel=1e-5, abs=1e-5), (step, k, s[k], o[k])
    assert stock[0]["aux_loss"] != stock[-1]["aux_loss"]


def test_padding_free_takes_a_mixture_of_experts():
    """Qwen3-MoE keeps packed sequences apart (its packed log-probs equal the padded ones), so
    padding_free's check passes it for any probe tokens. Before 2026-11-27 the check compared two
    forwards whose expert calls grouped the tokens differently, and refused it (a ValueError
    saying it attends across sequences) for 261 of 576 probes of 6 random models."""
    from conftest import preference_examples

    from dpo_kernels import collate_preferences, concatenated_forward
    from dpo_kernels import forward as fw

    model = tiny_moe(1).eval()
    with torch.no_grad():  # weights large enough that the probe's logits carry every bit
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8.0 if "embed" in name or "lm_head" in name else 2.0)
    for a in range(28):
        fw._PACKING_CHECKED.discard(model)
        fw.check_packing(model, torch.tensor([[a, (5 * a + 3) % 28]]))
    batch = collate_preferences(preference_examples(3, vocab=28))
    padded = concatenated_forward(model, batch).policy.logps
    packed = concatenated_forward(model, batch, padding_free=True).policy.logps
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)


def tiny_llama4(seed: int):
    """Llama4's text model: its config declares router_aux_loss_coef (0.001) but its forward
    computes no load-balancing loss (aux_loss None)."""
    torch.manual_seed(seed)
    cfg = transformers.Llama4TextConfig(
        vocab_size=28, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.Llama4ForCausalLM(cfg)


def test_router_loss_the_model_does_not_compute_is_refused(tmp_path):
    """Before 2026-11-27 the fused head added Mixtral's load-balancing loss to a model that has
    none (Llama4: a made-up term of about 1.0 in the logged aux_loss) while the logits path failed
    as `coef * None`. Both now raise, naming the fix; with router_aux_loss_coef=0.0 both train,
    to the same numbers (stock TRL 1.16's own fused head fails on Llama4ForCausalLM)."""
    datasets.disable_caching()
    logs = []
    for fused_lm_head in (True, False):
        for coef in (None, 0.0):
            args = trl.DPOConfig(
                output_dir=str(tmp_path / str(coef)), per_device_train_batch_size=4,
                max_steps=2, logging_steps=1, learning_rate=0.5, optim="sgd", report_to=[],
                save_strategy="no", **TRAINER_DEVICE, seed=0, dataloader_num_workers=0,
                bf16=False, disable_tqdm=True, router_aux_loss_coef=coef,
            )  # fmt: skip
            trainer = FusedDPOTrainer(
                model=tiny_llama4(0), ref_model=tiny_llama4(1), args=args,
                train_dataset=preference_dataset(), processing_class=tiny_tokenizer(),
                fused_lm_head=fused_lm_head,
            )  # fmt: skip
            if coef is None:
                assert trainer.aux_loss_enabled
                with pytest.raises(ValueError, match=r"computes none .* router_aux_loss_coef=0\.0"):
                    trainer.train()
            else:
                trainer.train()
                logs.append([h for h in trainer.state.log_history if "loss" in h])
    fused, plain = logs
    assert len(fused) == len(plain) == 2 and all("aux_loss" not in h for h in fused + plain)
    for f, p in zip(fused, plain, strict=True):
        for k in f.keys() - {"learning_rate", "epoch"}:
            assert f[k] == pytest.approx(p[k], rel=1e-5, abs=1e-5), (k, f[k], p[k])


FSDP2_AUX = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, "tests")
from torch.distributed.fsdp import fully_shard
from conftest import preference_examples
from test_moe_aux import tiny_moe
from dpo_kernels import collate_preferences
from dpo_kernels.batches import preference_batch
from dpo_kernels.forward import model_logprobs

dist.init_process_group("gloo", rank=0, world_size=1)
model = tiny_moe(0)
fully_shard(model)  # swaps in a subclass defined in torch's module
b = preference_batch(collate_preferences(preference_examples(2, vocab=28)))
aux = [model_logprobs(model, b, fused_lm_head=f, router_aux=True).aux_loss.item()
       for f in (True, False)]
print(json.dumps([type(model).__module__, *aux]))
dist.destroy_process_group()
"""


def test_router_loss_of_an_fsdp2_wrapped_model():
    """FSDP2's fully_shard swaps the model's class for a subclass defined in torch's module: the
    fused head finds the model's load_balancing_loss_func along the class's bases, and its router
    loss equals the logits path's (one gloo process)."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    from test_engines import free_port

    root = pathlib.Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=path)
    run = subprocess.run([sys.executable, "-c", FSDP2_AUX], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    module, fused, plain = json.loads(run.stdout.strip().splitlines()[-1])
    assert module.startswith("torch.distributed")  # the class swap this test is about
    assert fused > 0.5 and fused == pytest.approx(plain, rel=1e-6)
