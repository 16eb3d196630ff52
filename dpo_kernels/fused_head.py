"""The fused LM head as a mode of the model's own forward: `install_fused_head` patches a causal
LM so that `model(..., dpo_kernels_head=HeadCall(...))` runs the backbone and then calls the LM
head module with its forward swapped for `linear_sequence_logprobs` (or `linear_dpo`, or a
fused loss of the caller's: `HeadCall.loss`), and
`head_transform` reads the logit post-processing the head must apply from the model's config."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
from typing import Any, NamedTuple

import torch

from .common import DPOLossSpec, SequenceLogprobs
from .linear_logprobs import linear_sequence_logprobs

# Model types whose `logits_scaling` multiplies the logits (muP); Granite's divides them. The
# model's own type, which applies it: a vision-language model's, not its text config's.
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax", "hyperclovax_vision_v2")
# Config fields of a final cap * tanh(logits / cap): Gemma-2 and most; RecurrentGemma; xLSTM.
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# Model types whose forward masks logits after the LM head (Chameleon: the image tokens').
_MASKING_LOGITS = ("chameleon",)
# Every config field `head_transform` reads as a logit post-processing.
_TRANSFORM_FIELDS = (
    *_SOFTCAP_FIELDS,
    "logit_scale",
    "lm_head_multiplier",
    "logits_scaling",
    "logits_mup_width_multiplier",
    "output_multiplier",
    "unpadded_vocab_size",
)


def head_transform(model) -> dict[str, float | None]:
    """The logit post-processing a causal LM applies after its LM head, read from its config:
    a final softcap (`_SOFTCAP_FIELDS`), Cohere's `logit_scale`, Falcon-H1's
    `lm_head_multiplier`, Granite's `logits_scaling` (a divisor; HyperCLOVAX's multiplies),
    Inkling's `logits_mup_width_multiplier` (divides the hidden states: a bias-free head's
    logits alike).
    Arguments for `linear_sequence_logprobs`. A config with a post-processing this does not map
    raises instead of giving wrong log-probs."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    if getattr(model.config, "model_type", None) in _MASKING_LOGITS:
        raise NotImplementedError(
            f"{type(model).__name__} masks logits of its own after its LM head (Chameleon: the "
            "image tokens' logits set to the dtype's minimum); fused_lm_head=True does not cover "
            "it: use fused_lm_head=False"
        )
    name = type(cfg).__name__
    if cfg is not model.config:  # a composite (vision-language) model: only what its forward uses
        cfg = _UsedFields(cfg, _own_source(type(model)))
    if getattr(cfg, "output_multiplier", None) not in (None, 1, 1.0):
        raise NotImplementedError(
            f"{name} scales its logits by output_multiplier before the softcap; "
            "fused_lm_head=True does not cover it: use fused_lm_head=False"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = _head_rows(head) or getattr(cfg, "vocab_size", None)
    unpadded = getattr(cfg, "unpadded_vocab_size", None)  # Inkling cuts its logits to it
    if unpadded is not None and rows is not None and unpadded < rows:
        raise NotImplementedError(
            f"{name} drops the LM head's rows past unpadded_vocab_size={unpadded} "
            f"(of {rows}) from its logits; fused_lm_head=True does not cover it: use "
            "fused_lm_head=False"
        )
    caps = {k: getattr(cfg, k) for k in _SOFTCAP_FIELDS if getattr(cfg, k, None) is not None}
    if len(caps) > 1:
        raise NotImplementedError(
            f"{name} sets several logit softcaps ({caps}); fused_lm_head=True "
            "applies one: use fused_lm_head=False"
        )
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:  # Falcon-H1: lm_head(h) * lm_head_multiplier
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None):
        multiplies = getattr(model.config, "model_type", "") in _MULTIPLYING_LOGITS_SCALING
        scale = cfg.logits_scaling if multiplies else 1.0 / cfg.logits_scaling
    mup = getattr(cfg, "logits_mup_width_multiplier", None)  # Inkling: hidden / it, then head
    if mup not in (None, 1, 1.0):
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError(
                f"{name} divides the hidden states by logits_mup_width_multiplier "
                "before a biased LM head; fused_lm_head=True does not cover it: use "
                "fused_lm_head=False"
            )
        scale = (scale or 1.0) / mup
    return {
        "logit_scale": float(scale or 1.0),
        "softcap": next(iter(caps.values()), None),
    }


