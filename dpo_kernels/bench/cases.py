"""Cases and their inputs: the shape grid's unit (Case), a result row (Row), seeded random inputs
that every process (and the float64 reference) rebuilds identically, the fwd+bwd step wrapper
(GradStep) and the check of a result against the float64 reference."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import make_spec

DPO_BETA = make_spec().beta  # TRL's default, given to every method and the reference
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


def parse_shape(text: str) -> tuple[int, ...]:
    """Shape text to ints: 4x512x32000 -> (4, 512, 32000)."""
    return tuple(int(x) for x in text.lower().split("x"))


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    method: str
    time_ms: float | None = None
    speedup: float | None = None
    tokens: int = 0  # tokens one step processes (padding excluded)
    tokens_per_s: float | None = None
    extra_mib: float | None = None
    mem_ratio: float | None = None
    value_err: float | None = None  # of the checked values, relative to their scale
    grad_err: float | None = None  # of the gradients, relative to their largest entry
    roofline: float | None = None  # fraction of the bandwidth bound reached
    status: str = "ok"  # ok | WRONG | skipped (a peer not run, or failing) | FAILED (ours raised)
    note: str = ""  # shortened for the table
    error: str = ""  # the whole exception message of a FAILED (or failing, skipped) row


# ------------------------------------------------------------------------------------------
# Inputs. Random, seeded: every process (and the float64 reference) builds the same ones.


def _prompt_mask(B: int, T: int, device: str) -> torch.Tensor:
    """[B, T] bool: the first quarter of each sequence is the prompt and does not count."""
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, : T // 4] = False
    return mask


def logits_inputs(case: Case, device: str):
    """Logits [B, T, V], labels [B, T], mask [B, T]: the first quarter of tokens is the prompt.
    Drawn on the device (CUDA draws other numbers than the CPU, the same in every process)."""
    B, T, V = case.shape
    g = torch.Generator(device).manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g, device=device) * 2).to(DTYPES[case.dtype])
    labels = torch.randint(0, V, (B, T), generator=g, device=device)
    return logits, labels, _prompt_mask(B, T, device)


def linear_inputs(case: Case, device: str):
    """hidden [B, T, H] (randn), LM head weight [V, H] (randn * 0.02: logits of std ~0.45 at
    H = 512), labels [B, T], mask [B, T]: the first quarter of tokens is the prompt."""
    B, T, H, V = case.shape
    g = torch.Generator(device).manual_seed(0)
    dtype = DTYPES[case.dtype]
    hidden = torch.randn(B, T, H, generator=g, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=device) * 0.02).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g, device=device)
    return hidden, weight, labels, _prompt_mask(B, T, device)


def preference_inputs(case: Case, device: str) -> dict[str, torch.Tensor]:
    """A collated [chosen; rejected] batch of P pairs of random token ids (shape P x T x V).

    dpo_step: every row is T tokens, the first quarter prompt. packed: prompts of T/32..T/16
    tokens and completions of T/16..T tokens, uniform (64..1024 at T = 1024), right-padded.
    """
    from .. import collate_preferences

    P, T, V = case.shape
    g = torch.Generator().manual_seed(0)

    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(max(lo, 1), max(hi, 1) + 1, (1,), generator=g))
        return torch.randint(2, V, (n,), generator=g).tolist()

    prompt, completion = (T // 4, T // 4), (T - T // 4, T - T // 4)
    if case.op == "packed":
        prompt, completion = (T // 32, T // 16), (T // 16, T)
    examples = [
        {
            "prompt_ids": ids(*prompt),
            "chosen_ids": ids(*completion),
            "rejected_ids": ids(*completion),
        }
        for _ in range(P)
    ]
    return {k: v.to(device) for k, v in collate_preferences(examples).items()}


def tiny_llama(vocab: int, seed: int, device: str) -> torch.nn.Module:
    """A random 2-layer Llama (hidden 256, 4 heads), float32, built from its config: nothing is
    downloaded. The same seed gives the same weights in every process."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).to(device).train()


def linear_dpo_inputs(case: Case, device: str):
    """`linear_inputs` of a [chosen (P); rejected (P)] batch (B = 2P rows), a reference head
    (the policy head plus noise of 1/10 its scale) and the reference sums it gives, precomputed
    as a trainer would (not timed)."""
    from .. import linear_sequence_logprobs

    hidden, weight, labels, mask = linear_inputs(case, device)
    g = torch.Generator(device).manual_seed(1)
    noise = (torch.randn(weight.shape, generator=g, device=device) * 0.002).to(weight.dtype)
    ref_weight = weight + noise
    with torch.no_grad():
        ref = linear_sequence_logprobs(hidden, ref_weight, labels, mask=mask).logps
    P = case.shape[0] // 2
    return hidden, weight, labels, mask, ref_weight, ref[:P], ref[P:]


