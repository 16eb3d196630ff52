"""Vision DPO (a tiny LLaVA built from configs, images through its processor): FusedDPOTrainer
trains like stock trl.DPOTrainer, and its eval metrics from `compute_metrics` (which re-run the
model for logits) see the images too. Every logged value and the final parameters, SGD."""

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from conftest import TRAINER_DEVICE  # noqa: E402
from test_trl import LETTERS, preference_dataset  # noqa: E402

from dpo_kernels.integrations.trl import FusedDPOTrainer  # noqa: E402

IMAGE_TOKEN = 28


def processor():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(LETTERS)}, "<image>": 28}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    # user turns: "q <image> text", assistant turns: "r text </s>"
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}q {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
        "{% else %}r {% for c in m['content'] %}{{ c['text'] }} {% endfor %}</s> {% endif %}"
        "{% endfor %}{% if add_generation_prompt %}r {% endif %}"
    )
    tok.chat_template = template
    images = transformers.CLIPImageProcessor(
        size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}
    )
    return transformers.LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=4, chat_template=template,
        vision_feature_select_strategy="full", num_additional_image_tokens=1,
    )  # fmt: skip


def tiny_llava(seed):
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4, projection_dim=16,
    )  # fmt: skip
    text = transformers.LlamaConfig(
        vocab_size=29, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def vision_dataset(n):
    rng = np.random.default_rng(0)

    def text(s):
        return [{"type": "text", "text": s.replace("</s>", "").strip()}]

    rows = preference_dataset(n).to_list()
    return datasets.Dataset.from_list([{
        "images": [PIL.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8"))],
        "prompt": [{"role": "user", "content": [{"type": "image"}, *text(r["prompt"])]}],
        "chosen": [{"role": "assistant", "content": text(r["chosen"])}],
        "rejected": [{"role": "assistant", "content": text(r["rejected"])}],
    } for r in rows])  # fmt: skip


def logit_metrics(pred):
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"mean_logit": float(np.mean(logits)), "max_logit": float(np.max(logits))}


def run(trainer_cls, tmp_path):
    datasets.disable_caching()
    data = vision_dataset(8)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / trainer_cls.__name__), per_device_train_batch_size=4,
        per_device_eval_batch_size=4, max_steps=2, logging_steps=1, learning_rate=0.5,
        optim="sgd", report_to=[], save_strategy="no", seed=0, dataloader_num_workers=0,
        bf16=False, **TRAINER_DEVICE,
    )  # fmt: skip
    trainer = trainer_cls(
        model=tiny_llava(0), ref_model=tiny_llava(1), args=args, train_dataset=data,
        eval_dataset=data.select(range(4)), processing_class=processor(),
        compute_metrics=logit_metrics,
    )  # fmt: skip
    trainer.train()
    logs = [*trainer.state.log_history, trainer.evaluate()]
    return logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_vision_dpo_matches_stock_with_eval_metrics_from_the_images(tmp_path):
    (stock, stock_params), (ours, our_params) = (
        run(c, tmp_path) for c in (trl.DPOTrainer, FusedDPOTrainer)
    )
    assert len(stock) == len(ours)
    assert "eval_mean_logit" in stock[-1]
    for step, (s, o) in enumerate(zip(stock, ours, strict=True)):
        for k, v in s.items():
            if isinstance(v, float) and not k.endswith(("runtime", "per_second")):
                assert o[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k, v, o[k])
    for name, p in stock_params.items():
        torch.testing.assert_close(our_params[name], p, rtol=1e-5, atol=1e-6, msg=name)
