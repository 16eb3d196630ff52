"""The DPO paper's controlled-sentiment experiment in miniature: reward vs KL, on a CPU.

    python examples/sentiment_frontier.py          # the full run (docs/sentiment_frontier.md)
    python examples/sentiment_frontier.py --quick  # CI-sized (tests/test_sentiment_frontier.py)

Rafailov et al. 2023 (arXiv 2305.18290, Sec. 6.1, Fig. 2) fine-tune GPT-2 on IMDb reviews, then
train it with DPO to write positive continuations of review prefixes; a sentiment classifier is the
ground-truth reward, and each policy is placed by its mean reward and its sequence-level KL to the
SFT reference. This script does the same with everything small and known, nothing downloaded.

**The language.** A vocabulary of 211 words: `<pad>`, `</s>`, `not`, 24 positive words `p0..p23`,
24 negative words `n0..n23` (magnitudes 0.5, 1 and 2, eight of each) and 160 neutral words
`w0..w159`. A review is 16 words. It has a hidden mood (negative, mixed or positive, equally
likely): at each position, with probability 0.25, it voices a sentiment, positive with probability
0.15, 0.5 or 0.85 by mood, as a word of that polarity drawn uniformly, or (probability 0.15) as
`not` followed by a word of the opposite polarity; otherwise it continues a sparse random bigram
chain over the neutral words (5 successors each, Dirichlet weights). The first 4 words are the
prompt (the paper's "prefix"), the other 12 the completion.

**The true reward** (the stand-in for the sentiment classifier) of a completion is
`sigmoid(score / 2)`, `score` = the sum of the weights of its sentiment words, a word right after
`not` counting with the opposite sign (the prompt's last word counts as context). It lies in (0, 1),
is 0.5 for a neutral text and near 1 for 12 strong positive words.

**SFT.** A Llama (transformers `LlamaConfig`, 2 layers, hidden size 64, built from scratch, about
0.1M parameters) is trained by next-token cross-entropy on freshly generated reviews (each followed
by `</s>`), in a plain PyTorch loop. It is the reference model and the initial policy of every run.

**Preference pairs, as in the paper.** For each training prompt (fresh prefixes from the
generator) the SFT model samples 4 completions (temperature 1, the full softmax); every one of the
6 pairs is labelled by the true reward, the higher reward being "chosen" (the argmax, not
Bradley-Terry sampling); tied pairs are dropped. The data are text (`prompt`, `chosen`,
`rejected`) with a word-level tokenizer built locally (`tokenizers.WordLevel`), which is what
TRL 1.16's `DPOTrainer` takes; TRL tokenizes them and appends `</s>`.

**Training.** `dpo_kernels.integrations.trl.FusedDPOTrainer` at each beta, and stock
`trl.DPOTrainer` (same seed, data, optimizer, float32) at the betas given by `--stock-betas`:
sigmoid loss, AdamW, constant learning rate, the frozen SFT model as `ref_model`.

**Measurement.** Every `Config.eval_every` steps (and at step 0) a callback samples one
completion per held-out prompt from the policy (its own `torch.Generator`, the same seed at every
evaluation, so the training RNG is untouched and all runs see the same prompts and random draws)
and reports the mean true reward and the sequence-level KL(policy || SFT), estimated as the paper
does from the samples: the mean over samples of `log pi(y|x) - log pi_ref(y|x)` summed over the 12
sampled words (standard errors from the sample spread).

**Outputs** (in `--out`): `frontier.png` (reward vs KL, one curve per beta and trainer, stock and
fused on the same axes; reward vs step; KL vs step), `frontier.json` (every evaluation point, every
logged loss, the configuration), and a printed table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import transformers

PROMPT_LEN = 4
COMPLETION_LEN = 12
N_SENT = 24  # positive words, and as many negative ones
N_NEUTRAL = 160
PAD, EOS, NOT = 0, 1, 2
POS0 = 3  # p0..p23 are ids 3..26, n0..n23 are 27..50, w0..w159 are 51..210
NEG0 = POS0 + N_SENT
NEU0 = NEG0 + N_SENT
VOCAB = NEU0 + N_NEUTRAL


@dataclass
class Config:
    """Sizes of one run; `quick()` is the CI-sized variant."""

    betas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0)
    stock_betas: tuple[float, ...] = (0.05, 1.0)
    sft_steps: int = 400
    sft_batch: int = 128
    train_prompts: int = 2048
    samples_per_prompt: int = 4
    dpo_batch: int = 64
    epochs: int = 1
    lr: float = 5e-4
    eval_prompts: int = 1024
    eval_every: int = 15
    seed: int = 0

    @staticmethod
    def quick() -> Config:
        return Config(
            betas=(0.1,), stock_betas=(0.1,), train_prompts=1024, eval_prompts=512, eval_every=15
        )


# ----------------------------------------------------------------------------- the language


@dataclass
class Language:
    """The synthetic review language: its word weights and its neutral bigram chain."""

    weights: torch.Tensor  # [VOCAB] float64 sentiment weight of each word (0 for the others)
    successors: torch.Tensor  # [N_NEUTRAL, 5] neutral word -> its successors (neutral indices)
    succ_probs: torch.Tensor  # [N_NEUTRAL, 5]
    p_sentiment: float = 0.25
    p_not: float = 0.15
    mood_p_pos: tuple[float, ...] = (0.15, 0.5, 0.85)
    words: list[str] = field(default_factory=list)

    @staticmethod
    def build(seed: int = 0) -> Language:
        g = torch.Generator().manual_seed(seed)
        mags = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).repeat_interleave(N_SENT // 3)
        weights = torch.zeros(VOCAB, dtype=torch.float64)
        weights[POS0:NEG0] = mags
        weights[NEG0:NEU0] = -mags
        successors = torch.stack(
            [torch.randperm(N_NEUTRAL, generator=g)[:5] for _ in range(N_NEUTRAL)]
        )
        gamma = -torch.log(torch.rand(N_NEUTRAL, 5, generator=g))  # Exp(1): Dirichlet(1) weights
        succ_probs = gamma / gamma.sum(1, keepdim=True)
        words = ["<pad>", "</s>", "not"]
        words += [f"p{i}" for i in range(N_SENT)] + [f"n{i}" for i in range(N_SENT)]
        words += [f"w{i}" for i in range(N_NEUTRAL)]
        return Language(weights, successors, succ_probs, words=words)

    def sample(self, n: int, g: torch.Generator, length: int = PROMPT_LEN + COMPLETION_LEN):
        """n reviews of `length` word ids, [n, length] int64."""
        moods = torch.tensor(self.mood_p_pos)[
            torch.randint(0, len(self.mood_p_pos), (n,), generator=g)
        ]
        out = torch.empty(n, length, dtype=torch.long)
        neutral = torch.randint(0, N_NEUTRAL, (n,), generator=g)  # the chain's current word
        pending = torch.zeros(n, dtype=torch.long)  # after `not`: +1/-1 polarity to write next
        for t in range(length):
            u = torch.rand(n, 4, generator=g)
            word = torch.randint(0, N_SENT, (n,), generator=g)
            sign = torch.where(u[:, 1] < moods, 1, -1)
            negate = u[:, 2] < self.p_not
            sentiment = u[:, 0] < self.p_sentiment
            # neutral continuation
            pick = torch.multinomial(self.succ_probs[neutral], 1, generator=g).squeeze(1)
            nxt = self.successors[neutral, pick]
            tok = NEU0 + nxt
            polar = torch.where(sign > 0, POS0, NEG0) + word
            tok = torch.where(sentiment & ~negate, polar, tok)
            tok = torch.where(sentiment & negate, torch.full_like(tok, NOT), tok)
            written = torch.where(pending > 0, POS0 + word, NEG0 + word)
            tok = torch.where(pending != 0, written, tok)
            is_neutral = (pending == 0) & ~sentiment
            neutral = torch.where(is_neutral, nxt, neutral)
            # `not` + a word of the opposite polarity voices `sign`
            pending = torch.where((pending == 0) & sentiment & negate, -sign, 0)
            out[:, t] = tok
        return out

    def reward(self, seqs: torch.Tensor, start: int = PROMPT_LEN) -> torch.Tensor:
        """True reward of the completions seqs[:, start:], float64 [n]: sigmoid(score / 2)."""
        w = self.weights[seqs[:, start:]]
        negated = seqs[:, start - 1 : -1] == NOT
        score = torch.where(negated, -w, w).sum(1)
        return torch.sigmoid(score / 2)


# ----------------------------------------------------------------------------- models


def tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def pretrain_sft(lang: Language, cfg: Config) -> tuple[transformers.LlamaForCausalLM, list[float]]:
    """The SFT model: next-token cross-entropy on freshly generated reviews + `</s>`."""
    model = tiny_llama(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 2 * (1 - s / cfg.sft_steps)))
    losses = []
    model.train()
    for _ in range(cfg.sft_steps):
        seqs = lang.sample(cfg.sft_batch, g)
        ids = torch.cat([seqs, torch.full((len(seqs), 1), EOS)], 1)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval().requires_grad_(False), losses


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module, prompts: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample COMPLETION_LEN words after each prompt from the full softmax (temperature 1).

    Returns the full sequences [n, PROMPT_LEN + COMPLETION_LEN] and the model's log-probability
    of each sampled completion [n] (float64)."""
    seqs, logp = prompts, torch.zeros(len(prompts), dtype=torch.float64)
    for _ in range(COMPLETION_LEN):
        lp = model(input_ids=seqs).logits[:, -1].float().log_softmax(-1)
        nxt = torch.multinomial(lp.exp(), 1, generator=g)
        logp += lp.gather(1, nxt).squeeze(1).double()
        seqs = torch.cat([seqs, nxt], 1)
    return seqs, logp


