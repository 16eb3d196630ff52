"""The bad-input inventory: every row of the README's table, tried, with the error it must give."""

import pathlib
import re

import pytest
import torch
from conftest import (
    TRAINER_DEVICE,
    data_check,
    preference_examples,
    prompt_tuned_lm,
    scaled_head_lm,
    tiny_causal_lm,
)

import dpo_kernels
from dpo_kernels import dpo_loss, sequence_logprobs
from dpo_kernels.batches import collate_preferences, model_inputs, preference_batch
from dpo_kernels.forward import concatenated_forward, model_logprobs

B, T, V = 2, 3, 11


def z(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def y(*shape):
    return torch.randint(0, V, shape)


def p(n=3):
    return torch.randn(n, dtype=torch.float64) - 20


def _llama4():
    from test_moe_aux import tiny_llama4

    return tiny_llama4(0)


def _double_backward():
    logits = z(B, T, V).requires_grad_()
    out = sequence_logprobs(logits, y(B, T))
    (g,) = torch.autograd.grad(out.logps.sum(), logits, create_graph=True)
    g.sum().backward()


def _loss_trainer(trl_config: bool = False, **kwargs):
    import tempfile

    from transformers import TrainingArguments

    from dpo_kernels.integrations.hf import DPOLossTrainer

    if trl_config:  # a DPOConfig is TrainingArguments with DPO fields DPOLossTrainer would ignore
        from trl import DPOConfig

        class TrainingArguments(DPOConfig):  # a user's own subclass, in a module of theirs
            pass

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], **TRAINER_DEVICE)
    return DPOLossTrainer(model=tiny_causal_lm(), args=args, **kwargs)