@functools.cache
def _own_source(cls: type) -> str | None:
    """The source of the `forward` and `__init__` methods along a model class's hierarchy (its
    own and its bases', not torch's or transformers' generic ones); None if none can be read."""
    parts = []
    for c in cls.__mro__:
        if c.__module__.startswith(("torch.", "transformers.modeling_utils",
                                    "transformers.generation", "builtins")):  # fmt: skip
            continue
        for meth in ("forward", "__init__"):
            f = c.__dict__.get(meth)
            if inspect.isfunction(f):
                with contextlib.suppress(OSError, TypeError):
                    parts.append(inspect.getsource(f))
    return "\n".join(parts) if parts else None


class _UsedFields:
    """A composite model's text config as its forward reads it: a logit post-processing field
    the model's own forward / __init__ never names (LLaVA, Gemma3, Mistral3, Aya Vision, Cohere2
    Vision ... with a Gemma-2-style softcap or Cohere's logit_scale in their text_config) is not
    applied by it, so reads None here. Unreadable source: the config as it is."""

    def __init__(self, cfg, source: str | None) -> None:
        self._cfg, self._source = cfg, source

    def __getattr__(self, name: str):
        if self._source is not None and name in _TRANSFORM_FIELDS and name not in self._source:
            return None
        return getattr(self._cfg, name)


def _head_rows(head) -> int | None:
    """The LM head's rows, also while an engine holds its weight sharded (called before the
    head's own forward gathers it): DeepSpeed ZeRO-3's `ds_shape` (its data is empty then),
    FSDP2's global shape; None for a flat shard (FSDP1 with the head in its own unit)."""
    w = getattr(head, "weight", None)
    shape = getattr(w, "ds_shape", None) or (w.shape if w is not None and w.dim() == 2 else None)
    return int(shape[0]) if shape is not None else None


