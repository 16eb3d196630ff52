"""Input checks of every public op: shapes, dtypes and devices (in Python, before any op), label
and mask values and cu_seqlens (data checks: on CPU a ValueError naming the first bad position, on
CUDA a device-side assert, see backend.py). Every message names the argument and the fix."""

from __future__ import annotations

import math
import numbers

import torch
from torch.autograd import forward_ad

from . import backend
from .common import LogitTransform, counted_tokens


def check_same_device(name: str, t: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
    if t.device != other.device:
        raise ValueError(
            f"{name} is on {t.device} but {other_name} is on {other.device}; move {name} with "
            f"{name}.to({other_name}.device)"
        )


FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_float(name: str, t: object) -> None:
    """A floating-point input of a fused op, without a forward-mode tangent."""
    if not isinstance(t, torch.Tensor) or t.dtype not in FLOATS:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(
            f"{name} must be a floating-point tensor (bf16, fp16, fp32 or fp64), got {got}"
        )
    refuse_tangent(name, t)


def refuse_tangent(name: str, t: torch.Tensor) -> None:
    """The ops have reverse-mode formulas only; torch would give their outputs a tangent of 0."""
    if not torch.compiler.is_compiling() and forward_ad.unpack_dual(t).tangent is not None:
        raise NotImplementedError(
            f"dpo_kernels: {name} carries a forward-mode tangent (jvp or jacfwd, "
            "torch.autograd.forward_ad), and the fused ops have no forward-mode derivative "
            "(torch would silently return 0); use reverse mode (backward, torch.autograd.grad) "
            "or compute that term with plain PyTorch"
        )


def check_labels_and_mask(
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ignore_index: int,
    source: torch.Tensor,
    source_name: str,
    token_dims: int,
) -> None:
    """labels (and mask) shaped like the first `token_dims` dims of `source`, on its device."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of token ids, got {got}")
    if labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor of token ids, got torch.bool")
    shape = tuple(source.shape[:token_dims])
    if tuple(labels.shape) != shape:
        hint = f"; for causal LMs pass {source_name}[:, :-1] with labels[:, 1:]"
        raise ValueError(
            f"labels must have shape {shape} ({source_name}.shape[:{token_dims}]), got "
            f"{tuple(labels.shape)}" + (hint if token_dims == 2 else "")
        )
    check_same_device("labels", labels, source, source_name)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.is_complex():
            raise TypeError("mask must be a bool or 0/1 tensor shaped like labels")
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"mask must have the shape of labels {shape}, got {tuple(mask.shape)}; slice it "
                "as the labels are (e.g. both [:, 1:])"
            )
        check_same_device("mask", mask, source, source_name)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(
            f"ignore_index must lie in the int64 range [-2**63, 2**63 - 1], got {ignore_index}; "
            "use a value no label takes, such as -100"
        )


def check_logprob_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    ignore_index: int,
) -> None:
    check_float("logits", logits)
    if logits.dim() != 3:
        raise ValueError(
            f"logits must be [batch, tokens, vocab], got shape {tuple(logits.shape)}; "
            "add a batch dimension with logits.unsqueeze(0)"
        )
    if logits.shape[-1] == 0:
        raise ValueError(
            "logits has an empty vocabulary (last dimension is 0); pass the model's logits "
            "[batch, tokens, vocab]"
        )
    check_labels_and_mask(labels, mask, ignore_index, logits, "logits", 2)
    if ref_logits is not None:
        check_float("ref_logits", ref_logits)
        if ref_logits.shape != logits.shape:
            raise ValueError(
                f"ref_logits must have the shape of logits {tuple(logits.shape)}, got "
                f"{tuple(ref_logits.shape)}; run the reference model on the same batch and slice "
                "its logits as the policy's"
            )
        check_same_device("ref_logits", ref_logits, logits, "logits")


def check_compute_dtype(compute_dtype: object) -> None:
    """A fused linear op's compute_dtype: None or bf16, fp16, fp32, fp64."""
    if compute_dtype is not None and compute_dtype not in FLOATS:
        raise TypeError(
            f"compute_dtype must be None or a floating-point dtype (torch.bfloat16, "
            f"torch.float16, torch.float32 or torch.float64), got {compute_dtype!r}"
        )


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    ignore_index: int,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """The fused LM head's inputs: hidden [B, T, H] or [N, H], weight [V, H], bias [V], labels and
    mask shaped hidden.shape[:-1] (the logit transform: `make_transform`); hidden, weight and
    bias of one dtype unless a compute_dtype (bf16, fp16, fp32 or fp64) casts them."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_compute_dtype(compute_dtype)
    same = compute_dtype is None  # else each is cast to it, its gradient back to its own dtype
    if weight.dim() != 2:
        raise ValueError(
            "weight must be the LM head's [vocab, hidden] matrix (lm_head.weight), got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(
            "weight has an empty vocabulary (first dimension is 0); pass the LM head's weight "
            "[vocab, hidden]"
        )
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"hidden must be [batch, tokens, hidden] or [tokens, hidden], got shape "
            f"{tuple(hidden.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has {hidden.shape[-1]} features but weight has shape {tuple(weight.shape)} "
            f"([vocab, hidden]); they must agree (pass lm_head.weight, not its transpose)"
        )
    if same and hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}; they must match, e.g. "
            "hidden.to(weight.dtype), or pass the dtype the matmuls take as compute_dtype"
        )
    check_same_device("weight", weight, hidden, "hidden")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},) (weight.shape[:1]), got "
                f"{tuple(bias.shape)}"
            )
        if same and bias.dtype != weight.dtype:
            raise TypeError(
                f"bias is {bias.dtype} but weight is {weight.dtype}; they must match, or pass the "
                "dtype the matmuls take as compute_dtype"
            )
        check_same_device("bias", bias, hidden, "hidden")
    check_labels_and_mask(labels, mask, ignore_index, hidden, "hidden", hidden.dim() - 1)


def make_transform(logit_scale: float, softcap: float | None, temperature: float) -> LogitTransform:
    """The checked `LogitTransform` of the public functions' keywords, its values as floats."""
    tf = LogitTransform(logit_scale, softcap, temperature)
    check_transform(tf)
    return LogitTransform(*(None if v is None else float(v) for v in tf))


_F32 = torch.finfo(torch.float32)


def check_transform(transform: LogitTransform) -> None:
    """logit_scale and temperature finite real numbers (temperature > 0), softcap None or
    positive. The kernels take softcap and the factor logit_scale / temperature in float32 (for
    bf16/fp16/fp32 inputs): each must lie in its normal range (the factor may be 0), or it would
    round to 0 or overflow there and give wrong logits."""
    logit_scale, softcap, temperature = transform
    for name, value in (("logit_scale", logit_scale), ("temperature", temperature),
                        ("softcap", softcap)):  # fmt: skip
        if name == "softcap" and value is None:
            continue
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    span = f"float32's normal range [{_F32.tiny:.3g}, {_F32.max:.3g}]"
    if softcap is not None and not _F32.tiny <= softcap <= _F32.max:
        raise ValueError(f"softcap must lie in {span}, where the kernels apply it; got {softcap!r}")
    factor = logit_scale / temperature
    if factor != 0 and not _F32.tiny <= abs(factor) <= _F32.max:
        raise ValueError(
            f"logit_scale / temperature = {factor!r} must be 0 or lie (in magnitude) in {span}, "
            "where the kernels apply it; rescale the LM head's weight instead"
        )


def check_flag(name: str, value: object) -> None:
    """A bool option (stats, pair_index): True or False, not a truthy value."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_values(
    labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int, vocab: int
) -> None:
    """Data checks: counted labels in [0, vocab), mask values 0 or 1 (`refuse_values`)."""
    counted = counted_tokens(labels, mask, ignore_index)
    fix = f"use ignore_index={ignore_index} (or mask=0) for tokens that should not count"
    refuse_values(
        counted & ((labels < 0) | (labels >= vocab)),
        lambda i: (
            f"labels{list(i)} = {labels[i].item()} is outside the vocabulary [0, {vocab}); " + fix
        ),
        f"a counted label is outside the vocabulary [0, {vocab}); {fix} (run on CPU tensors to "
        "see the position)",
    )
    if mask is not None:
        check_mask_values("mask", mask)


def check_mask_values(name: str, mask: torch.Tensor) -> None:
    """A mask's values: 0 and 1 only (a weight of 0.5 would count as 1); bool masks pass."""
    if mask.dtype != torch.bool:
        refuse_values(
            (mask != 0) & (mask != 1),
            lambda i: f"{name}{list(i)} = {mask[i].item()}; it must hold only 0 and 1 (or be bool)",
            f"{name} holds a value other than 0 and 1",
        )


def refuse_values(bad: torch.Tensor, describe, device_message: str) -> None:
    """The one data check of values: where `bad` (a bool tensor) holds a True, a ValueError whose
    message `describe(index)` makes for the first bad index; where the values must not be read on
    the host (`values_unreadable`), an assert with `device_message` that stops the device."""
    if values_unreadable(bad):
        torch._assert_async(~bad.any(), f"dpo_kernels: {device_message}")
    elif bool(bad.any()):
        raise ValueError(describe(tuple(bad.nonzero()[0].tolist())))


def values_unreadable(t: torch.Tensor) -> bool:
    """Whether a data check of `t` must not read its values on the host, and asserts instead:
    CUDA (no sync), under torch.compile (no graph break), meta and fake tensors (no values)."""
    return (backend.device_side_checks(t.device) or torch.compiler.is_compiling()
            or _without_values(t))  # fmt: skip


def _without_values(t: torch.Tensor) -> bool:
    """Whether `t` has no values to read: a meta or a fake tensor."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def refuse_without_values(op: str, t: torch.Tensor, why: str) -> None:
    """For the paths that must read values of `t` on the host (`why`): on meta or fake tensors
    (accelerate's init_empty_weights, FakeTensorMode) a NotImplementedError naming `op`, instead
    of torch's "Cannot copy out of meta tensor" from deep inside. Nothing under torch.compile,
    where tensors are fake while tracing and the read breaks the graph instead."""
    if torch.compiler.is_compiling() or not isinstance(t, torch.Tensor):
        return
    if _without_values(t):
        raise NotImplementedError(
            f"dpo_kernels: {op} {why}, which meta and fake tensors do not have; call it on real "
            "tensors"
        )


def check_counts(counts: dict[str, torch.Tensor], minimum: int, why: str) -> None:
    """Data check of completion token counts ([N] tensors by name): each at least `minimum`, not
    NaN (`why` says what needs it). On CPU a ValueError naming the first bad entry; on CUDA, and
    when traced by torch.compile, an assert that does not read the values on the host."""
    for name, n in counts.items():
        if n.is_complex() or n.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a tensor of token counts (int or float), got {n.dtype}"
            )
        refuse_values(
            ~(n >= minimum),  # NaN too
            lambda i, name=name, n=n: f"{name}{list(i)} = {n[i].item()}; {why}",
            f"{name} holds a value below {minimum} (or NaN); {why}",
        )


def check_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int) -> None:
    """cu_seqlens: [S + 1] integer offsets from 0 to n_tokens, non-decreasing (flash-attn's varlen
    convention). Raises ValueError naming what is wrong."""
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.is_floating_point()
            or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool):  # fmt: skip
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens)
        raise TypeError(
            f"cu_seqlens must be an integer tensor of sequence offsets, [S + 1], got {got}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D [S + 1] with S >= 1, got {tuple(cu_seqlens.shape)}"
        )
    if values_unreadable(cu_seqlens):
        cu = cu_seqlens.long()
        ok = (cu[0] == 0) & (cu[-1] == n_tokens) & (cu[1:] >= cu[:-1]).all()
        torch._assert_async(
            ok,
            f"cu_seqlens must rise from 0 to the number of tokens ({n_tokens}) without going down",
        )
        return
    cu = cu_seqlens.tolist()
    rule = f"cu_seqlens must rise from 0 to the number of tokens ({n_tokens}) without going down"
    if cu[0] != 0:
        raise ValueError(f"{rule}: cu_seqlens[0] = {cu[0]}, must be 0")
    if cu[-1] != n_tokens:
        raise ValueError(
            f"{rule}: cu_seqlens[{len(cu) - 1}] = {cu[-1]}, must be {n_tokens} (the packed "
            "row's length)"
        )
    down = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
    if down is not None:
        raise ValueError(
            f"{rule}: cu_seqlens[{down}] = {cu[down]} < cu_seqlens[{down - 1}] = {cu[down - 1]}"
        )


def check_packed(cu_seqlens: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    if cu_seqlens is None:
        return
    if x.shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens, {name} must be packed [N, ...] (or [1, N, ...]), got "
            f"{tuple(x.shape)}"
        )
    if isinstance(cu_seqlens, torch.Tensor):
        check_same_device("cu_seqlens", cu_seqlens, x, name)
    check_cu_seqlens(cu_seqlens, x.shape[1])


def number(name: str, value: object) -> float:
    """`value` as a float, or a TypeError naming the argument."""
    try:
        if isinstance(value, (bool, str)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None


def check_pair_inputs(named: dict[str, torch.Tensor | None], unit: str = "pairs") -> int:
    """All given inputs (None: absent) are 1-D tensors of one length, on one device, the log-prob
    sums (names ending in "logps") floating-point; returns the length. `unit` names what an entry
    is, in the messages."""
    first_name, first = next((k, v) for k, v in named.items() if v is not None)
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if name.endswith("logps"):
            check_float(name, t)
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [{unit}], got shape {tuple(t.shape)}")
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name} has {t.shape[0]} entries but {first_name} has {first.shape[0]}; "
                f"the inputs must describe the same {unit}"
            )
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    return first.shape[0]