# (README row id, the call, exception type, message pattern)
INVENTORY = [
    ("integer logits", lambda: sequence_logprobs(y(B, T, V), y(B, T)), TypeError, "logits must be a floating-point"),
    ("logits not 3-D", lambda: sequence_logprobs(z(T, V), y(T)), ValueError, r"logits must be \[batch, tokens, vocab\]"),
    ("empty vocabulary", lambda: sequence_logprobs(z(B, T, 0), y(B, T)), ValueError, "empty vocabulary"),
    ("float labels", lambda: sequence_logprobs(z(B, T, V), z(B, T)), TypeError, "labels must be an integer"),
    ("bool labels", lambda: sequence_logprobs(z(B, T, V), y(B, T) > 3), TypeError, "labels must be an integer"),
    ("labels shape", lambda: sequence_logprobs(z(B, T, V), y(B, T + 1)), ValueError, r"labels must have shape \(2, 3\)"),
    ("label >= V", lambda: sequence_logprobs(z(B, T, V), torch.full((B, T), V)), ValueError, r"labels\[0, 0\] = 11 is outside the vocabulary \[0, 11\)"),
    ("negative label", lambda: sequence_logprobs(z(B, T, V), torch.full((B, T), -5)), ValueError, "is outside the vocabulary"),
    ("mask shape", lambda: sequence_logprobs(z(B, T, V), y(B, T), mask=torch.ones(B, T + 1)), ValueError, "mask must have the shape of labels"),
    ("mask values", lambda: sequence_logprobs(z(B, T, V), y(B, T), mask=torch.full((B, T), 2)), ValueError, r"mask\[0, 0\] = 2; it must hold only 0 and 1"),
    ("labels on another device", lambda: sequence_logprobs(z(B, T, V), y(B, T).to("meta")), ValueError, "labels is on meta but logits is on (cpu|cuda)"),
    ("ref_logits shape", lambda: sequence_logprobs(z(B, T, V), y(B, T), ref_logits=z(B, T, V + 1)), ValueError, "ref_logits must have the shape of logits"),
    ("unknown backend", lambda: sequence_logprobs(z(B, T, V), y(B, T), backend="cuda"), ValueError, "backend must be one of"),
    ("odd rows as pairs", lambda: sequence_logprobs(z(3, T, V), y(3, T)).pairs(), ValueError, "even batch"),
    ("unknown loss_type", lambda: dpo_loss(p(), p(), loss_type="dpo"), ValueError, "unknown loss_type"),
    ("beta 0 where a loss divides by it", lambda: dpo_loss(p(), p(), beta=0.0, loss_type="sppo_hard"), ValueError, r"beta must not be 0 with loss_type \['sppo_hard'\]"),
    ("beta 0 where a loss divides by it", lambda: dpo_kernels.simpo_loss(p(), p(), chosen_counts=p(), rejected_counts=p(), beta=0.0), ValueError, "beta must not be 0 with loss_type 'simpo'"),
    ("label_smoothing where a loss cannot take it", lambda: dpo_loss(p(), p(), loss_type="robust", label_smoothing=0.5), ValueError, r"'robust' divides by 1 - 2 \* label_smoothing"),
    ("label_smoothing where a loss cannot take it", lambda: dpo_loss(p(), p(), loss_type="exo_pair", label_smoothing=1.0), ValueError, r"'exo_pair' needs label_smoothing in \(0, 1\)"),
    ("exo_pair without smoothing", lambda: dpo_loss(p(), p(), loss_type="exo_pair"), ValueError, r"needs label_smoothing in \(0, 1\)"),
    ("f-divergence with a raw-ratio loss", lambda: dpo_loss(p(), p(), loss_type="nca_pair", f_divergence_type="forward_kl"), ValueError, "works only with"),
    ("loss input lengths", lambda: dpo_loss(p(3), p(4)), ValueError, "rejected_logps has 4 entries but chosen_logps has 3"),
    ("one reference sum missing", lambda: dpo_loss(p(), p(), p(), None), ValueError, "both ref_chosen_logps and ref_rejected_logps"),
    ("counts missing for ipo", lambda: dpo_loss(p(), p(), loss_type="ipo"), ValueError, "pass chosen_counts and rejected_counts"),
    ("beta not finite", lambda: dpo_loss(p(), p(), beta=float("inf")), ValueError, "beta must be a finite number, got inf"),
    ("beta NaN", lambda: dpo_loss(p(), p(), beta=float("nan")), ValueError, "beta must be a finite number, got nan"),
    ("discopop_tau not finite", lambda: dpo_loss(p(), p(), loss_type="discopop", discopop_tau=float("inf")), ValueError, "discopop_tau must be finite and not 0"),
    ("f_alpha_divergence_coef not finite", lambda: dpo_loss(p(), p(), f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("nan")), ValueError, "f_alpha_divergence_coef must be finite"),
    ("loss_weights not finite", lambda: dpo_loss(p(), p(), loss_type=["sigmoid", "sft"], loss_weights=[1.0, float("inf")], chosen_counts=p(), rejected_counts=p()), ValueError, "loss_weights must be finite"),
    ("beta not a number", lambda: dpo_loss(p(), p(), beta="0.1"), TypeError, "beta must be a number"),
    ("ignore_index range", lambda: sequence_logprobs(z(B, T, V), y(B, T), ignore_index=2**63), ValueError, r"ignore_index must lie in the int64 range \[-2\*\*63, 2\*\*63 - 1\]"),
    ("double backward through a fused gradient", lambda: _double_backward(), RuntimeError, "double backward .* is not supported"),
    ("forward-mode AD", lambda: torch.func.jvp(lambda x: sequence_logprobs(x, y(B, T)).logps, (z(B, T, V),), (z(B, T, V),)), NotImplementedError, "logits carries a forward-mode tangent"),
    ("empty preference batch", lambda: collate_preferences([]), ValueError, "empty batch"),
    ("batch without ids", lambda: preference_batch({"tokens": y(2, 3)}), KeyError, "needs input_ids"),
    ("odd rows in a batch", lambda: preference_batch({"input_ids": y(3, 4), "completion_mask": y(3, 4)}), ValueError, r"2 \* pairs"),
    ("float8 inputs", lambda: sequence_logprobs(z(B, T, V).to(torch.float8_e4m3fn), y(B, T)), TypeError, r"logits must be a floating-point tensor \(bf16, fp16, fp32 or fp64\), got torch.float8_e4m3fn"),
    ("integer log-prob sums", lambda: dpo_loss(p().long(), p()), TypeError, "chosen_logps must be a floating-point tensor"),
    ("negative token counts", lambda: dpo_loss(p(), p(), loss_type="ipo", chosen_counts=torch.tensor([4, -3, 2]), rejected_counts=torch.tensor([1, 2, 3])), ValueError, r"chosen_counts\[1\] = -3; token counts cannot be negative"),
    ("NaN token counts", lambda: dpo_loss(p(), p(), loss_type="sigmoid_norm", chosen_counts=torch.tensor([4.0, float("nan"), 2.0]), rejected_counts=torch.tensor([1, 2, 3])), ValueError, r"chosen_counts\[1\] = nan"),
    ("empty orpo completion", lambda: dpo_kernels.orpo_loss(p(), p(), chosen_counts=torch.tensor([4, 3, 2]), rejected_counts=torch.tensor([1, 0, 3])), ValueError, r"rejected_counts\[1\] = 0; orpo averages"),
    ("spec not from make_spec", lambda: dpo_loss(p(), p(), spec="sigmoid"), TypeError, "spec must be a DPOLossSpec from make_spec"),
    ("spec and loss options", lambda: dpo_kernels.linear_dpo_loss(z(2, T, 4), z(V, 4), y(2, T), spec=dpo_kernels.make_spec(beta=0.5), beta=0.2), TypeError, r"pass either spec or loss options, not both \(got \['beta'\]\)"),
    ("loss_type not a string", lambda: dpo_loss(p(), p(), loss_type=None), TypeError, "loss_type must be a string or a list of strings"),
    ("loss_type not a string", lambda: dpo_loss(p(), p(), loss_type=["sigmoid", 1]), TypeError, r"list of strings, got \['str', 'int'\]"),
    ("loss_weights not numbers", lambda: dpo_loss(p(), p(), loss_type=["sigmoid", "hinge"], loss_weights=[1.0, "a"]), TypeError, r"loss_weights\[1\] must be a number"),
    ("sibling option not finite", lambda: dpo_kernels.cpo_loss(p(), p(), cpo_alpha=0.0, alpha=float("nan")), ValueError, "alpha must be a finite number, got nan"),
    ("sibling option not a number", lambda: dpo_kernels.simpo_loss(p(), p(), chosen_counts=p(), rejected_counts=p(), simpo_gamma="0.5"), TypeError, "simpo_gamma must be a number"),
    ("kto kl not a scalar", lambda: dpo_kernels.kto_loss(p(), p(), torch.tensor([True, False, True]), kl=torch.tensor([0.1, 0.2])), ValueError, "kl must be a number or a scalar float tensor"),
    ("memory_budget not bytes", lambda: dpo_kernels.linear_dpo_loss(z(2, T, 4), z(V, 4), y(2, T), memory_budget=True), ValueError, "memory_budget must be a positive number of bytes"),
    ("pad_token_id None", lambda: collate_preferences(preference_examples(1), pad_token_id=None), TypeError, "pad_token_id must be an int, got None"),
    ("examples without prompt_ids", lambda: collate_preferences([{"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]}]), KeyError, "needs examples with prompt_ids, chosen_ids and rejected_ids"),
    ("1-D halves", lambda: preference_batch({"chosen_input_ids": y(4), "chosen_labels": y(4), "rejected_input_ids": y(3), "rejected_labels": y(3)}), ValueError, r"chosen_input_ids must be \[pairs, length\]"),
    ("model inputs beside separate halves", lambda: model_inputs({"chosen_input_ids": y(1, 4), "rejected_input_ids": y(1, 4), "position_ids": y(2, 4)}), ValueError, r"separate chosen_/rejected_ halves and other entries \['position_ids'\]"),
    ("reference sums on some examples only", lambda: collate_preferences([preference_examples(1)[0] | {"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}, preference_examples(1)[0]]), KeyError, "precompute both for every example, or for none"),
    ("batch without tokens", lambda: preference_batch(collate_preferences([{"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}])), ValueError, "has no tokens"),
    ("ref_logps not a pair", lambda: concatenated_forward(tiny_causal_lm(), collate_preferences(preference_examples(1)), ref_logps=torch.zeros(2)), TypeError, "ref_logps must be a pair"),
    ("backbone without an LM head", lambda: concatenated_forward(tiny_causal_lm().model, collate_preferences(preference_examples(1))), ValueError, "backbone without an LM head"),
    ("LM head not a plain Linear", lambda: concatenated_forward(scaled_head_lm(), collate_preferences(preference_examples(1)), fused_lm_head=True), NotImplementedError, "ScaledHead with a forward of its own"),
    ("layers between the backbone and the LM head", lambda: concatenated_forward(tiny_causal_lm("roberta"), collate_preferences(preference_examples(1)), fused_lm_head=True), NotImplementedError, "RobertaForCausalLM applies modules of its own between its backbone and its LM head .lm_head, lm_head.dense"),
    ("vocab_start without vocab_group", lambda: sequence_logprobs(z(B, T, V), y(B, T), vocab_start=11), ValueError, "vocab_start=11 needs vocab_group"),
    ("vocab_group not a process group", lambda: dpo_kernels.linear_sequence_logprobs(z(B, T, 4), z(V, 4), y(B, T), vocab_group="world"), TypeError, "vocab_group must be a torch.distributed ProcessGroup"),
    ("rank outside vocab_group", lambda: sequence_logprobs(z(B, T, V), y(B, T), vocab_group=torch.distributed.GroupMember.NON_GROUP_MEMBER), ValueError, "this rank is not a member of the group"),
    ("ignore_index bool", lambda: sequence_logprobs(z(B, T, V), y(B, T), ignore_index=True), TypeError, "ignore_index must be an int, got bool"),
    ("packing a model that crosses sequences", lambda: concatenated_forward(tiny_causal_lm("opt"), collate_preferences(preference_examples(1)), padding_free=True), ValueError, "padding_free=True: OPTForCausalLM .* attend to the one before it"),
    ("packing a model whose attention is not causal", lambda: concatenated_forward(tiny_causal_lm("xlm"), collate_preferences(preference_examples(1)), padding_free=True), ValueError, "padding_free=True: XLMWithLMHeadModel .* attend to the ones after it"),
    ("packing or fusing prompt-learning PEFT", lambda: concatenated_forward(prompt_tuned_lm(), collate_preferences(preference_examples(1)), fused_lm_head=True), ValueError, "fused_lm_head=True with a prompt-learning PEFT adapter"),
    ("transform outside float32", lambda: dpo_kernels.linear_sequence_logprobs(z(B, T, 4), z(V, 4), y(B, T), softcap=1e-50), ValueError, "softcap must lie in float32's normal range"),
    ("transform outside float32", lambda: dpo_kernels.linear_dpo_loss(z(2, T, 4), z(V, 4), y(2, T), temperature=1e-40), ValueError, r"logit_scale / temperature = 1e\+40 must be 0 or lie"),
    ("transform not a number", lambda: dpo_kernels.linear_sequence_logprobs(z(B, T, 4), z(V, 4), y(B, T), logit_scale=True), TypeError, "logit_scale must be a number, got bool"),
    ("flag not a bool", lambda: sequence_logprobs(z(B, T, V), y(B, T), stats="yes"), TypeError, "stats must be True or False, got 'yes'"),
    ("flag not a bool", lambda: dpo_kernels.linear_pair_loss(z(2, T, 4), z(V, 4), y(2, T), lambda pc, pr, nc, nr: pr - pc, pair_index=1), TypeError, "pair_index must be True or False"),
    ("memory_budget not bytes", lambda: dpo_kernels.linear_dpo_loss(z(2, T, 4), z(V, 4), y(2, T), memory_budget=2**70), ValueError, "positive number of bytes below 2\\*\\*63"),
    ("per_pair not one loss per pair", lambda: dpo_kernels.linear_pair_loss(z(4, T, 4), z(V, 4), y(4, T), lambda pc, pr, nc, nr: (pr - pc).sum()), ValueError, r"per_pair must return one loss per pair of the chunk, a \[2\] tensor"),
    ("per_pair not one loss per pair", lambda: dpo_kernels.linear_pair_loss(z(4, T, 4), z(V, 4), y(4, T), lambda pc, pr, nc, nr: torch.cat([pc, pr])), ValueError, r"got \(4,\)"),
    ("nll_weight not finite", lambda: dpo_kernels.linear_pair_loss(z(4, T, 4), z(V, 4), y(4, T), lambda pc, pr, nc, nr: pr - pc, nll_weight=float("nan")), ValueError, "nll_weight must be a finite number"),
    ("nll_weight not finite", lambda: dpo_kernels.linear_pair_loss(z(4, T, 4), z(V, 4), y(4, T), lambda pc, pr, nc, nr: pr - pc, nll_weight="2"), TypeError, "nll_weight must be a number"),
    ("hidden and head in different dtypes", lambda: dpo_kernels.linear_sequence_logprobs(z(B, T, 4), z(V, 4).double(), y(B, T)), TypeError, r"hidden is torch.float32 but weight is torch.float64; .* or pass the dtype the matmuls take as compute_dtype"),
    ("hidden and head in different dtypes", lambda: dpo_kernels.linear_dpo_loss(z(2, T, 4), z(V, 4), y(2, T), compute_dtype=torch.int8), TypeError, r"compute_dtype must be None or a floating-point dtype .* got torch.int8"),
    ("hidden and head in different dtypes", lambda: dpo_kernels.linear_kto_loss(z(2, T, 4), z(V, 4), y(2, T), p(2), torch.tensor([True, False]), kl=0.0, compute_dtype=torch.int8), TypeError, r"compute_dtype must be None or a floating-point dtype .* got torch.int8"),
    ("hidden and head in different dtypes", lambda: dpo_kernels.linear_kto_loss(z(2, T, 4), z(V, 4), y(2, T), p(2), torch.tensor([True, False]), kl=0.0, compute_dtype="bfloat16"), TypeError, r"compute_dtype must be None or a floating-point dtype .* got 'bfloat16'"),
    ("float8 inputs", lambda: sequence_logprobs(z(B, T, V), y(B, T), ref_logits=z(B, T, V).to(torch.float8_e4m3fn)), TypeError, r"ref_logits must be a floating-point tensor \(bf16, fp16, fp32 or fp64\)"),
    ("cu_seqlens not offsets", lambda: sequence_logprobs(z(1, 4, V), y(1, 4), cu_seqlens=torch.tensor([False, True])), TypeError, "cu_seqlens must be an integer tensor"),
    ("cu_seqlens not offsets", lambda: sequence_logprobs(z(1, 4, V), y(1, 4), cu_seqlens=torch.tensor([0, 4], device="meta")), ValueError, "cu_seqlens is on meta but logits is on"),
    ("batch masks not 0/1", lambda: preference_batch({"input_ids": y(2, 4), "completion_mask": torch.full((2, 4), 0.5)}), ValueError, r"completion_mask\[0, 0\] = 0.5; it must hold only 0 and 1"),
    ("half mask shape", lambda: preference_batch({"chosen_input_ids": y(1, 4), "chosen_completion_mask": torch.ones(1, 2), "rejected_input_ids": y(1, 4), "rejected_labels": y(1, 4)}), ValueError, r"chosen_completion_mask \(1, 2\) must have the shape of chosen_input_ids \(1, 4\)"),
    ("half mask shape", lambda: preference_batch({"chosen_input_ids": y(1, 4), "chosen_completion_mask": torch.ones(1, 6), "rejected_input_ids": y(1, 4), "rejected_labels": y(1, 4)}), ValueError, "must have the shape of chosen_input_ids"),
    ("packing nothing", lambda: dpo_kernels.pack(preference_batch({"input_ids": y(2, 3), "attention_mask": torch.zeros(2, 3), "completion_mask": torch.ones(2, 3)})), ValueError, "padding_free: the batch has no attended tokens"),
    ("examples without prompt_ids", lambda: collate_preferences([*preference_examples(1), {"prompt_ids": [1], "chosen_ids": [2]}]), KeyError, r"examples\[1\] has \['chosen_ids', 'prompt_ids'\] \(no 'rejected_ids'\)"),
    ("float token ids", lambda: collate_preferences([{"prompt_ids": [1], "chosen_ids": [1.7, 2], "rejected_ids": [3]}]), TypeError, r"examples\[0\]\['chosen_ids'\] must be a list of int token ids, got torch.float32"),
    ("ref_logps not a pair", lambda: concatenated_forward(tiny_causal_lm(), collate_preferences(preference_examples(1)), ref_logps=(torch.zeros(1, dtype=torch.long), torch.zeros(1))), TypeError, r"ref_logps must be a pair of floating-point \[P\] tensors"),
    ("compute_metrics with DPOLossTrainer", lambda: _loss_trainer(compute_metrics=lambda p: {}), ValueError, "compute_metrics would never be called"),
    ("compute_loss_func with DPOLossTrainer", lambda: _loss_trainer(compute_loss_func=lambda o, y, num_items_in_batch=None: o.loss), ValueError, "compute_loss_func would never be called"),
    ("TRL config with DPOLossTrainer", lambda: _loss_trainer(trl_config=True), TypeError, r"args=TrainingArguments, a TRL DPOConfig, whose own fields \(a DPOConfig's beta, loss_type"),
    ("ops that read values on meta or fake tensors", lambda: dpo_kernels.linear_cpo_loss(z(2, T, 4).to("meta"), z(V, 4).to("meta"), y(2, T).to("meta")), NotImplementedError, "dpo_kernels: linear_pair_loss .*meta and fake tensors"),
    ("router loss the model does not compute", lambda: model_logprobs(_llama4(), preference_batch(collate_preferences(preference_examples(1, vocab=28))), router_aux=True), ValueError, "computes none .*router_aux_loss_coef=0.0"),
]  # fmt: skip


DATA_ROWS = {"label >= V", "negative label", "mask values", "negative token counts", "NaN token counts",
             "empty orpo completion", "batch masks not 0/1"}  # fmt: skip  # device-side asserts on CUDA


@pytest.mark.parametrize(
    "row,call,exc,pattern",
    [pytest.param(*r, id=r[0], marks=[data_check] if r[0] in DATA_ROWS else []) for r in INVENTORY],
)
def test_bad_input_gets_its_error(row, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_masked_tokens_may_hold_any_label():
    labels = torch.full((B, T), 10**6)
    labels[0, 0] = 3
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 0] = True
    out = sequence_logprobs(z(B, T, V), labels, mask=mask)  # no error: only counted labels matter
    assert out.counts.tolist() == [1, 0]


def test_readme_lists_every_row():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Bad input")[1]
    rows = re.findall(r"^\| ([^|]+?) \|", table, re.M)
    assert {r[0] for r in INVENTORY} <= set(rows), set(r[0] for r in INVENTORY) - set(rows)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dpo_kernels.resolve_backend("triton", torch.device("cpu"))


def test_numpy_scalars_are_numbers_and_empty_rows_pack():
    """What the checks above must not refuse: a numpy logit_scale (as a config may hold) gives
    the float's numbers; a batch with one empty row packs, that row's sums 0 as padded."""
    import numpy as np

    h, w, lab = z(B, T, 4), z(V, 4), y(B, T)
    want = dpo_kernels.linear_sequence_logprobs(h, w, lab, logit_scale=2.0, softcap=3.0)
    got = dpo_kernels.linear_sequence_logprobs(h, w, lab, logit_scale=np.float32(2.0),
                                               softcap=np.float64(3.0))  # fmt: skip
    assert torch.equal(got.logps, want.logps)
    b = preference_batch(collate_preferences(preference_examples(2)))
    b = b._replace(attention_mask=b.attention_mask.clone())
    b.attention_mask[1] = 0
    packed = dpo_kernels.pack(b)
    assert packed.cu_seqlens[1] == packed.cu_seqlens[2]  # the empty row
    model = tiny_causal_lm()
    padded = concatenated_forward(model, b).policy.logps
    assert torch.allclose(concatenated_forward(model, b, padding_free=True).policy.logps, padded,
                          atol=1e-5)  # fmt: skip
    assert padded[1] == 0