def _full(p: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter as a plain tensor: FSDP2 shards (DTensor) are gathered differentiably."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


# -- the fused LM head inside the model's forward -----------------------------------------------
#
# DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-3 expect every parameter to be used inside the forward of
# the module that owns it: DDP marks gradients ready per forward, FSDP1 / ZeRO-3 gather a sharded
# parameter only for its module's forward (and again, through hooks on that forward's outputs,
# for its backward) and reduce its gradient through hooks that forward armed. So the fused head
# is a mode of the model's own forward: `install_fused_head` patches the innermost causal LM so
# that `wrapped_model(..., dpo_kernels_head=HeadCall(...))` runs the backbone, then CALLS the LM
# head module (its forward temporarily replaced by the fused op: `linear_sequence_logprobs`, whose
# backward recomputes the logits, or a loss fused with the head, `linear_dpo` or `HeadCall.loss`,
# which makes its gradients in the forward), so the engines' hooks on `lm_head` gather the weight
# for the forward and, where there is a recompute, again for the backward.

HEAD_KWARG = "dpo_kernels_head"
_WRAPPER_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


@dataclasses.dataclass(frozen=True, eq=False)
class HeadCall:
    """What the fused head scores: passed as `dpo_kernels_head=` to the (wrapped) model."""

    labels: torch.Tensor  # [B, T-1] next tokens (padded rows) or [N] (packed)
    mask: torch.Tensor  # same shape, bool: the token is counted
    cu_seqlens: torch.Tensor | None = None  # packed rows (padding_free)
    stats: bool = False
    backend: str | None = None
    router_aux: bool = False  # MoE: also return the router load-balancing loss
    # Called inside the head's forward as extra(hidden, weight, bias, transform) with the whole
    # backbone output and the (gathered) head: `HeadOutput.extra`. `transform`: the keywords of
    # the linear ops, `head_transform`'s and compute_dtype (the autocast dtype, or None).
    extra: Any = None
    # Padded [chosen; rejected] rows: the DPO loss fused in the head (not with `extra`).
    dpo: DPOHead | None = None
    # A loss fused in the head, run instead of linear_sequence_logprobs as
    # loss(hidden, weight, bias, labels, mask, transform) with the aligned hidden states and the
    # (gathered) head, returning (its output, the pass's SequenceLogprobs): `HeadOutput.loss`.
    loss: Any = None


class DPOHead:
    """The DPO loss the head call computes with `linear_dpo` (3 matmuls, gradients of the head
    and the hidden states made during the forward): the loss spec, the reference sums [P]
    (precomputed, no gradient; None: reference-free) and the lengths [P] the length-normalized
    losses divide by (None: the counted tokens).

    A plain class, not a dataclass or a tuple: engines that cast a forward's floating-point
    inputs to their compute dtype (FSDP1 / FSDP2 mixed precision, which recurse into dataclasses,
    tuples and dicts) would round the float32 reference sums to bf16 on their way to the loss."""

    __slots__ = (
        "chosen_counts",
        "memory_budget",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "rejected_counts",
        "spec",
    )  # fmt: skip

    def __init__(
        self,
        spec: DPOLossSpec,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        chosen_counts: torch.Tensor | None = None,
        rejected_counts: torch.Tensor | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self.spec, self.memory_budget = spec, memory_budget
        self.ref_chosen_logps, self.ref_rejected_logps = ref_chosen_logps, ref_rejected_logps
        self.chosen_counts, self.rejected_counts = chosen_counts, rejected_counts


class HeadOutput(NamedTuple):
    """What a head call returns, whatever it asks for: the log-probs (without gradient when a
    loss is fused in the head: it flows through `loss`), the MoE load-balancing loss (or None),
    the fused loss's output (`HeadCall.dpo`: a `DPOLossOutput`; `HeadCall.loss`: that callable's
    first result; else None) and `HeadCall.extra`'s result (or None)."""

    logprobs: SequenceLogprobs
    aux_loss: torch.Tensor | None = None
    loss: Any = None
    extra: Any = None


def _unwrap_engine(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / FSDP1 / DeepSpeed engines (`.module`) and `torch.compile`
    (`._orig_mod`: the compiled forward calls the inner module's, patched or not)."""
    m = model
    while True:
        inner = getattr(m, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(m, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return m
        m = inner


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside DDP / FSDP1 / DeepSpeed engines (`.module`), `torch.compile`
    (`._orig_mod`) and PEFT wrappers."""
    m = _unwrap_engine(model)
    if hasattr(m, "get_base_model"):  # PEFT: the transformers model under the adapters
        m = m.get_base_model()
    return m


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """A prompt-learning PEFT model (under DDP / FSDP1 / DeepSpeed wrappers): it prepends virtual
    tokens to every row, so its hidden states do not line up with the rows' labels."""
    m = _unwrap_engine(model)
    return getattr(getattr(m, "active_peft_config", None), "is_prompt_learning", False)


def _router_aux_loss(model, out, attention_mask) -> torch.Tensor | None:
    """The MoE load-balancing loss as the model's own forward computes it (its module's
    `load_balancing_loss_func`, Mixtral's formula in every transformers family that has one),
    from the backbone's router logits; None for a model whose forward computes none (Llama4,
    Gemma 4, AFMoE, Zaya in transformers 5.24: their output's aux_loss is None). The module is
    looked up along the class's bases: FSDP2 swaps in a subclass defined in torch's own module."""
    import sys

    cfg = model.config.get_text_config()
    modules = (sys.modules.get(c.__module__) for c in type(model).__mro__)
    func = next((m.load_balancing_loss_func for m in modules
                 if hasattr(m, "load_balancing_loss_func")), None)  # fmt: skip
    if func is None:
        return None
    experts = getattr(model, "num_experts", None) or getattr(cfg, "num_experts", None)
    experts = experts or cfg.num_local_experts
    top_k = getattr(model, "num_experts_per_tok", None) or cfg.num_experts_per_tok
    return func(out.router_logits, experts, top_k, attention_mask)


def _unwrap_head(head: torch.nn.Module) -> torch.nn.Module:
    """The LM head inside FSDP1 / activation-checkpoint wrappers, after checking that it computes
    what the fused head does, hidden @ weight.T + bias: an `nn.Linear` with nn.Linear's forward
    (engines' hooks and FSDP2's class swap keep it), or a PEFT `modules_to_save` wrapper whose
    active copy is one. A LoRA adapter on the head, a quantized head or a head with its own
    forward would be read as its weight alone: those raise."""
    inner = head
    while any(isinstance(getattr(inner, a, None), torch.nn.Module) for a in _WRAPPER_ATTRS):
        if isinstance(getattr(inner, "_checkpoint_wrapped_module", None), torch.nn.Module):
            raise NotImplementedError(
                "fused_lm_head=True with an activation-checkpointed LM head: the head's fused "
                "forward is in place for its call only, so the recompute would run the plain "
                "head; checkpoint the decoder layers only, or use fused_lm_head=False"
            )
        inner = next(getattr(inner, a) for a in _WRAPPER_ATTRS if hasattr(inner, a))
    used = inner
    # PEFT: the active copy, or the original (FSDP2 swaps in a subclass, FSDPModulesToSaveWrapper)
    if any(c.__name__ == "ModulesToSaveWrapper" for c in type(used).__mro__):
        active = [] if used.disable_adapters else used.active_adapters
        used = used.modules_to_save[active[0]] if active else used.original_module
    if not (isinstance(used, torch.nn.Linear) and type(used).forward is torch.nn.Linear.forward):
        raise NotImplementedError(
            f"fused_lm_head=True computes the LM head as hidden @ weight.T + bias, but this "
            f"model's head is a {type(used).__module__}.{type(used).__name__} with a forward of "
            "its own (a LoRA adapter on lm_head, a quantized or a scaled head): use "
            "fused_lm_head=False (to train the whole head with PEFT, put lm_head in "
            "modules_to_save instead of target_modules)"
        )
    return inner


def plain_lm_head(model: torch.nn.Module) -> bool:
    """Whether the causal LM inside `model`'s wrappers has an LM head the fused head computes
    (`_check_head`)."""
    try:
        _check_head(unwrap_model(model))
    except (ValueError, NotImplementedError):
        return False
    return True


def _check_head(inner: torch.nn.Module) -> None:
    """Raises unless the causal LM `inner` has an LM head the fused head computes: a plain
    `nn.Linear` (`_unwrap_head`) read straight off its backbone's last hidden states, with no
    layers of the model's own between the two (`_modules_outside`)."""
    head = getattr(inner, "get_output_embeddings", lambda: None)()
    if head is None:
        raise ValueError(
            f"fused_lm_head needs a causal LM with an LM head (get_output_embeddings()); "
            f"{type(inner).__name__} has none: pass fused_lm_head=False"
        )
    _unwrap_head(head)
    extra = _modules_outside(inner, _backbone(inner), head)
    if extra:
        raise NotImplementedError(
            f"fused_lm_head=True: {type(inner).__name__} applies modules of its own between its "
            f"backbone and its LM head ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}"
            "), which the fused head would skip: use fused_lm_head=False"
        )


def fused_head_supported(model: torch.nn.Module) -> bool:
    """Whether `install_fused_head` takes `model`: a plain LM head (`plain_lm_head`) and no
    prompt-learning PEFT adapter. Trainers ask at construction."""
    return plain_lm_head(model) and not is_prompt_learning(model)


def _run_head(head: torch.nn.Module, hidden: torch.Tensor, call: HeadCall, transform, full):
    """Calls the LM head module (through its engine wrappers and hooks) with its forward
    replaced, for this call, by the fused op `call` asks for: the log-probs of `call.labels`, or
    a loss fused with the head (`call.dpo`, `call.loss`). `full`: the hidden states of every
    position, for `call.extra`."""
    inner = _unwrap_head(head)

    def fused(h: torch.Tensor) -> SequenceLogprobs:
        weight, bias = _full(inner.weight), _full(getattr(inner, "bias", None))
        kind = weight.device.type
        # autocast leaves float64 alone (the head's matmul takes a float64 head and hidden as
        # they are, and a float64 one beside a cast one fails there as here: dtypes differ)
        if not torch.is_autocast_enabled(kind) or torch.float64 in (h.dtype, weight.dtype):
            return fused_ops(h, weight, bias, dict(transform, compute_dtype=None))
        # Under autocast the fused ops take the head's inputs as they are and cast them to its
        # dtype themselves, as autocast would for the head's matmul: cast before the ops, autograd
        # would hand the gradients back rounded to that dtype, where the ops keep them in float32
        # and round once, to the inputs' own dtypes. The ops run outside autocast (their logits
        # stay float32).
        tf = dict(transform, compute_dtype=torch.get_autocast_dtype(kind))
        with torch.autocast(kind, enabled=False):
            return fused_ops(h, weight, bias, tf)

    def fused_ops(h, weight, bias, transform):
        if call.dpo is not None:
            from .linear_dpo import linear_dpo

            d, dev = call.dpo, weight.device
            return linear_dpo(
                h.to(dev), weight, call.labels.to(dev), spec=d.spec, bias=bias,
                mask=call.mask.to(dev), ref_chosen_logps=d.ref_chosen_logps,
                ref_rejected_logps=d.ref_rejected_logps, chosen_counts=d.chosen_counts,
                rejected_counts=d.rejected_counts, stats=call.stats, backend=call.backend,
                memory_budget=d.memory_budget, **transform,
            )  # fmt: skip
        dev = weight.device
        if call.loss is not None:
            res = call.loss(h.to(dev), weight, bias, call.labels.to(dev), call.mask.to(dev),
                            transform)  # fmt: skip
        else:
            res = linear_sequence_logprobs(
                h.to(dev), weight, call.labels.to(dev), bias=bias, mask=call.mask.to(dev),
                stats=call.stats, cu_seqlens=call.cu_seqlens, backend=call.backend, **transform,
            )  # fmt: skip
        if call.extra is None:
            return res
        return res, call.extra(full.to(dev), weight, bias, transform)

    saved = inner.__dict__.get("forward")  # e.g. accelerate's device hooks
    inner.forward = fused
    try:
        return head(hidden)
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


def _wrapper_chain(forward) -> list:
    """A forward and what its wrappers wrap, outermost first, along `__wrapped__` (the decorators
    of functools and accelerate keep it): at most 8."""
    chain, f = [], getattr(forward, "__func__", forward)
    while f is not None and len(chain) < 8:
        chain.append(f)
        f = getattr(f, "__wrapped__", None)
    return chain


def _closure_values(f) -> list:
    """The values a function's closure holds (empty cells left out)."""
    out = []
    for cell in getattr(f, "__closure__", None) or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return out


def _saved_autocast(forward) -> tuple | None:
    """The arguments (device, dtype, enabled, cache_enabled) of the `torch.autocast` that a
    wrapper of `forward` enters (accelerate's mixed precision decorates the forward with one, made
    from the accelerator's `AutocastKwargs`), found in the closures along the wrapper's
    `__wrapped__` chain; None when there is none (no wrapper, or an outer module's forward holds
    the autocast already). Read when the patch saves the forward (a forward that replaces the
    patch later gets patched, and read, again)."""
    # accelerate: its fp32-output wrapper -> that wrapper's callable -> the autocast decorator
    for f in _wrapper_chain(forward):
        for ac in _closure_values(f):
            if isinstance(ac, torch.autocast):
                return (ac.device, ac.fast_dtype, ac._enabled, ac._cache_enabled)
    return None


def _forward_autocast(model: torch.nn.Module):
    """A fresh autocast like the one the saved forward's wrapper enters (the fused head's path runs
    the backbone itself, not that forward), built from plain values so that a compiled forward
    traces it too; a null context when there is none."""
    args = getattr(model, "_dpo_kernels_autocast", None)
    if args is None:
        return contextlib.nullcontext()
    device, dtype, enabled, cache_enabled = args
    return torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


def _fused_head_forward(self, slot: str, *args, dpo_kernels_head: HeadCall | None = None, **kwargs):
    if dpo_kernels_head is None:  # the forward this patch replaced, kept in the attribute `slot`
        return getattr(self, slot)(*args, **kwargs)
    call = dpo_kernels_head
    for k in ("labels", "output_attentions", "output_hidden_states", "return_dict"):
        kwargs.pop(k, None)  # PEFT passes these (as None); the backbone returns what we need
    kwargs["use_cache"] = False
    if call.router_aux:
        kwargs["output_router_logits"] = True
    with _forward_autocast(self):
        out = _backbone(self)(*args, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        ids = kwargs.get("input_ids")
        if ids is not None and hidden.shape[-2] > ids.shape[-1]:
            # positions before the rows' own (GIT prepends its image tokens): the rows' are the
            # last ones, as the logits path takes them
            hidden = hidden[..., -ids.shape[-1] :, :]
        full, hidden = hidden, hidden[0] if call.cu_seqlens is not None else hidden[:, :-1]
        # (eager under torch.compile: the head's forward is swapped for this call)
        run_head = _EAGER_RUN_HEAD or _eager_run_head()
        res = run_head(self.get_output_embeddings(), hidden, call, head_transform(self), full)
    aux = _router_aux_loss(self, out, kwargs.get("attention_mask")) if call.router_aux else None
    if call.dpo is not None:  # a LinearDPOOutput
        return HeadOutput(res.logprobs, aux, res.loss)
    res, extra = (res, None) if call.extra is None else res
    if call.loss is not None:
        loss, logprobs = res
        return HeadOutput(logprobs, aux, loss, extra)
    return HeadOutput(res, aux, None, extra)


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM's backbone, whose last hidden states its LM head reads: `base_model` (the
    attribute `base_model_prefix` names), or `model` where that prefix names no attribute
    (transformers' `base_model` then returns the causal LM itself: Llama4ForCausalLM and
    MllamaForCausalLM keep `base_model_prefix = "language_model"` but their decoder in `model`)."""
    base = model.base_model
    if base is model:
        base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module) or base is model:
        raise NotImplementedError(
            f"fused_lm_head=True: {type(model).__name__} has no backbone module to run without "
            f"its head (base_model_prefix={getattr(model, 'base_model_prefix', None)!r}); use "
            "fused_lm_head=False"
        )
    return base


def _modules_outside(model: torch.nn.Module, base: torch.nn.Module, head: torch.nn.Module):
    """Names of the causal LM's modules holding parameters outside its backbone and its LM head:
    layers its forward applies between the two (BERT's / RoBERTa's / Electra's / ModernBERT's
    prediction-head transform, Clvp's final norm), which the fused head would skip."""
    allowed = {id(m) for m in base.modules()} | {id(m) for m in head.modules()}
    # (FSDP1's flat parameters hold several modules' parameters each: not a module's own)
    return [
        name or type(model).__name__
        for name, m in model.named_modules()
        if id(m) not in allowed
        and any(not getattr(p, "_is_flat_param", False) for p in m.parameters(recurse=False))
    ]


def install_fused_head(model: torch.nn.Module) -> torch.nn.Module:
    """Patches the causal LM inside `model` (DDP / FSDP / DeepSpeed / PEFT wrappers) so that its
    forward takes `dpo_kernels_head=HeadCall(...)` and then returns what that call asks for,
    computed inside that forward (a `HeadOutput`); without the keyword the forward is unchanged.
    Idempotent; returns the patched module. Works after the model was wrapped: the wrappers call
    the patched forward."""
    inner = unwrap_model(model)
    if _installed(inner):
        return inner
    _check_head(inner)  # a head the fused path computes, or raise
    if is_prompt_learning(model):
        raise ValueError(
            "fused_lm_head=True with a prompt-learning PEFT adapter: its virtual tokens' hidden "
            "states do not line up with the labels; pass fused_lm_head=False"
        )
    # The forward it replaces (a bound method: pickles as a look-up by name) and the autocast of
    # its wrapper; plain attributes, so that the patched model still pickles (torch.save).
    # Each patch keeps the forward it replaces in an attribute of its own: a later patch (a second
    # trainer on the same model) can find a wrapper that hides this one (TRL's `add_fused_lm_head`
    # wraps the forward at every trainer's construction and its `__wrapped__` is the class's
    # forward), and must not overwrite what this one calls, or a plain forward would loop.
    slot = _free_slot(inner)
    setattr(inner, slot, inner.forward)
    inner._dpo_kernels_autocast = _saved_autocast(inner.forward)
    _eager_run_head()

    @functools.wraps(type(inner).forward)  # generate() validates its kwargs against the signature
    def forward(self, *args, **kwargs):
        return _fused_head_forward(self, slot, *args, **kwargs)

    forward._dpo_kernels_fused_head = True
    # A method, as accelerate expects (it rewraps `forward.__func__`; deepcopy rebinds it); it
    # pickles by name, so a loaded model has the class's forward and is patched again on use.
    inner.forward = types.MethodType(forward, inner)
    return inner


def _free_slot(inner: torch.nn.Module) -> str:
    """The attribute a new patch keeps the forward it replaces in: `_dpo_kernels_forward`, or
    `_dpo_kernels_forward_<n>` (n = 2, 3, ...) when an earlier patch is somewhere in the chain."""
    slot, n = "_dpo_kernels_forward", 1
    while slot in inner.__dict__:
        n += 1
        slot = f"_dpo_kernels_forward_{n}"
    return slot


_EAGER_RUN_HEAD = None


def _eager_run_head():
    """`_run_head` that torch.compile leaves eager (made on first use, not at import: it loads
    torch._dynamo, seconds); a module global, not a model attribute (it does not pickle)."""
    global _EAGER_RUN_HEAD
    if _EAGER_RUN_HEAD is None:
        _EAGER_RUN_HEAD = torch.compiler.disable(_run_head)
    return _EAGER_RUN_HEAD


def _installed(inner: torch.nn.Module) -> bool:
    """Whether the patched forward is in `inner`'s forward, directly or under wrappers that keep
    `__wrapped__` (accelerate's autocast after the patch). A forward that replaced it (accelerate's
    `unwrap_model(..., keep_fp32_wrapper=False)` restores the class's) means: patch again."""
    chain = _wrapper_chain(inner.__dict__.get("forward"))
    return any(getattr(f, "_dpo_kernels_fused_head", False) for f in chain)