@torch.no_grad()
def completion_logprob(model: torch.nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """log p(completion | prompt) under `model`, summed over the completion words, float64 [n]."""
    lp = model(input_ids=seqs).logits[:, PROMPT_LEN - 1 : -1].float().log_softmax(-1)
    return lp.gather(2, seqs[:, PROMPT_LEN:, None]).squeeze(2).double().sum(1)


def evaluate(
    policy: torch.nn.Module, ref: torch.nn.Module, lang: Language, prompts: torch.Tensor, seed: int
) -> dict[str, float]:
    """Mean true reward and Monte-Carlo sequence KL(policy || ref) over one sample per prompt."""
    was_training = policy.training
    policy.eval()
    seqs, logp = sample_completions(policy, prompts, torch.Generator().manual_seed(seed))
    policy.train(was_training)
    reward = lang.reward(seqs)
    kl = logp - completion_logprob(ref, seqs)
    n = len(prompts)
    return {
        "reward": reward.mean().item(),
        "reward_se": reward.std().item() / math.sqrt(n),
        "kl": kl.mean().item(),
        "kl_se": kl.std().item() / math.sqrt(n),
    }


# ----------------------------------------------------------------------------- DPO with TRL


def word_tokenizer(lang: Language) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of the language, built locally: one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(lang.words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>"
    )


def preference_pairs(
    sft: torch.nn.Module, lang: Language, cfg: Config
) -> tuple[list[dict[str, str]], dict[str, float]]:
    """Pairs of SFT samples per training prompt, the higher true reward chosen; ties dropped."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    prompts = lang.sample(cfg.train_prompts, g, length=PROMPT_LEN)
    k = cfg.samples_per_prompt
    seqs, _ = sample_completions(sft, prompts.repeat_interleave(k, 0), g)
    rewards = lang.reward(seqs).view(-1, k)
    seqs = seqs.view(-1, k, seqs.shape[1])

    def text(ids: torch.Tensor) -> str:
        return " ".join(lang.words[i] for i in ids.tolist())

    rows, ties = [], 0
    for p in range(len(prompts)):
        for i in range(k):
            for j in range(i + 1, k):
                ri, rj = rewards[p, i].item(), rewards[p, j].item()
                if ri == rj:
                    ties += 1
                    continue
                c, r = (i, j) if ri > rj else (j, i)
                rows.append({
                    "prompt": text(prompts[p]),
                    "chosen": " " + text(seqs[p, c, PROMPT_LEN:]) + " </s>",
                    "rejected": " " + text(seqs[p, r, PROMPT_LEN:]) + " </s>",
                })  # fmt: skip
    gap = [
        rewards[p, i] - rewards[p, j]
        for p in range(len(prompts))
        for i in range(k)
        for j in range(i + 1, k)
    ]
    stats = {
        "pairs": len(rows),
        "ties_dropped": ties,
        "mean_abs_reward_gap": torch.stack(gap).abs().mean().item(),
    }
    return rows, stats


class EvalCallback(transformers.TrainerCallback):
    """Evaluates the policy every `every` optimizer steps."""

    def __init__(self, fn, every: int) -> None:
        self.fn, self.every, self.points = fn, every, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.points.append({"step": state.global_step, **self.fn(model)})


def train_dpo(
    trainer_cls: type,
    sft: torch.nn.Module,
    rows: list[dict[str, str]],
    lang: Language,
    beta: float,
    cfg: Config,
    eval_prompts: torch.Tensor,
    sft_point: dict[str, float],
) -> dict:
    """One DPO run from the SFT model; returns its evaluation points and logged losses."""
    import datasets
    import trl

    datasets.disable_caching()
    datasets.disable_progress_bars()
    policy = copy.deepcopy(sft).train().requires_grad_(True)
    ref = copy.deepcopy(sft)  # the trainer's reference (TRL patches it)
    scorer = copy.deepcopy(sft)  # our own copy for the KL, never touched by a trainer
    with tempfile.TemporaryDirectory() as out_dir:
        args = trl.DPOConfig(
            output_dir=out_dir,
            beta=beta,
            loss_type=["sigmoid"],
            per_device_train_batch_size=cfg.dpo_batch,
            num_train_epochs=cfg.epochs,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            weight_decay=0.0,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,  # fp32: TRL would turn CPU bf16 autocast on
            seed=cfg.seed,
            data_seed=cfg.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        callback = EvalCallback(
            lambda m: evaluate(m, scorer, lang, eval_prompts, cfg.seed + 3), cfg.eval_every
        )
        import datasets as ds

        trainer = trainer_cls(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=ds.Dataset.from_list(rows),
            processing_class=word_tokenizer(lang),
            callbacks=[callback],
        )
        trainer.remove_callback(transformers.PrinterCallback)  # no dict printed per step
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "trainer": "fused" if trainer_cls is not trl.DPOTrainer else "stock",
        "beta": beta,
        "seconds": seconds,
        "points": [{"step": 0, **sft_point}, *callback.points],
        "losses": [h["loss"] for h in logs],
        "reward_accuracies": [h["rewards/accuracies"] for h in logs],
    }


# ----------------------------------------------------------------------------- outputs


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    betas = sorted({r["beta"] for r in runs})
    shades = plt.get_cmap("viridis")(torch.linspace(0, 0.9, len(betas)).tolist())
    colors = dict(zip(betas, shades, strict=True))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for r in runs:
        pts, c = r["points"], colors[r["beta"]]
        fused = r["trainer"] == "fused"
        style = dict(
            color=c, marker="o" if fused else "x", ls="-" if fused else "--",
            ms=5 if fused else 7, lw=1.5 if fused else 1.0,
            label=f"beta={r['beta']:g} {'FusedDPOTrainer' if fused else 'trl.DPOTrainer'}",
        )  # fmt: skip
        axes[0].plot([p["kl"] for p in pts], [p["reward"] for p in pts], **style)
        axes[1].plot([p["step"] for p in pts], [p["reward"] for p in pts], **style)
        axes[2].plot([p["step"] for p in pts], [p["kl"] for p in pts], **style)
    sft = result["sft"]
    axes[0].axhline(sft["reward"], color="grey", lw=0.8, ls=":", label="SFT")
    axes[0].set(xlabel="KL(policy || SFT), nats per sequence", ylabel="mean true reward",
                title="reward vs KL frontier")  # fmt: skip
    axes[1].set(xlabel="DPO step", ylabel="mean true reward", title="reward over training")
    axes[2].set(xlabel="DPO step", ylabel="KL(policy || SFT)", title="KL over training")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"DPO on a synthetic sentiment task ({result['config']['mode']}): "
        f"{result['data']['pairs']} pairs, "
        f"{result['config']['eval_prompts']} eval samples per point"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    sft = result["sft"]
    lines = [
        f"SFT: reward {sft['reward']:.3f} +- {sft['reward_se']:.3f}",
        f"{'beta':>6} {'trainer':>8} {'steps':>5} {'reward':>14} {'KL':>14} "
        f"{'max|dloss| vs stock':>20} {'seconds':>8}",
    ]
    for r in result["runs"]:
        p = r["points"][-1]
        d = r.get("max_abs_loss_diff_vs_stock")
        lines.append(
            f"{r['beta']:>6g} {r['trainer']:>8} {p['step']:>5d} "
            f"{p['reward']:>7.3f} +-{p['reward_se']:.3f} {p['kl']:>7.2f} +-{p['kl_se']:.2f} "
            f"{'' if d is None else f'{d:.2e}':>20} {r['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the CI-sized run (one beta)")
    p.add_argument("--out", default="sentiment_frontier_out", help="folder for the PNG and JSON")
    p.add_argument("--betas", type=float, nargs="+", help="FusedDPOTrainer betas")
    p.add_argument(
        "--stock-betas", type=float, nargs="*", help="betas also run with trl.DPOTrainer"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (the model is too small to gain from more)",
    )
    a = p.parse_args(argv)

    import trl

    from dpo_kernels.integrations.trl import FusedDPOTrainer

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = Config.quick() if a.quick else Config()
    if a.betas:
        cfg.betas = tuple(a.betas)
    if a.stock_betas is not None:
        cfg.stock_betas = tuple(a.stock_betas)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()

    t0 = time.perf_counter()
    lang = Language.build(cfg.seed)
    sft, sft_losses = pretrain_sft(lang, cfg)
    print(f"SFT: {cfg.sft_steps} steps, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f} "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    rows, data_stats = preference_pairs(sft, lang, cfg)
    eval_prompts = lang.sample(
        cfg.eval_prompts, torch.Generator().manual_seed(cfg.seed + 4), PROMPT_LEN
    )
    sft_point = evaluate(sft, sft, lang, eval_prompts, cfg.seed + 3)
    print(f"data: {data_stats['pairs']} pairs; SFT reward {sft_point['reward']:.3f}")

    runs = []
    for beta in cfg.betas:
        for cls in [FusedDPOTrainer] + ([trl.DPOTrainer] if beta in cfg.stock_betas else []):
            run = train_dpo(cls, sft, rows, lang, beta, cfg, eval_prompts, sft_point)
            runs.append(run)
            last = run["points"][-1]
            print(f"beta {beta:g} {run['trainer']}: reward {last['reward']:.3f}, KL "
                  f"{last['kl']:.2f} ({run['seconds']:.0f} s)")  # fmt: skip
        fused = next(r for r in runs if r["beta"] == beta and r["trainer"] == "fused")
        stock = [r for r in runs if r["beta"] == beta and r["trainer"] == "stock"]
        if stock:
            diffs = [abs(x - y) for x, y in zip(fused["losses"], stock[0]["losses"], strict=True)]
            fused["max_abs_loss_diff_vs_stock"] = max(diffs)
            fused["max_abs_reward_diff_vs_stock"] = max(
                abs(x["reward"] - y["reward"])
                for x, y in zip(fused["points"], stock[0]["points"], strict=True)
            )

    result = {
        "config": {**asdict(cfg), "mode": "quick" if a.quick else "full",
                   "torch_threads": torch.get_num_threads(), "trl": trl.__version__},
        "language": {"vocab": VOCAB, "prompt_len": PROMPT_LEN, "completion_len": COMPLETION_LEN,
                     "p_sentiment": lang.p_sentiment, "p_not": lang.p_not,
                     "mood_p_pos": list(lang.mood_p_pos)},
        "sft": {**sft_point, "first_loss": sft_losses[0], "last_loss": sft_losses[-1]},
        "data": data_stats,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "frontier.png")
    print(table(result))
    print(f"wrote {out / 'frontier.png'} and {out / 'frontier.json'} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
