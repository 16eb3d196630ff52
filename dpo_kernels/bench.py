"""The main job: forward+backward of the fused ops against naive PyTorch (and peers), in a table.

Measurement rules (shared/DESIGN.md): times are medians after a warm-up, all methods of a case in
the same process run, speed-ups and memory ratios are over the op's first method (its baseline)
within that run. Peak memory comes from one fresh process per method (forked from a server that
has done the imports): MALLOC_MMAP_THRESHOLD_ is set so freed tensors go back to the OS,
`/proc/self/clear_refs` resets the high-water mark after a warm-up, and the extra peak is VmHWM
after one fwd+bwd minus VmRSS before it. On CUDA: triton.testing.do_bench and
torch.cuda.max_memory_allocated. Every output is checked against a float64 reference; a fast
wrong answer is marked WRONG.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STREAM_BYTES = 1 << 29  # 512 MiB buffers for the bandwidth probe


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
    status: str = "ok"  # ok | WRONG | skipped
    note: str = ""


# ------------------------------------------------------------------------------------------
# Inputs. Random, seeded: every process (and the float64 reference) builds the same ones.


def _prompt_mask(B: int, T: int, device: str) -> torch.Tensor:
    """[B, T] bool: the first quarter of each sequence is the prompt and does not count."""
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, : T // 4] = False
    return mask


def logits_inputs(case: Case, device: str):
    """Logits [B, T, V], labels [B, T], mask [B, T]: the first quarter of tokens is the prompt."""
    B, T, V = case.shape
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(DTYPES[case.dtype]).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    return logits, labels, _prompt_mask(B, T, device)


def linear_inputs(case: Case, device: str):
    """hidden [B, T, H] (randn), LM head weight [V, H] (randn * 0.02: logits of std ~0.45 at
    H = 512), labels [B, T], mask [B, T]: the first quarter of tokens is the prompt."""
    B, T, H, V = case.shape
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[case.dtype]
    hidden = torch.randn(B, T, H, generator=g).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) * 0.02).to(dtype).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    return hidden, weight, labels, _prompt_mask(B, T, device)


def preference_inputs(case: Case, device: str) -> dict[str, torch.Tensor]:
    """A collated [chosen; rejected] batch of P pairs of random token ids (shape P x T x V).

    dpo_step: every row is T tokens, the first quarter prompt. packed: prompts of T/32..T/16
    tokens and completions of T/16..T tokens, uniform (64..1024 at T = 1024), right-padded.
    """
    from .forward import collate_preferences

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


# ------------------------------------------------------------------------------------------
# Methods. A method builds a step: one fwd+bwd returning (values, gradients) to check against the
# float64 reference, or None for a timing reference.

Result = tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]
Step = Callable[[], Result | None]


class GradStep:
    """fwd+bwd into the gradients of `leaves`. `forward()` returns the checked values; their sum
    is backpropagated and the leaves' gradients are returned with them. With `own_objective`,
    `forward()` returns (values, objective) and the gradients (of another objective) are not
    returned: only the values are checked."""

    def __init__(
        self, leaves: list[torch.Tensor], forward: Callable, own_objective: bool = False
    ) -> None:
        self.leaves, self.forward, self.own_objective = leaves, forward, own_objective

    def __call__(self) -> Result:
        self.release()
        out = self.forward()
        values, objective = out if self.own_objective else (out, out.sum())
        objective.backward()
        grads = None if self.own_objective else tuple(t.grad for t in self.leaves)
        return values.detach(), grads

    def release(self) -> None:
        """Free the gradients, so that the next step allocates them afresh (and is measured so)."""
        for t in self.leaves:
            t.grad = None


def _logits_step(case: Case, device: str, logps_of) -> GradStep:
    """fwd+bwd of logps_of(logits, labels, mask) -> [B]; gradient of the logits."""
    logits, labels, mask = logits_inputs(case, device)
    z = logits.requires_grad_()
    return GradStep([z], lambda: logps_of(z, labels, mask))


def _naive_logps(z, labels, mask):
    lp = z.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def _naive(case, device) -> Step:
    return _logits_step(case, device, _naive_logps)


def _ours(case, device) -> Step:
    from .logprobs import sequence_logprobs

    return _logits_step(
        case, device, lambda z, labels, mask: sequence_logprobs(z, labels, mask=mask).logps
    )


def _trl_selective(case, device) -> Step:
    from trl.trainer.utils import selective_log_softmax

    return _logits_step(
        case, device, lambda z, labels, mask: (selective_log_softmax(z, labels) * mask).sum(-1)
    )


def _linear_step(case: Case, device: str, logps_of) -> GradStep:
    """fwd+bwd of logps_of(hidden, weight, labels, mask) -> [B]; gradients of hidden and weight."""
    hidden, weight, labels, mask = linear_inputs(case, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    return GradStep([h, w], lambda: logps_of(h, w, labels, mask))


def _linear_naive(case, device) -> Step:
    return _linear_step(case, device, lambda h, w, y, mask: _naive_logps(h @ w.T, y, mask))


def _linear_ours(case, device) -> Step:
    from .linear_logprobs import linear_sequence_logprobs

    return _linear_step(
        case,
        device,
        lambda h, w, labels, mask: linear_sequence_logprobs(h, w, labels, mask=mask).logps,
    )


def _linear_trl(case, device) -> Step:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer import utils

    # The chunk TRL's DPOTrainer passes (one vocabulary chunk up to 32k), on the counted rows only
    # (what the trainer passes on CUDA; on CPU it scores every row).
    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)

    def logps_of(h, w, labels, mask):
        lp = ChunkedLogProbFunction.apply(h[mask], w, None, labels[mask], 1.0, chunk, None, 1.0, ())
        return lp[0].new_zeros(mask.shape).masked_scatter(mask, lp[0]).sum(-1)

    return _linear_step(case, device, logps_of)


def _cce(linear_cross_entropy) -> Callable[[Case, str], Step]:
    def build(case, device) -> Step:
        def logps_of(h, w, labels, mask):
            targets = labels.masked_fill(~mask, -100)
            return -linear_cross_entropy(h, w, targets, reduction="none").sum(-1)

        return _linear_step(case, device, logps_of)

    return build


def _cce_torch_compile(case, device) -> Step:
    from cut_cross_entropy.torch_compile import torch_compile_linear_cross_entropy

    return _cce(torch_compile_linear_cross_entropy)(case, device)


def _cce_triton(case, device) -> Step:
    from cut_cross_entropy import linear_cross_entropy

    return _cce(linear_cross_entropy)(case, device)


def _liger_dpo(case, device) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # Liger fuses the LM head with a whole DPO loss (first half chosen, second half rejected): its
    # sums are checked, its gradients (of the DPO loss, not of the sums) are not.
    loss_fn = LigerFusedLinearDPOLoss(use_ref_model=False)
    hidden, weight, labels, mask = linear_inputs(case, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    targets = labels.masked_fill(~mask, -100)

    def forward():
        loss, aux = loss_fn(w, h, targets)
        return torch.cat([aux[0], aux[1]]), loss

    return GradStep([h, w], forward, own_objective=True)


def _linear_matmuls(case, device) -> Step:
    """Timing reference: the 4 plain matmuls the fused op does over the counted tokens."""
    hidden, weight, _, mask = linear_inputs(case, device)
    h = hidden[mask]
    dz = torch.randn(h.shape[0], weight.shape[0], device=device).to(weight.dtype)
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(weight)

    def step():  # into preallocated outputs: matmul time only, no page faults
        torch.mm(h, weight.T, out=z)  # forward
        torch.mm(h, weight.T, out=z)  # backward: recomputed
        torch.mm(dz, weight, out=dh)  # dh
        torch.mm(dz.T, h, out=dw)  # dW

    return step


def linear_dpo_inputs(case: Case, device: str):
    """`linear_inputs` of a [chosen (P); rejected (P)] batch (B = 2P rows), a reference head
    (the policy head plus noise of 1/10 its scale) and the reference sums it gives, precomputed
    as a trainer would (not timed)."""
    from .linear_logprobs import linear_sequence_logprobs

    hidden, weight, labels, mask = linear_inputs(case, device)
    g = torch.Generator().manual_seed(1)
    noise = (torch.randn(weight.shape, generator=g) * 0.002).to(weight.dtype).to(device)
    ref_weight = weight + noise
    with torch.no_grad():
        ref = linear_sequence_logprobs(hidden, ref_weight, labels, mask=mask).logps
    P = case.shape[0] // 2
    return hidden, weight, labels, mask, ref_weight, ref[:P], ref[P:]


def _sigmoid_loss(sums: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """The sigmoid DPO loss (beta = DPO_BETA) of [chosen; rejected] sums, as [1]."""
    pc, pr = sums.chunk(2)
    return -torch.nn.functional.logsigmoid(DPO_BETA * ((pc - rc) - (pr - rr))).mean()[None]


def _linear_dpo_step(case: Case, device: str, loss_of) -> GradStep:
    """fwd+bwd of loss_of(hidden, weight, labels, mask, rc, rr) -> [1]; gradients of hidden and
    weight."""
    hidden, weight, labels, mask, _, rc, rr = linear_dpo_inputs(case, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    return GradStep([h, w], lambda: loss_of(h, w, labels, mask, rc, rr))


def _ldpo_naive(case, device) -> Step:
    def loss_of(h, w, y, mask, rc, rr):
        return _sigmoid_loss(_naive_logps(h @ w.T, y, mask), rc, rr)

    return _linear_dpo_step(case, device, loss_of)


def _ldpo_cce(case, device) -> Step:
    from cut_cross_entropy.torch_compile import torch_compile_linear_cross_entropy as lce

    def loss_of(h, w, y, mask, rc, rr):
        sums = -lce(h, w, y.masked_fill(~mask, -100), reduction="none").sum(-1)
        return _sigmoid_loss(sums, rc, rr)

    return _linear_dpo_step(case, device, loss_of)


def _ldpo_liger(case, device) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # Liger takes no precomputed reference sums: it runs the reference head itself (one more
    # projection of every token, without gradient), on the same hidden states.
    hidden, weight, labels, mask, ref_weight, _, _ = linear_dpo_inputs(case, device)
    loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, use_ref_model=True)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    targets = labels.masked_fill(~mask, -100)
    return GradStep(
        [h, w],
        lambda: loss_fn(w, h, targets, ref_input=hidden.detach(), ref_weight=ref_weight)[0][None],
    )


def _ldpo_unfused(case, device) -> Step:
    from .linear_logprobs import linear_sequence_logprobs
    from .losses import dpo_loss

    def loss_of(h, w, y, mask, rc, rr):
        pc, pr = linear_sequence_logprobs(h, w, y, mask=mask).logps.chunk(2)
        return dpo_loss(pc, pr, rc, rr, beta=DPO_BETA).loss[None]

    return _linear_dpo_step(case, device, loss_of)


def _ldpo_fused(case, device) -> Step:
    from .linear_dpo import linear_dpo_loss

    def loss_of(h, w, y, mask, rc, rr):
        out = linear_dpo_loss(h, w, y, mask=mask, ref_chosen_logps=rc, ref_rejected_logps=rr,
                              beta=DPO_BETA)  # fmt: skip
        return out.loss[None]

    return _linear_dpo_step(case, device, loss_of)


def _ldpo_matmuls(case, device) -> Step:
    """Timing reference: the 3 plain matmuls of the fused loss over the counted tokens."""
    hidden, weight, _, mask = linear_inputs(case, device)
    h = hidden[mask]
    dz = torch.randn(h.shape[0], weight.shape[0], device=device).to(weight.dtype)
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(weight)

    def step():
        torch.mm(h, weight.T, out=z)  # logits
        torch.mm(dz, weight, out=dh)  # dh
        torch.mm(dz.T, h, out=dw)  # dW

    return step


def _linear_dpo_expected(case: Case, device: str) -> Result:
    hidden, weight, labels, mask, _, rc, rr = linear_dpo_inputs(case, device)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rc, rr = rc.double(), rr.double()

    def loss():
        return _sigmoid_loss(reference.sequence_logprobs(h @ w.T, labels, mask)[0], rc, rr)

    return GradStep([h, w], loss)()


DPO_BETA = reference.DPOLossSpec().beta  # TRL's default, given to both trainers and the reference


def _dpo_trainer(trainer_cls: type, case: Case, device: str, **trainer_kwargs):
    """A `trainer_cls` (trl.DPOTrainer or a subclass, given `trainer_kwargs`) on the tiny Llama
    (seed 0) and its reference (seed 1): stock settings except float32 (bf16=False) and no
    gradient checkpointing. A one-row
    dataset and a two-word tokenizer satisfy the constructor; the timed batch is
    `preference_inputs`, in the layout TRL's DataCollatorForPreference makes."""
    import tempfile
    import warnings

    import datasets
    import transformers
    import trl
    from tokenizers import Tokenizer, models

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # transformers 5 renamed gradient checkpointing; TRL 1.16 still sets and reads the old name.
    warnings.filterwarnings("ignore", "`(is_)?gradient_checkpointing` is deprecated", FutureWarning)
    P, _, V = case.shape
    words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1}, unk_token="<pad>"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="</s>"
    )
    args = trl.DPOConfig(
        output_dir=os.path.join(tempfile.gettempdir(), "dpo-kernels-bench"),  # stays empty
        report_to=[], beta=DPO_BETA,
        use_cpu=device == "cpu", bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=P,
    )  # fmt: skip
    row = {"prompt": "</s>", "chosen": "</s>", "rejected": "</s>"}
    trainer = trainer_cls(
        model=tiny_llama(V, 0, device), ref_model=tiny_llama(V, 1, device), args=args,
        train_dataset=datasets.Dataset.from_list([row]), processing_class=tokenizer,
        **trainer_kwargs,
    )  # fmt: skip
    return trainer, trainer._prepare_inputs(preference_inputs(case, device))


