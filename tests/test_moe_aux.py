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
