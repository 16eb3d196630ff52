"""The ops `dpo-kernels bench` knows: for each, its shape's dimensions, its methods (the first is
the baseline of the ratios), its float64 reference, the tokens one step processes and the plot's
x axis; and the grids it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import expected as ref
from . import peers, siblings, trainers
from .cases import DTYPES, Case, Result, Step, batch_tokens, bt_tokens


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[Case, str], Step]
    skip: Callable[[str], str | None] = peers.anywhere  # on this device: a reason to skip, or None
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
    pairs: bool = False  # B is 2P rows [chosen; rejected]: an even B


def _need_trl(device: str) -> str | None:
    return peers.has("trl")


def _sibling(op: str, stock: str) -> Op:
    """A sibling trainer's loss step: the stock TRL trainer, ours with the fused LM head (its
    default) and ours with fused_lm_head=False (the model builds its logits, our op reads them)."""
    return Op(
        dims="PxTxV",
        methods=[
            Method(stock, siblings.sibling_step(op, None), _need_trl),
            Method("dpo_kernels", siblings.sibling_step(op, True), _need_trl, ours=True),
            Method("dpo_kernels (logits)", siblings.sibling_step(op, False), _need_trl, ours=True),
        ],
        expected=siblings.sibling_expected,
        tokens=siblings.sibling_tokens,
        x_axis="tokens",
        dtypes=("fp32",),
    )


OPS: dict[str, Op] = {
    "logprobs": Op(
        dims="BxTxV",
        methods=[
            Method("naive", peers.naive),
            Method("trl.selective_log_softmax", peers.trl_selective, _need_trl),
            Method("dpo_kernels", peers.ours, ours=True),
        ],
        expected=ref.logprobs,
        tokens=bt_tokens,
        x_axis="vocabulary size",
    ),
    "linear": Op(
        dims="BxTxHxV",
        methods=[
            Method("naive", peers.linear_naive),
            Method("trl.ChunkedLogProbFunction", peers.linear_trl, _need_trl),
            Method(
                "cce.torch_compile",
                peers.cce_torch_compile,
                lambda d: peers.has("cut_cross_entropy"),
            ),
            Method(
                "cce",
                peers.cce_triton,
                lambda d: peers.has("cut_cross_entropy") or peers.cuda_only(d),
            ),
            Method(
                "liger.LigerFusedLinearDPOLoss",
                peers.liger_dpo,
                lambda d: peers.has("liger_kernel"),
            ),
            Method("dpo_kernels", peers.linear_ours, ours=True),
            Method("matmuls", peers.linear_matmuls),
        ],
        expected=ref.linear,
        tokens=bt_tokens,
        x_axis="tokens",
    ),
    "linear_dpo": Op(  # B = 2P rows [chosen; rejected], reference sums precomputed
        dims="BxTxHxV",
        methods=[
            Method("naive", peers.ldpo_naive),
            Method(
                "liger.LigerFusedLinearDPOLoss",
                peers.ldpo_liger,
                lambda d: peers.has("liger_kernel"),
            ),
            Method(
                "cce.torch_compile",
                peers.ldpo_cce,
                lambda d: peers.has("cut_cross_entropy") or peers.cpu_only(d),
            ),
            Method(
                "cce",
                peers.ldpo_cce_triton,
                lambda d: peers.has("cut_cross_entropy") or peers.cuda_only(d),
            ),
            Method("dpo_kernels (unfused)", peers.ldpo_unfused, ours=True),
            Method("dpo_kernels.linear_dpo_loss", peers.ldpo_fused, ours=True),
            Method("matmuls", peers.ldpo_matmuls),
        ],
        expected=ref.linear_dpo,
        tokens=bt_tokens,
        x_axis="tokens",
        dtypes=("fp32", "bf16"),
        pairs=True,
    ),
    "dpo_step": Op(
        dims="PxTxV",
        methods=[
            Method("trl.DPOTrainer", trainers.dpo_step(trainers.trl_trainer), _need_trl),
            Method("dpo_kernels", trainers.dpo_step(trainers.fused_trainer), _need_trl, ours=True),
            Method(  # the logits path: the model builds its logits, our op reads them
                "dpo_kernels (logits)",
                trainers.dpo_step(trainers.fused_trainer, fused_lm_head=False),
                _need_trl,
                ours=True,
            ),
        ],
        expected=ref.dpo_step,
        tokens=lambda case: 2 * bt_tokens(case),
        x_axis="tokens",
        dtypes=("fp32",),
    ),
    "packed": Op(
        dims="PxTxV",
        methods=[
            Method(
                "padded", trainers.padding(False), lambda d: peers.has("transformers"), ours=True
            ),
            Method(
                "packed", trainers.padding(True), lambda d: peers.has("transformers"), ours=True
            ),
        ],
        expected=ref.packed,
        tokens=batch_tokens,
        x_axis="tokens",
        dtypes=("fp32",),
    ),
    # Not in DEFAULT_OPS (--ops cpo_step,orpo_step,kto_step): a trainer each, ~1 min together.
    "cpo_step": _sibling("cpo_step", "trl.CPOTrainer"),
    "orpo_step": _sibling("orpo_step", "trl.ORPOTrainer"),
    "kto_step": _sibling("kto_step", "trl.KTOTrainer"),
}

# The grid `dpo-kernels bench` runs: under 3 minutes on a 2-core CPU. Each op varies the
# vocabulary or the tokens, for the plot. The issue-target shapes are `--shapes` commands in
# BENCHMARKS.md.
SIBLING_OPS = ("cpo_step", "orpo_step", "kto_step")
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
    # The sibling trainers: as dpo_step (KTO: the 2P completions unpaired)
    **{op: [Case(op, (P, 256, 32000), "fp32") for P in (1, 2)] for op in SIBLING_OPS},
}
DEFAULT_OPS = ("logprobs", "linear", "dpo_step")
QUICK_GRID = {  # one small case per op, large enough that the fused ops show what they buy
    "logprobs": [Case("logprobs", (2, 128, 32000), "fp32")],
    "linear": [Case("linear", (1, 256, 512, 32000), "fp32")],
    "dpo_step": [Case("dpo_step", (1, 128, 32000), "fp32")],
    "packed": [Case("packed", (2, 512, 8000), "fp32")],
    "linear_dpo": [Case("linear_dpo", (2, 256, 512, 32000), "fp32")],
    **{op: [Case(op, (1, 128, 32000), "fp32")] for op in SIBLING_OPS},
}


def expected(case: Case, device: str) -> Result:
    """float64 reference values and gradient(s) for the case's inputs."""
    return OPS[case.op].expected(case, device)