def _dpo_step(trainer_cls_of: Callable[[], type], **trainer_kwargs) -> Callable[[Case, str], Step]:
    """The whole DPO loss step of a trainer: its compute_loss (policy forward, no-grad reference
    forward, log-probs, loss) and the backward into the policy's parameters."""

    def build(case, device) -> Step:
        trainer, batch = _dpo_trainer(trainer_cls_of(), case, device, **trainer_kwargs)
        model = trainer.model
        return GradStep(list(model.parameters()), lambda: trainer.compute_loss(model, batch)[None])

    return build


def _trl_trainer() -> type:
    import trl

    return trl.DPOTrainer


def _fused_trainer() -> type:
    from .integrations.trl import FusedDPOTrainer

    return FusedDPOTrainer


def _padding(padding_free: bool) -> Callable[[Case, str], Step]:
    """fwd+bwd of the tiny Llama and our fused log-probs over a preference batch, padded or packed
    (`concatenated_forward(..., padding_free=...)`); gradients of the model's parameters."""

    def build(case, device) -> Step:
        from .forward import concatenated_forward

        model, batch = tiny_llama(case.shape[-1], 0, device), preference_inputs(case, device)
        return GradStep(
            list(model.parameters()),
            lambda: concatenated_forward(model, batch, padding_free=padding_free).policy.logps,
        )

    return build