def batch_tokens(case: Case) -> int:
    """Real (not padding) tokens of the case's preference batch."""
    return int(preference_inputs(case, "cpu")["attention_mask"].sum())


def bt_tokens(case: Case) -> int:
    """B x T: every token of the case's [B, T] inputs."""
    return case.shape[0] * case.shape[1]


# ------------------------------------------------------------------------------------------
# Methods. A method builds a step: one fwd+bwd returning (values, gradients) to check against the
# float64 reference, or None for a timing reference.

Result = tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]
Step = Callable[[], Result | None]


def incoming_grad(values: torch.Tensor) -> torch.Tensor:
    """The seeded, non-uniform gradient backpropagated into `values` (the same for every method
    and the reference): magnitudes 1/2 to 3/2 in steps of 1/8, never 1 (exact in every dtype), and
    random signs, the first negative (a scalar's is). A backward that ignores its incoming
    gradient's scale or sign gets it wrong."""
    g = torch.Generator().manual_seed(2)
    scales = torch.tensor([0.5, 0.625, 0.75, 0.875, 1.125, 1.25, 1.375, 1.5])
    scale = scales[torch.randint(0, len(scales), values.shape, generator=g)]
    sign = torch.randint(0, 2, values.shape, generator=g) * 2 - 1
    sign.view(-1)[:1] = -1
    return (scale * sign).to(values.device, values.dtype)


class GradStep:
    """fwd+bwd into the gradients of `leaves`. `forward()` returns the checked values; they are
    backpropagated with `incoming_grad` and the leaves' gradients are returned with them. With
    `own_objective`, `forward()` returns (values, objective) and the gradients (of another
    objective) are not returned: only the values are checked."""

    def __init__(
        self, leaves: list[torch.Tensor], forward: Callable, own_objective: bool = False
    ) -> None:
        self.leaves, self.forward, self.own_objective = leaves, forward, own_objective
        self.grad_out: torch.Tensor | None = None  # made once, not in the timed steps

    def __call__(self) -> Result:
        self.release()
        out = self.forward()
        if self.own_objective:
            values, objective = out
            if not torch.isfinite(objective).all():  # its values may be right, its gradients not
                raise FloatingPointError(f"its own objective is not finite ({objective.item()})")
        else:
            if self.grad_out is None:
                self.grad_out = incoming_grad(out)
            values, objective = out, (out * self.grad_out).sum()
        objective.backward()
        grads = None if self.own_objective else tuple(t.grad for t in self.leaves)
        return values.detach(), grads

    def release(self) -> None:
        """Free the gradients, so that the next step allocates them afresh (and is measured so)."""
        for t in self.leaves:
            t.grad = None


# (value err, grad err) a correct method stays within, by dtype: about 10x the worst of every
# method, ours and the peers, on CPU at the default and quick grids. fp32: up to 3.6e-5 / 4.5e-5
# (the linear_dpo losses, whose log-prob sums cancel in the margin; 1.4e-5 grad elsewhere). bf16:
# the sums within 1e-3 relative (the target: ours accumulate in float32), the gradients
# one rounding of the stored ones (4.7e-3 on CPU, 8.4e-3 on an H200). fp16: 4.1e-4 grad.
TOLERANCES = {"fp32": (5e-4, 5e-4), "bf16": (1e-3, 2e-2), "fp16": (1e-3, 5e-3)}


def check(got: Result, ref: Result, dtype: str) -> tuple[float, float | None, bool]:
    """Largest error of the values (relative to their scale, at least 1) and of the gradients
    (relative to each one's largest reference entry), and whether both are finite and within the
    dtype's TOLERANCES. A method whose gradient is of another objective (None) is checked on its
    values only."""
    values, grads = got
    rvalues, rgrads = ref
    v_tol, g_tol = TOLERANCES[dtype]
    v_err = ((values.double() - rvalues).abs() / rvalues.abs().clamp(min=1)).max().item()
    v_ok = math.isfinite(v_err) and v_err <= v_tol
    if grads is None:
        return v_err, None, v_ok
    tiny = torch.finfo(torch.float64).tiny
    errs = [  # g - r promotes to float64: one temporary, not two
        ((g - r).abs_().max() / r.abs().max().clamp(min=tiny)).item()
        for g, r in zip(grads, rgrads, strict=True)
    ]
    g_err = next((e for e in errs if not math.isfinite(e)), max(errs))  # max() drops a NaN
    return v_err, g_err, v_ok and math.isfinite(g_err) and g_err <= g_tol


def sigmoid_loss(sums: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """The sigmoid DPO loss (beta = DPO_BETA) of [chosen; rejected] sums, as [1]."""
    pc, pr = sums.chunk(2)
    return -torch.nn.functional.logsigmoid(DPO_BETA * ((pc - rc) - (pr - rr))).mean()[None]
