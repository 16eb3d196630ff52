"""The concatenated-batch forward: [chosen; rejected] through the policy once, log-probs fused.

Accepts TRL's `DataCollatorForPreference` output as it is (input_ids, attention_mask,
completion_mask; rows are [chosen; rejected]) or a plain dict with separate halves
(chosen_input_ids, chosen_attention_mask, chosen_completion_mask or chosen_labels, and the same
for rejected), pads both halves to one length, runs ONE policy forward, and the reference model
once without gradient (or uses precomputed reference log-probs, or none), then shifts labels and
returns the four sums through the fused op.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .batches import PreferenceBatch, pack, preference_batch
from .common import PairLogprobs, SequenceLogprobs
from .fused_head import (
    HEAD_KWARG,
    DPOHead,
    HeadCall,
    HeadOutput,
    install_fused_head,
    is_prompt_learning,
    unwrap_model,
)
from .logprobs import sequence_logprobs
from .losses import check_spec, dpo_loss, make_spec


class ConcatenatedOutput(NamedTuple):
    policy: SequenceLogprobs  # 2P rows, [chosen; rejected]; carries gradient
    ref_chosen_logps: torch.Tensor | None  # [P] (None: reference-free)
    ref_rejected_logps: torch.Tensor | None
    batch: PreferenceBatch

    def pairs(self) -> PairLogprobs:
        """Policy and reference sums of chosen and rejected, with the completion token counts."""
        p = self.policy.pairs()
        return p._replace(
            ref_chosen_logps=self.ref_chosen_logps, ref_rejected_logps=self.ref_rejected_logps
        )


def model_logprobs(
    model,
    b: PreferenceBatch,
    *,
    stats: bool = False,
    padding_free: bool = False,
    fused_lm_head: bool = False,
    backend: str | None = None,
    router_aux: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    dpo: DPOHead | None = None,
) -> HeadOutput:
    """`batch_logprobs`, and with `router_aux` the MoE router load-balancing loss of the same
    forward (`output_router_logits=True`), as a `HeadOutput`. `dpo` (fused_lm_head, padded rows
    only): the DPO loss fused into the head call (`HeadOutput.loss`)."""
    if dpo is not None and (padding_free or not fused_lm_head):
        raise ValueError("dpo= needs fused_lm_head=True and padded rows (padding_free=False)")
    b = preference_batch(b)  # (a collated dict too)
    kwargs = dict(model_kwargs or {}, use_cache=False)
    if padding_free:
        p = pack(b)
        check_packing(model, p.input_ids)
        kwargs |= {"input_ids": p.input_ids, "position_ids": p.position_ids}
        labels, mask, cu = p.labels, p.mask, p.cu_seqlens
    else:
        kwargs |= {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        labels = b.input_ids[:, 1:]
        # A label counts if attended and predicted from at or after the row's first attended
        # token: a left-padded row's first token has nothing before it (a gap inside a row is
        # scored across, as TRL does)
        am = b.attention_mask != 0
        mask = (b.completion_mask[:, 1:] != 0) & am[:, 1:] & (am.cumsum(1)[:, :-1] > 0)
        cu = None
    if fused_lm_head:
        install_fused_head(model)
        call = HeadCall(labels, mask, cu, stats, backend, router_aux, dpo=dpo)
        return _with_aux(model, model(**kwargs, **{HEAD_KWARG: call}), router_aux)
    if router_aux:
        kwargs["output_router_logits"] = True
    out = model(**kwargs)
    # (prompt-learning PEFT prepends its virtual tokens' positions: the last ones are the rows')
    logits = _logits_of(out)[:, -kwargs["input_ids"].shape[1] :]
    logits = logits[0] if padding_free else logits[:, :-1]
    res = sequence_logprobs(logits, labels, mask=mask, cu_seqlens=cu, stats=stats, backend=backend)
    return _with_aux(model, HeadOutput(res, out.aux_loss if router_aux else None), router_aux)


def _with_aux(model, out: HeadOutput, router_aux: bool) -> HeadOutput:
    """`out`, after checking that the forward gave the router loss asked for: a model whose config
    declares router_aux_loss_coef but whose forward computes no such loss (Llama4) would
    otherwise fail as `coef * None` in the trainer (stock TRL fails on it too)."""
    if router_aux and out.aux_loss is None:
        raise ValueError(
            f"the trainer adds a router load-balancing loss (router_aux_loss_coef != 0, from "
            f"the config or the model's config), but {type(unwrap_model(model)).__name__}'s "
            "forward computes none (its output's aux_loss is None): set router_aux_loss_coef=0.0 "
            "in the trainer's config"
        )
    return out


def _check_ref_logps(ref_logps) -> None:
    if ref_logps is not None and not (
        isinstance(ref_logps, (tuple, list)) and len(ref_logps) == 2
        and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in ref_logps)
    ):  # fmt: skip
        got = [getattr(t, "dtype", type(t).__name__) for t in ref_logps] if isinstance(
            ref_logps, (tuple, list)) else type(ref_logps).__name__  # fmt: skip
        raise TypeError(
            "ref_logps must be a pair of floating-point [P] tensors (ref_chosen_logps, "
            f"ref_rejected_logps), got {got}"
        )


# Models that passed check_packing (weakly held: a model's class and attention do not change).
_PACKING_CHECKED: weakref.WeakSet = weakref.WeakSet()


def check_packing(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """padding_free: refuse a model whose attention crosses the packed sequences (it ignores the
    restarting position_ids, e.g. OPT, Bloom and MPT in transformers 5, or a prompt-learning PEFT
    adapter, whose virtual tokens only the first sequence would see): its log-probs would be
    silently wrong. Checked once per model by one no-grad, eval-mode forward of four packed
    2-token sequences [x, x, x', x]: the second's and the fourth's logits must be equal, bit for
    bit (with the sequences kept apart, the masked keys add exact zeros; in one forward, a
    mixture of experts computes both in the same expert calls: before 2026-11-27 two forwards,
    whose expert groupings differed, refused Qwen3-MoE for a last-bit difference). A second
    forward, with the last sequence changed, refuses attention that is not causal (XLM's default,
    a BERT-style model without is_decoder), which gives the second and fourth the same context."""
    if model in _PACKING_CHECKED:
        return
    inner = unwrap_model(model)
    if is_prompt_learning(model):
        raise ValueError(
            "padding_free=True with a prompt-learning PEFT adapter: its virtual tokens would be "
            "seen by the first packed sequence only; pass padding_free=False"
        )
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or int(input_ids.max()) + 1
    x = input_ids[0, :2].repeat(2)[:2]  # [2] token ids of the batch (a 1-token batch repeated)
    # [x, x, x', x] (x' = x + 1): the 2nd and 4th sequences are the same tokens after others
    packed = torch.cat([x, x, (x + 1) % vocab, x])[None]  # [1, 8]
    positions = torch.tensor([[0, 1] * 4], device=x.device)
    modes = [(m, m.training) for m in model.modules()]  # each module's own (a frozen part's)
    # A model that attends both ways across the pack (XLM's default causal=False, a BERT-style
    # model without is_decoder) gives the 2nd and 4th sequences the same context too: a second
    # forward with the last sequence changed must leave the first three as they were (skipped
    # for mixtures of experts, whose expert groupings, and last bits, change with the tokens;
    # transformers' MoE families are causal decoders, checked by the first probe).
    cfg = getattr(inner, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    moe = _experts(cfg) > 1
    model.eval()
    try:
        with torch.no_grad():
            out = _logits_of(model(input_ids=packed, position_ids=positions, use_cache=False))
            later = None
            if not moe:
                changed = torch.cat([x, x, (x + 1) % vocab, (x + 2) % vocab])[None]
                later = _logits_of(model(input_ids=changed, position_ids=positions,
                                         use_cache=False))[0, -packed.shape[1] :]  # fmt: skip
    finally:
        for m, training in modes:
            m.training = training
    out = out[0, -packed.shape[1] :]
    attn = getattr(cfg, "_attn_implementation", None)
    if later is not None and not torch.equal(out[:6], later[:6]):
        raise ValueError(
            f"padding_free=True: {type(inner).__name__} (attn_implementation={attn!r}) lets a "
            "packed sequence attend to the ones after it (its attention is not causal), so its "
            "log-probs would be wrong; pass padding_free=False"
        )
    if not torch.equal(out[2:4], out[6:8]):
        raise ValueError(
            f"padding_free=True: {type(inner).__name__} (attn_implementation={attn!r}) lets a "
            "packed sequence attend to the one before it (it does not honour restarting "
            "position_ids without an attention mask), so its log-probs would be wrong; pass "
            "padding_free=False, or use a model and attention that support packed sequences "
            "(flash_attention_2, or sdpa/eager on Llama-style models)"
        )
    _PACKING_CHECKED.add(model)


def _experts(cfg) -> int:
    """The most experts a config names (num_experts, num_local_experts, n_routed_experts,
    Ernie-MoE's and Aria's moe_num_experts, DBRX's ffn_config.moe_num_experts); 0 if none."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    fields = {**d, **(d.get("ffn_config") if isinstance(d.get("ffn_config"), dict) else {})}
    counts = [v for k, v in fields.items() if k.endswith("experts") and type(v) is int]
    return max(counts, default=0)


def _logits_of(out) -> torch.Tensor:
    """The logits in a model's output: `.logits` (transformers), the output itself (a tensor) or
    its first entry (a tuple). A backbone's output (hidden states, no logits) raises."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        raise ValueError(
            f"the model returned a {type(out).__name__} with hidden states but no logits: it is a "
            "backbone without an LM head (AutoModel); pass a causal LM (AutoModelForCausalLM)"
        )
    return out[0]


def batch_logprobs(
    model: torch.nn.Module,
    b: PreferenceBatch,
    *,
    stats: bool = False,
    padding_free: bool = False,
    fused_lm_head: bool = False,
    backend: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> SequenceLogprobs:
    """One forward of `model` over the concatenated rows (a `PreferenceBatch`, or a batch
    `preference_batch` takes); fused log-probs of the completions.

    padding_free: run the rows packed into one sequence with restarting position_ids and no
    padding (flash-attention varlen on GPU; transformers' packed-sequence masks with sdpa/eager),
    and score them through the fused op's cu_seqlens layout. Same numbers, no padded tokens.
    fused_lm_head: never build the logits: inside the model's forward (`install_fused_head`), the
    backbone's last hidden states and the LM head (with `head_transform`) go to
    `linear_sequence_logprobs`; works under DDP, FSDP1/2 and DeepSpeed ZeRO-1/2/3.
    """
    return model_logprobs(
        model, b, stats=stats, padding_free=padding_free, fused_lm_head=fused_lm_head,
        backend=backend, model_kwargs=model_kwargs,
    ).logprobs  # fmt: skip


def reference_logprobs(model, b: PreferenceBatch, *, linear_dpo: bool = False,
                       **options) -> SequenceLogprobs:  # fmt: skip
    """A reference model's log-probs of `b`, without gradient (options: `model_logprobs`'s).
    `linear_dpo` (the policy's loss fused into its head call): from `linear_dpo`'s own pass, the
    summation of the policy's sums, so that a policy equal to its reference gets rewards exactly 0
    (ties, as in stock TRL), not rounding noise."""
    dpo = DPOHead(make_spec()) if linear_dpo else None  # only the sums are used
    with torch.no_grad():
        return model_logprobs(model, b, dpo=dpo, **options).logprobs


def _reference_pair(b: PreferenceBatch, ref_logps, ref_model, linear_dpo: bool, options) -> tuple:
    """(ref chosen, ref rejected) sums from, in order: `ref_logps`, the batch's precomputed
    ones, `ref_model` (before the policy: its logits are freed before the policy's exist);
    else (None, None): reference-free."""
    _check_ref_logps(ref_logps)
    if ref_logps is None and b.ref_chosen_logps is not None:
        ref_logps = (b.ref_chosen_logps, b.ref_rejected_logps)
    if ref_logps is None and ref_model is not None:
        ref = reference_logprobs(ref_model, b, linear_dpo=linear_dpo, **options)
        ref_logps = ref.logps.chunk(2)
    return (None, None) if ref_logps is None else tuple(ref_logps)


def concatenated_forward(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    *,
    ref_model: torch.nn.Module | None = None,
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    stats: bool = False,
    padding_free: bool = False,
    fused_lm_head: bool = False,
    pad_token_id: int = 0,
    ignore_index: int = -100,
    backend: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> ConcatenatedOutput:
    """Policy log-prob sums of chosen and rejected from one forward, and the reference's.

    The reference comes from, in order: `ref_logps` (chosen, rejected), the batch's
    ref_chosen_logps / ref_rejected_logps, one no-grad forward of `ref_model`; else None
    (reference-free). `stats` adds the policy's per-token entropy, mean logit and top-1 flags.
    `padding_free` packs the rows (see `batch_logprobs`): the model must honour packed
    position_ids (flash-attention 2/3 in transformers, or its sdpa/eager packed-sequence masks);
    one that does not is refused (`check_packing`).
    `fused_lm_head` never builds the logits (see `batch_logprobs`).
    Works with any Hugging Face causal LM (anything whose forward takes input_ids and
    attention_mask and returns logits).
    """
    b = preference_batch(batch, pad_token_id, ignore_index)
    options = dict(padding_free=padding_free, fused_lm_head=fused_lm_head, backend=backend,
                   model_kwargs=model_kwargs)  # fmt: skip
    rc, rr = _reference_pair(b, ref_logps, ref_model, False, options)
    policy = batch_logprobs(model, b, stats=stats, **options)
    return ConcatenatedOutput(policy, rc, rr, b)


def concatenated_dpo_loss(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    spec: Any,
    *,
    ref_model: torch.nn.Module | None = None,
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    stats: bool = False,
    padding_free: bool = False,
    fused_lm_head: bool = False,
    pad_token_id: int = 0,
    ignore_index: int = -100,
    backend: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Any, ConcatenatedOutput]:
    """`concatenated_forward` and the DPO loss of `spec` (`make_spec`; a `DPOLoss`'s `.spec`;
    None: the defaults): (`DPOLossOutput`, `ConcatenatedOutput`). With fused_lm_head and padded
    rows the loss is fused into the LM head call (`linear_dpo`: 3 matmuls over the completion
    tokens, the reference sums computed first), and the output's policy sums carry no gradient;
    otherwise (logits, packed rows) the log-probs op and `dpo_loss`, as `concatenated_forward` +
    `DPOLoss` would."""
    spec = make_spec() if spec is None else spec  # None: DPOConfig's defaults, on either route
    check_spec(spec)
    options = dict(stats=stats, padding_free=padding_free, fused_lm_head=fused_lm_head,
                   pad_token_id=pad_token_id, ignore_index=ignore_index, backend=backend,
                   model_kwargs=model_kwargs)  # fmt: skip
    if not fused_lm_head or padding_free:
        out = concatenated_forward(model, batch, ref_model=ref_model, ref_logps=ref_logps,
                                   **options)  # fmt: skip
        p = out.pairs()
        loss = dpo_loss(*p[:4], chosen_counts=p.chosen_counts, rejected_counts=p.rejected_counts,
                        spec=spec, backend=backend)  # fmt: skip
        return loss, out
    b = preference_batch(batch, pad_token_id, ignore_index)
    options = dict(fused_lm_head=True, backend=backend, model_kwargs=model_kwargs)
    rc, rr = _reference_pair(b, ref_logps, ref_model, True, options)
    head = model_logprobs(model, b, stats=stats, fused_lm_head=True, backend=backend,
                          model_kwargs=model_kwargs, dpo=DPOHead(spec, rc, rr))  # fmt: skip
    return head.loss, ConcatenatedOutput(head.logprobs, rc, rr, b)