def _has(module: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec(module) else f"{module} not installed"


def _cuda_only(device: str) -> str | None:
    return None if device == "cuda" else "its Triton kernels need CUDA"


def _anywhere(device: str) -> None:
    return None


# ------------------------------------------------------------------------------------------
# float64 references: the naive computation on the same inputs (or weights) in float64.


def _logprobs_expected(case: Case, device: str) -> Result:
    logits, labels, mask = logits_inputs(case, device)
    z = logits.double().requires_grad_()
    return GradStep([z], lambda: reference.sequence_logprobs(z, labels, mask)[0])()


def _linear_expected(case: Case, device: str) -> Result:
    hidden, weight, labels, mask = linear_inputs(case, device)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    return GradStep([h, w], lambda: reference.sequence_logprobs(h @ w.T, labels, mask)[0])()


def _alone_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows] completion log-prob sums, each sequence run through the model alone (no padding,
    no packing): what both the padded and the packed paths must reproduce."""
    sums = []
    for ids, am, cm in zip(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"], strict=True
    ):
        n = int(am.sum())
        logits = model(input_ids=ids[None, :n], use_cache=False).logits[:, :-1]
        sums.append(reference.sequence_logprobs(logits, ids[None, 1:n], cm[None, 1:n] != 0)[0])
    return torch.cat(sums)


def _dpo_expected(case: Case, device: str) -> Result:
    """The sigmoid DPO loss (beta = DPO_BETA) in float64 and its gradient for the policy."""
    batch, V = preference_inputs(case, device), case.shape[-1]
    policy, ref = tiny_llama(V, 0, device).double(), tiny_llama(V, 1, device).double()
    with torch.no_grad():
        rc, rr = _alone_logps(ref, batch).chunk(2)
    counts = batch["completion_mask"].sum(1).chunk(2)
    spec = reference.DPOLossSpec(beta=DPO_BETA)

    def loss():
        pc, pr = _alone_logps(policy, batch).chunk(2)
        return reference.dpo_losses(pc, pr, rc, rr, *counts, spec).mean()[None]

    return GradStep(list(policy.parameters()), loss)()


def _packed_expected(case: Case, device: str) -> Result:
    model = tiny_llama(case.shape[-1], 0, device).double()
    batch = preference_inputs(case, device)
    return GradStep(list(model.parameters()), lambda: _alone_logps(model, batch))()


def _batch_tokens(case: Case) -> int:
    """Real (not padding) tokens of the case's preference batch."""
    return int(preference_inputs(case, "cpu")["attention_mask"].sum())


