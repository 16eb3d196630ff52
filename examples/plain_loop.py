"""DPO-train a tiny random Llama in a plain PyTorch loop with dpo_kernels (CPU, ~10 s).

    python examples/plain_loop.py [--steps 60]

The preference data is written inline: every prompt is a run of letters; the chosen completion
continues the alphabet, the rejected one repeats the prompt's last letter. The loss falls from
log(2) and the reward accuracy rises as the policy learns to prefer the chosen completions.
"""

from __future__ import annotations

import argparse
import copy
import random

import torch
import transformers

from dpo_kernels import DPOLoss
from dpo_kernels.batches import collate_preferences
from dpo_kernels.forward import concatenated_forward

VOCAB = 30  # 0 = pad, letters a..z are 1..26


def preference_data(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(1, 20)
        prompt = list(range(start, start + rng.randrange(2, 5)))
        k = rng.randrange(2, 5)
        chosen = [min(prompt[-1] + i + 1, 26) for i in range(k)]
        rejected = [prompt[-1]] * k
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def tiny_llama(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.1)
    a = p.parse_args(argv)

    policy = tiny_llama()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    data = preference_data(64)
    loss_fn = DPOLoss(beta=a.beta, loss_type="sigmoid")
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    rng = random.Random(0)
    history = []
    for step in range(1, a.steps + 1):
        batch = collate_preferences(rng.sample(data, a.batch))
        out = concatenated_forward(policy, batch, ref_model=reference)
        res = loss_fn(out.pairs())
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        history.append({"loss": res.loss.item(), **{k: v.item() for k, v in res.metrics.items()}})
        if step % 10 == 0 or step == 1:
            h = history[-1]
            print(
                f"step {step:3d}  loss {h['loss']:.4f}  reward accuracy "
                f"{h['rewards/accuracies']:.2f}  margin {h['rewards/margins']:.3f}"
            )
    return history


if __name__ == "__main__":
    main()