# ------------------------------------------------------------------------------------------
# The ops


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[Case, str], Step]
    skip: Callable[[str], str | None] = _anywhere  # on this device: a reason to skip, or None
    ours: bool = False


@dataclass(frozen=True)
class Op:
    """An op: its shape's dimensions, its methods (the first is the baseline of the ratios), its
    float64 reference, the tokens one step processes and the plot's x axis."""

    dims: str
    methods: list[Method]
    expected: Callable[[Case, str], Result]
    tokens: Callable[[Case], int]
    x_axis: str  # "vocabulary size" (the shape's last dimension) or "tokens"
    dtypes: tuple[str, ...] = tuple(DTYPES)


def _bt(case: Case) -> int:
    return case.shape[0] * case.shape[1]


def _need_trl(device: str) -> str | None:
    return _has("trl")


OPS: dict[str, Op] = {
    "logprobs": Op(
        dims="BxTxV",
        methods=[
            Method("naive", _naive),
            Method("trl.selective_log_softmax", _trl_selective, _need_trl),
            Method("dpo_kernels", _ours, ours=True),
        ],
        expected=_logprobs_expected,
        tokens=_bt,
        x_axis="vocabulary size",
    ),
    "linear": Op(
        dims="BxTxHxV",
        methods=[
            Method("naive", _linear_naive),
            Method("trl.ChunkedLogProbFunction", _linear_trl, _need_trl),
            Method("cce.torch_compile", _cce_torch_compile, lambda d: _has("cut_cross_entropy")),
            Method("cce", _cce_triton, lambda d: _has("cut_cross_entropy") or _cuda_only(d)),
            Method("liger.LigerFusedLinearDPOLoss", _liger_dpo, lambda d: _has("liger_kernel")),
            Method("dpo_kernels", _linear_ours, ours=True),
            Method("matmuls", _linear_matmuls),
        ],
        expected=_linear_expected,
        tokens=_bt,
        x_axis="tokens",
    ),
    "linear_dpo": Op(  # B = 2P rows [chosen; rejected], reference sums precomputed
        dims="BxTxHxV",
        methods=[
            Method("naive", _ldpo_naive),
            Method("liger.LigerFusedLinearDPOLoss", _ldpo_liger, lambda d: _has("liger_kernel")),
            Method("cce.torch_compile", _ldpo_cce, lambda d: _has("cut_cross_entropy")),
            Method("dpo_kernels (unfused)", _ldpo_unfused, ours=True),
            Method("dpo_kernels.linear_dpo_loss", _ldpo_fused, ours=True),
            Method("matmuls", _ldpo_matmuls),
        ],
        expected=_linear_dpo_expected,
        tokens=_bt,
        x_axis="tokens",
        dtypes=("fp32", "bf16"),
    ),
    "dpo_step": Op(
        dims="PxTxV",
        methods=[
            Method("trl.DPOTrainer", _dpo_step(_trl_trainer), _need_trl),
            Method("dpo_kernels", _dpo_step(_fused_trainer), _need_trl, ours=True),
            Method(  # the logits path: the model builds its logits, our op reads them
                "dpo_kernels (logits)",
                _dpo_step(_fused_trainer, fused_lm_head=False),
                _need_trl,
                ours=True,
            ),
        ],
        expected=_dpo_expected,
        tokens=lambda case: 2 * _bt(case),
        x_axis="tokens",
        dtypes=("fp32",),
    ),
    "packed": Op(
        dims="PxTxV",
        methods=[
            Method("padded", _padding(False), lambda d: _has("transformers"), ours=True),
            Method("packed", _padding(True), lambda d: _has("transformers"), ours=True),
        ],
        expected=_packed_expected,
        tokens=_batch_tokens,
        x_axis="tokens",
        dtypes=("fp32",),
    ),
}

# The grid `dpo-kernels bench` runs: under 3 minutes on a 2-core CPU. Each op varies the
# vocabulary or the tokens, for the plot. The issue-target shapes are `--shapes` commands in
# BENCHMARKS.md.
DEFAULT_GRID = {
    "logprobs": [  # the vocabularies of Llama 2 and Llama 3
        Case("logprobs", (2, 256, V), dtype) for dtype in ("fp32", "bf16") for V in (32000, 128256)
    ],
    "linear": [  # (B, T, H, V); then twice the tokens: [T, V] chunks double, tiles do not
        Case("linear", (B, 256, 512, 32000), "fp32") for B in (1, 2)
    ],
    "dpo_step": [Case("dpo_step", (P, 256, 32000), "fp32") for P in (1, 2)],
    # 2 and 4 pairs: the shape is the second (not in DEFAULT_OPS: --ops linear_dpo)
    "linear_dpo": [Case("linear_dpo", (B, 256, 512, 32000), "fp32") for B in (4, 8)],
    # Completions of 64..1024 tokens: ~100 s alone here, so not in DEFAULT_OPS (--ops packed).
    "packed": [Case("packed", (P, 1024, 8000), "fp32") for P in (1, 2, 4)],
}
DEFAULT_OPS = ("logprobs", "linear", "dpo_step")
QUICK_GRID = {  # one small case per op, large enough that the fused ops show what they buy
    "logprobs": [Case("logprobs", (2, 128, 32000), "fp32")],
    "linear": [Case("linear", (1, 256, 512, 32000), "fp32")],
    "dpo_step": [Case("dpo_step", (1, 128, 32000), "fp32")],
    "packed": [Case("packed", (2, 512, 8000), "fp32")],
    "linear_dpo": [Case("linear_dpo", (2, 256, 512, 32000), "fp32")],
}


def expected(case: Case, device: str) -> Result:
    """float64 reference values and gradient(s) for the case's inputs."""
    return OPS[case.op].expected(case, device)


def check(got: Result, ref: Result) -> tuple[float, float | None, bool]:
    """Largest error of the values (relative to their scale, at least 1) and of the gradients
    (relative to each one's largest reference entry), and whether both are within tolerance. A
    method whose gradient is of another objective (None) is checked on its values only."""
    values, grads = got
    rvalues, rgrads = ref
    v_err = ((values.double() - rvalues).abs() / rvalues.abs().clamp(min=1)).max().item()
    if grads is None:
        return v_err, None, v_err <= 1e-3
    tiny = torch.finfo(torch.float64).tiny
    g_err = max(  # g - r promotes to float64: one temporary, not two
        ((g - r).abs_().max() / r.abs().max().clamp(min=tiny)).item()
        for g, r in zip(grads, rgrads, strict=True)
    )
    # bf16 gradients carry one bf16 rounding (~4e-3 of the largest entry)
    return v_err, g_err, v_err <= 1e-3 and g_err <= 2e-2


# ------------------------------------------------------------------------------------------
# Measurement


def time_step(step: Step, device: str, reps: int) -> float:
    """Median milliseconds of step(); the caller has run it once (the warm-up)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(case: Case, method: str, device: str) -> int:
    """Extra peak bytes of one fwd+bwd (run in a fresh process; see the module docstring)."""
    import gc

    build = next(m.build for m in OPS[case.op].methods if m.name == method)
    step = build(case, device)
    step()  # warm-up: allocator pools, lazy inits, the first gradient
    if isinstance(step, GradStep):
        step.release()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors go back to the OS at once
PEERS = ("trl", "transformers", "cut_cross_entropy", "liger_kernel")


@functools.cache
def _probe_context(device: str):
    """Where the memory probes run. On CPU, a forkserver with MALLOC_ENV in its environment from
    its start, that has imported torch, this module and the installed peers: every probe is a
    fresh process forked from it, which inherits the malloc setting and does not pay the imports
    again. On CUDA, spawned interpreters: a process forked from one whose imports may have touched
    CUDA cannot use it."""
    import importlib.util
    import multiprocessing
    from multiprocessing import forkserver

    if device == "cuda":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["dpo_kernels.bench", *(m for m in PEERS if importlib.util.find_spec(m))]
    )
    key, value = MALLOC_ENV
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved
    return ctx


def _probe_child(conn, case: Case, method: str, device: str) -> None:
    key, value = MALLOC_ENV
    if device == "cpu" and os.environ.get(key) != value:  # a forkserver someone else started
        raise RuntimeError(f"memory probe without {key}={value}")
    conn.send(probe_memory(case, method, device))


def measure_memory(case: Case, method: str, device: str) -> int | None:
    """Extra peak bytes of `method` on `case`, probed in a fresh process; None if it failed."""
    ctx = _probe_context(device)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_child, args=(send, case, method, device))
    proc.start()
    send.close()
    try:
        extra = recv.recv()
    except EOFError:  # it died: an exception, or out of memory
        extra = None
    proc.join()
    return extra if proc.exitcode == 0 else None


def probe_workers(device: str) -> int:
    """How many memory probes run at once: as many as there are cores on CPU (each reads its own
    process's peak only); one on CUDA, where probes would share the GPU's memory and each would
    start a CUDA context of its own."""
    return 1 if device == "cuda" else os.cpu_count() or 1


def _probe_rows(case: Case, rows: list[Row], device: str) -> None:
    """Extra peak memory of each row's method, one process each, after the case's timings."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=probe_workers(device)) as pool:
        extras = list(pool.map(lambda r: measure_memory(case, r.method, device), rows))
    for row, extra in zip(rows, extras, strict=True):
        row.extra_mib = None if extra is None else extra / 2**20


def stream_bandwidth(device: str) -> float:
    """Measured bytes/s of a large read+write copy on this machine (the roofline's slope): the
    fastest of several copies, since the bound is what the machine can do and a busy neighbour
    only slows some of them."""
    n = STREAM_BYTES // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="min")
    else:
        b.copy_(a)
        ts = []
        for _ in range(9):
            t0 = time.perf_counter()
            b.copy_(a)
            ts.append(time.perf_counter() - t0)
        ms = min(ts) * 1e3
    return 2 * a.numel() * 4 / (ms * 1e-3)


def must_move_bytes(case: Case) -> int | None:
    """Bytes logprobs fwd+bwd must move: read the counted rows twice, write the whole gradient
    once. None for the other ops, which are bound by matmuls (see the linear op's "matmuls")."""
    if case.op != "logprobs":
        return None
    B, T, V = case.shape
    esize = DTYPES[case.dtype].itemsize
    counted_rows = B * (T - T // 4)
    return (2 * counted_rows + B * T) * V * esize


def run_case(
    case: Case,
    device: str,
    reps: int,
    bandwidth: float | None,
    memory: bool,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    op = OPS[case.op]
    ref = op.expected(case, device)
    tokens = op.tokens(case)
    rows: list[Row] = []
    for method in op.methods:
        if progress:
            progress(f"{case.op} {case.label} {case.dtype} {method.name}")
        row = Row(case.op, case.label, case.dtype, method.name, tokens=tokens)
        rows.append(row)
        reason = method.skip(device)
        if reason:
            row.status, row.note = "skipped", reason
            continue
        try:
            step = method.build(case, device)
            out = step()  # the warm-up, and the result to check
            if out is None:
                row.note = "timing reference, no result"
            else:
                row.value_err, row.grad_err, ok = check(out, ref)
                row.status = "ok" if ok else "WRONG"
            del out
            row.time_ms = time_step(step, device, reps)
            del step
        except Exception as exc:  # a peer that fails on this case is a skipped row, not a crash
            row.status, row.note = "skipped", f"{type(exc).__name__}: {str(exc)[:60]}"
            row.value_err = row.grad_err = None
            continue
        row.tokens_per_s = tokens / row.time_ms * 1e3
        moved = must_move_bytes(case)
        if bandwidth and moved:
            row.roofline = moved / bandwidth * 1e3 / row.time_ms
    del ref  # the float64 reference: not held while the probes allocate (on the same GPU)
    if device == "cuda":
        torch.cuda.empty_cache()
    if memory:
        _probe_rows(case, [r for r in rows if r.value_err is not None], device)
    base = rows[0]
    for r in rows:
        if base.time_ms and r.time_ms:
            r.speedup = base.time_ms / r.time_ms
        if base.extra_mib and r.extra_mib is not None:
            r.mem_ratio = r.extra_mib / base.extra_mib
    return rows


def format_table(rows: list[Row]) -> str:
    head = ["op", "shape", "dtype", "method", "ms", "speed-up", "tok/s", "extra MiB",
            "mem ratio", "value err", "grad err", "roofline", "status"]  # fmt: skip

    def f(v, spec, unit=""):
        return "-" if v is None else format(v, spec) + unit

    lines = [head]
    for r in rows:
        roof = None if r.roofline is None else 100 * r.roofline
        tps = None if r.tokens_per_s is None else r.tokens_per_s / 1e3
        lines.append([
            r.op, r.shape, r.dtype, r.method, f(r.time_ms, ".1f"), f(r.speedup, ".2f", "x"),
            f(tps, ".1f", "k"), f(r.extra_mib, ".0f"), f(r.mem_ratio, ".2f"),
            f(r.value_err, ".1e"), f(r.grad_err, ".1e"), f(roof, ".0f", "%"),
            r.status + (f" ({r.note})" if r.note else ""),
        ])  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def machine_facts(device: str, bandwidth: float) -> dict:
    """What the numbers were measured on."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu x{os.cpu_count()}"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            name = f"{models[0]} x{os.cpu_count()}" if models else name
    return {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stream_GBps": bandwidth / 1e9,
        "date": time.strftime("%Y-%m-%d"),
    }


def run(
    grid: dict[str, list[Case]],
    device: str,
    reps: int = 5,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Row], dict]:
    """Run every case of the grid; returns the rows and facts about the machine. `progress` is
    called with "op shape dtype method" as each method starts."""
    bandwidth = stream_bandwidth(device)
    rows: list[Row] = []
    for case in (c for cs in grid.values() for c in cs):
        rows += run_case(case, device, reps, bandwidth, memory, progress)
    return rows, machine_facts(device, bandwidth)


def _x(r: Row) -> int:
    """A row's place on the plot's x axis: its vocabulary size or its tokens, as its op says."""
    return parse_shape(r.shape)[-1] if OPS[r.op].x_axis == "vocabulary size" else r.tokens


def plot(rows: list[Row], facts: dict, path: str) -> None:
    """A PNG: median time (top) and extra peak memory (bottom) against the vocabulary size or the
    tokens, one column of panels per op, one line per method (dashed: a second dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter, NullLocator

    ops = list(dict.fromkeys(r.op for r in rows))
    methods = dict.fromkeys(r.method for r in rows if r.time_ms is not None)
    tab20 = plt.get_cmap("tab20")  # 10 hues, then their light variants
    colors = {m: tab20((2 * i) % 20 + (2 * i) // 20 % 2) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2, len(ops), figsize=(4.6 * len(ops), 7.5), squeeze=False)
    for j, op in enumerate(ops):
        timed = [r for r in rows if r.op == op and r.time_ms is not None]
        dtypes = list(dict.fromkeys(r.dtype for r in timed))
        for method, dtype in dict.fromkeys((r.method, r.dtype) for r in timed):
            line = sorted((r for r in timed if (r.method, r.dtype) == (method, dtype)), key=_x)
            xs = [_x(r) for r in line]
            label = method + (f" {dtype}" if len(dtypes) > 1 else "")
            label += " (WRONG)" if any(r.status == "WRONG" for r in line) else ""
            style = {"color": colors[method], "marker": "o", "label": label,
                     "linestyle": "--" if dtypes.index(dtype) else "-"}  # fmt: skip
            axes[0, j].plot(xs, [r.time_ms for r in line], **style)
            mem = [(x, r.extra_mib) for x, r in zip(xs, line, strict=True) if r.extra_mib]
            if mem:
                axes[1, j].plot(*zip(*mem, strict=True), **style)
        axes[0, j].set(title=op, ylabel="ms per fwd+bwd step (median)")
        axes[1, j].set(ylabel="extra peak MiB", xlabel=OPS[op].x_axis)
        ticks = sorted({_x(r) for r in timed})
        for ax in axes[:, j]:  # log scales, ticks at the measured points, plain numbers
            ax.set(xscale="log", yscale="log")
            ax.set_xticks(ticks, [f"{x:,}" for x in ticks], minor=False)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(EngFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        axes[0, j].legend(fontsize=7)
    fig.suptitle(
        f"dpo-kernels bench: {facts['device']}, torch {facts['torch']}, {facts['threads']} "
        f"threads, {facts['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_section(rows: list[Row], facts: dict, title: str) -> str:
    """A BENCHMARKS.md section: a heading, the machine and command, and the rows as a table."""
    head = ["op", "shape", "dtype", "method", "ms", "speed-up", "tok/s", "extra MiB",
            "mem ratio", "value err", "grad err", "roofline", "status"]  # fmt: skip

    def f(v, spec, unit=""):
        return "-" if v is None else format(v, spec) + unit

    lines = [
        f"## {title}",
        "",
        f"Device: {facts['device']}; torch {facts['torch']}; measured copy bandwidth "
        f"{facts['stream_GBps']:.1f} GB/s; date {facts['date']}. Command: "
        f"`{facts.get('command', 'dpo-kernels bench')}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        roof = None if r.roofline is None else 100 * r.roofline
        tps = None if r.tokens_per_s is None else r.tokens_per_s / 1e3
        cells = [
            r.op, r.shape, r.dtype, r.method, f(r.time_ms, ".2f"), f(r.speedup, ".2f", "x"),
            f(tps, ".1f", "k"), f(r.extra_mib, ".0f"), f(r.mem_ratio, ".2f"),
            f(r.value_err, ".1e"), f(r.grad_err, ".1e"), f(roof, ".0f", "%"),
            r.status + (f" ({r.note})" if r.note else ""),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_section(path: str, section: str) -> None:
    """Puts `section` into the markdown file at `path`, replacing a section with the same heading
    (its first line) up to the next `## ` heading, or appending it."""
    heading = section.splitlines()[0]
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n") == heading), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))  # fmt: skip
        tail = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    with open(path, "w") as f:
        f.write(text)
