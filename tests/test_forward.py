"""The concatenated-batch forward against separate forwards of chosen and rejected."""

import pytest
import torch
from conftest import EPS32, cpu_only, preference_examples, tiny_causal_lm

from dpo_kernels import dpo_loss, make_spec
from dpo_kernels.batches import collate_preferences, preference_batch
from dpo_kernels.forward import batch_logprobs, concatenated_dpo_loss, concatenated_forward


def trl_collate(examples, pad=0):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=pad)(examples)


def split_batch(examples, pad=0):
    """The separate-halves layout, each half padded to its own length, masks as labels."""
    out = {}
    for half in ("chosen", "rejected"):
        seqs = [e["prompt_ids"] + e[f"{half}_ids"] for e in examples]
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), pad)
        am = torch.zeros(len(seqs), L, dtype=torch.long)
        labels = torch.full((len(seqs), L), -100)
        for i, (e, s) in enumerate(zip(examples, seqs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            am[i, : len(s)] = 1
            labels[i, len(e["prompt_ids"]) : len(s)] = torch.tensor(e[f"{half}_ids"])
        out |= {f"{half}_input_ids": ids, f"{half}_attention_mask": am, f"{half}_labels": labels}
    return out


def separate_sums(model, examples, half):
    """Each sequence alone, unpadded, naive log-softmax in float64."""
    sums = []
    for e in examples:
        ids = torch.tensor([e["prompt_ids"] + e[f"{half}_ids"]])
        logits = model(input_ids=ids).logits.double()
        lp = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        sums.append(lp[len(e["prompt_ids"]) - 1 :].sum())
    return torch.stack(sums)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("layout", ["trl", "split"])
def test_concatenated_equals_separate_forwards(kind, layout):
    model = tiny_causal_lm(kind)
    ref_model = tiny_causal_lm(kind, seed=1)
    ex = preference_examples(4)
    batch = trl_collate(ex) if layout == "trl" else split_batch(ex)
    out = concatenated_forward(model, batch, ref_model=ref_model)
    p = out.pairs()
    with torch.no_grad():
        torch.testing.assert_close(
            p.chosen_logps.double(), separate_sums(model, ex, "chosen"), rtol=1e-5, atol=1e-4
        )
        torch.testing.assert_close(
            p.rejected_logps.double(), separate_sums(model, ex, "rejected"), rtol=1e-5, atol=1e-4
        )
        torch.testing.assert_close(
            p.ref_chosen_logps.double(),
            separate_sums(ref_model, ex, "chosen"),
            rtol=1e-5,
            atol=1e-4,
        )
        torch.testing.assert_close(
            p.ref_rejected_logps.double(),
            separate_sums(ref_model, ex, "rejected"),
            rtol=1e-5,
            atol=1e-4,
        )
    assert p.chosen_counts.tolist() == [len(e["chosen_ids"]) for e in ex]
    assert p.rejected_counts.tolist() == [len(e["rejected_ids"]) for e in ex]
    assert p.chosen_logps.requires_grad and not p.ref_chosen_logps.requires_grad


def test_one_policy_forward_and_one_reference_forward():
    model, ref_model = tiny_causal_lm(), tiny_causal_lm(seed=1)
    calls = []
    model.register_forward_hook(lambda m, a, k: calls.append(("policy", torch.is_grad_enabled())))
    ref_model.register_forward_hook(lambda m, a, k: calls.append(("ref", torch.is_grad_enabled())))
    concatenated_forward(model, trl_collate(preference_examples(3)), ref_model=ref_model)
    assert sorted(calls) == [("policy", True), ("ref", False)]


def test_precomputed_and_reference_free():
    model, ref_model = tiny_causal_lm(), tiny_causal_lm(seed=1)
    ex = preference_examples(3)
    with_model = concatenated_forward(model, trl_collate(ex), ref_model=ref_model)
    rc, rr = with_model.ref_chosen_logps, with_model.ref_rejected_logps
    batch = dict(trl_collate(ex), ref_chosen_logps=rc, ref_rejected_logps=rr)
    pre = concatenated_forward(model, batch)
    torch.testing.assert_close(pre.ref_chosen_logps, rc)
    pre2 = concatenated_forward(model, trl_collate(ex), ref_logps=(rc, rr))
    torch.testing.assert_close(pre2.ref_rejected_logps, rr)
    free = concatenated_forward(model, trl_collate(ex))
    assert free.ref_chosen_logps is None
    loss = dpo_loss(*free.pairs()[:4]).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bad_batches():
    model = tiny_causal_lm()
    with pytest.raises(KeyError, match="needs input_ids"):
        preference_batch({"ids": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="2 \\* pairs"):
        preference_batch(
            {"input_ids": torch.zeros(3, 4, dtype=torch.long), "completion_mask": torch.ones(3, 4)}
        )
    with pytest.raises(KeyError, match="completion_mask or labels"):
        preference_batch({"input_ids": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="must have the shape of input_ids"):
        preference_batch(
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "completion_mask": torch.ones(2, 3)}
        )
    ex = preference_examples(3)
    b = split_batch(ex)
    b["rejected_input_ids"] = b["rejected_input_ids"][:2]
    with pytest.raises(ValueError, match="one chosen and one rejected"):
        concatenated_forward(model, b)


def test_model_outputs_logits_or_says_why_not():
    # A plain tensor output is the logits (not its first row); a backbone's output (hidden
    # states of an AutoModel, no LM head) is refused instead of being read as logits.
    lm = tiny_causal_lm()
    batch = collate_preferences(preference_examples(2))

    class TensorOut(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **kw):
            return lm(input_ids=input_ids, attention_mask=attention_mask).logits

    a = concatenated_forward(lm, batch).policy.logps
    torch.testing.assert_close(concatenated_forward(TensorOut(), batch).policy.logps, a)
    with pytest.raises(ValueError, match="backbone without an LM head"):
        concatenated_forward(lm.model, batch)


def test_packed_rows_take_any_attention_mask_dtype():
    # padding_free drops the tokens whose attention_mask is 0, whatever its dtype (a float mask
    # failed in pack()), and scores the same as the padded rows
    model = tiny_causal_lm()
    batch = collate_preferences(preference_examples(3))
    want = concatenated_forward(model, batch).policy.logps
    for am in (batch["attention_mask"].float(), batch["attention_mask"].bool()):
        got = concatenated_forward(model, dict(batch, attention_mask=am), padding_free=True)
        torch.testing.assert_close(got.policy.logps, want, rtol=1e-5, atol=1e-5)


def test_batches_in_every_form_give_the_same_logps():
    # preference_batch's own PreferenceBatch and a collated dict are taken by concatenated_forward
    # and batch_logprobs alike; concatenated_dpo_loss's spec=None is the defaults on both routes
    model = tiny_causal_lm()
    batch = collate_preferences(preference_examples(2))
    want = concatenated_forward(model, batch).policy.logps
    pb = preference_batch(batch)
    torch.testing.assert_close(concatenated_forward(model, pb).policy.logps, want)
    torch.testing.assert_close(batch_logprobs(model, batch).logps, want)
    torch.testing.assert_close(batch_logprobs(model, pb).logps, want)
    default = concatenated_dpo_loss(model, batch, make_spec())[0].loss
    for fused in (False, True):
        got = concatenated_dpo_loss(model, batch, None, fused_lm_head=fused)[0].loss
        torch.testing.assert_close(got, default, rtol=1e-5, atol=1e-6)


def tiny_softcapped_lm():
    """Gemma-2-style: final_logit_softcapping applied after the LM head."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        final_logit_softcapping=2.0,
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(cfg).eval()


def tiny_scaled_lm():
    """Cohere-style: logits multiplied by logit_scale."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.CohereConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, logit_scale=0.3,
    )  # fmt: skip
    return transformers.CohereForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "make", [tiny_causal_lm, lambda: tiny_causal_lm("gpt2"), tiny_softcapped_lm, tiny_scaled_lm],
    ids=["llama", "gpt2-tied", "gemma2-softcap", "cohere-scale"],
)  # fmt: skip
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_fused_lm_head_equals_the_logits_path(make, padding_free):
    _fused_equals_logits(make(), padding_free)


def test_fused_lm_head_applies_falcon_h1_lm_head_multiplier():
    # FalconH1ForCausalLM: logits = lm_head(h) * config.lm_head_multiplier (padded rows: its
    # mamba layers do not take packed sequences)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.FalconH1Config(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, mamba_d_ssm=16, mamba_n_heads=2,
        mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16, mamba_expand=1,
        lm_head_multiplier=0.1,
    )  # fmt: skip
    _fused_equals_logits(transformers.FalconH1ForCausalLM(cfg).eval(), False)


def test_fused_lm_head_refuses_heads_it_would_misread():
    # The fused head computes hidden @ weight.T + bias: a LoRA adapter on lm_head or a head with
    # a forward of its own would be read as its weight alone (the adapter untrained): refused.
    peft = pytest.importorskip("peft")
    batch = collate_preferences(preference_examples(2))
    lora = peft.get_peft_model(tiny_causal_lm(), peft.LoraConfig(r=2, target_modules=["lm_head"]))

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    scaled = tiny_causal_lm()
    old = scaled.lm_head
    scaled.lm_head = ScaledHead(old.in_features, old.out_features, bias=False)
    for model, name in ((lora, "peft.tuners.lora.layer.Linear"), (scaled, "ScaledHead")):
        with pytest.raises(NotImplementedError, match=f"{name} with a forward of its own.*"
                           "use fused_lm_head=False"):  # fmt: skip
            concatenated_forward(model, batch, fused_lm_head=True)


def test_fused_lm_head_takes_a_peft_modules_to_save_head():
    # modules_to_save=["lm_head"]: PEFT's wrapper around a trainable copy of the plain head
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_causal_lm(),
        peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    with torch.no_grad():  # the copy differs from the original head
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    _fused_equals_logits(model, False)


def _fused_equals_logits(model, padding_free):
    batch = collate_preferences(preference_examples(4))
    kw = dict(padding_free=padding_free, stats=True)
    a = concatenated_forward(model, batch, **kw).policy
    f = concatenated_forward(model, batch, fused_lm_head=True, **kw).policy
    torch.testing.assert_close(f.logps, a.logps, rtol=1e-5, atol=1e-5)
    for x, y in zip(f.stats, a.stats, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    ga = torch.autograd.grad(a.logps.sum(), params, allow_unused=True)
    gf = torch.autograd.grad(f.logps.sum(), params, allow_unused=True)
    for x, y in zip(gf, ga, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6 * EPS32 / 2**-23)


def test_fused_lm_head_restores_the_model():
    model = tiny_causal_lm()
    ids = torch.randint(0, 97, (2, 6))
    before = model(input_ids=ids).logits
    concatenated_forward(model, collate_preferences(preference_examples(2)), fused_lm_head=True)
    torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_fused_lm_head_model_still_pickles(tmp_path):
    """A model the fused head was installed on saves with torch.save and loads in full, as stock's
    does (the patch was a closure and a compile-disabled function: PicklingError), and the loaded
    model computes as the original, with and without the fused head; the patched forward keeps
    the model's signature (generate() checks its kwargs against it)."""
    import inspect

    model = tiny_causal_lm()
    ids = torch.randint(0, 97, (2, 6))
    batch = collate_preferences(preference_examples(2))
    plain = inspect.signature(model.forward)
    fused = concatenated_forward(model, batch, fused_lm_head=True).policy.logps
    assert inspect.signature(model.forward) == plain
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    again = concatenated_forward(loaded, batch, fused_lm_head=True).policy.logps
    torch.testing.assert_close(again, fused)


def _q_proj_dtypes(model) -> list:
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, inp, out: seen.append(out.dtype)
    )
    return seen


@pytest.fixture
def bf16_accelerator():
    """accelerate's mixed precision on CPU, from a fresh accelerate state (an earlier test's
    trainer may have made one, which an Accelerator may not change), reset afterwards too."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield lambda **kw: accelerate.Accelerator(mixed_precision="bf16", cpu=True, **kw)
    AcceleratorState._reset_state(True)


@cpu_only
@pytest.mark.parametrize(
    "enabled,compiled", [(True, False), (False, False), (True, True)],
    ids=["bf16", "autocast-kwargs-off", "bf16-compiled"],
)  # fmt: skip
def test_fused_head_takes_the_autocast_accelerate_wraps_the_forward_in(
    bf16_accelerator, enabled, compiled
):
    # The fused head's path runs the backbone itself, not the forward accelerate wrapped: it
    # enters a copy of that wrapper's autocast (with the accelerator's AutocastKwargs), so both
    # paths run the backbone in the same dtype and agree to its precision. Compiled too: the copy
    # is built from plain values, which dynamo traces (it could not copy the autocast object).
    from accelerate.utils import AutocastKwargs
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    acc = bf16_accelerator(
        kwargs_handlers=[AutocastKwargs(enabled=enabled)],
        **({"dynamo_backend": "aot_eager"} if compiled else {}),
    )
    model = acc.prepare(tiny_causal_lm())
    seen = _q_proj_dtypes(model)
    batch = collate_preferences(preference_examples(2))
    fused = concatenated_dpo_loss(model, batch, None, fused_lm_head=True)[0].loss
    assert (counters["frames"]["ok"] > 0) == compiled
    plain = concatenated_dpo_loss(model, batch, None, fused_lm_head=False)[0].loss
    assert set(seen) == {torch.bfloat16 if enabled else torch.float32}, seen
    tol = 1e-3 if enabled else 1e-6
    torch.testing.assert_close(fused, plain, rtol=tol, atol=tol)


@cpu_only
@pytest.mark.parametrize("installed", ["after-prepare", "before-prepare"])
def test_fused_head_survives_accelerate_unwrapping_the_forward(bf16_accelerator, installed):
    # unwrap_model(..., keep_fp32_wrapper=False) puts the class's forward back, dropping the
    # patch: the next fused call patches again (it scored the model's logits output before).
    # Installed before prepare (a precompute pass in a trainer's __init__), accelerate rewraps
    # the patched method; unwrapping must still leave a forward that works.
    acc = bf16_accelerator()
    batch = collate_preferences(preference_examples(2))
    model = tiny_causal_lm()
    if installed == "before-prepare":
        concatenated_forward(model, batch, fused_lm_head=True)
    model = acc.prepare(model)
    concatenated_forward(model, batch, fused_lm_head=True)
    model = acc.unwrap_model(model, keep_fp32_wrapper=False)
    fused = concatenated_forward(model, batch, fused_lm_head=True).policy.logps
    plain = concatenated_forward(model, batch).policy.logps
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_fused_head_refuses_an_activation_checkpointed_head():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    model = tiny_causal_lm()
    apply_activation_checkpointing(model, check_fn=lambda m: m is model.lm_head)
    with pytest.raises(NotImplementedError, match="activation-checkpointed LM head"):
        concatenated_forward(model, collate_preferences(preference_examples(2)), fused_lm_head=True)


def test_preference_batch_compiles_without_graph_breaks():
    """Its checks of the masks' values read nothing on the host under torch.compile (an
    assert), so a compiled step that normalizes its batch has no graph break there."""
    batch = collate_preferences(preference_examples(2))
    compiled = torch.compile(lambda b: preference_batch(b).completion_mask.sum(), fullgraph=True)
    assert compiled(batch) == preference_batch(batch).completion_mask.sum()


def test_preference_batch_of_meta_and_fake_tensors():
    """Shape-only tensors (meta, or fake ones, as memory estimators use) have no values to read:
    the masks' value check asserts instead of reading them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = collate_preferences(preference_examples(2))
    meta = {k: v.to("meta") for k, v in batch.items()}
    assert preference_batch(meta).completion_mask.device.type == "meta"
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v.float() if k != "input_ids" else v) for k, v in batch.items()}
        assert preference_batch(fake).attention_mask.shape == batch["attention_mask"].shape


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "head"])
def test_left_padded_halves_score_as_right_padded(padding_free, fused):
    """Halves from a left-padding tokenizer (a relative-position model): the same sums and counts
    as right-padded ones. Before 2026-11-27 the padded path also scored a left-padded row's first
    token, predicted from the pad before it (one token too many for an empty prompt)."""
    model = tiny_causal_lm("llama")
    ex = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},
        {"prompt_ids": [], "chosen_ids": [11, 12], "rejected_ids": [13, 14, 15, 16]},
    ]
    right = split_batch(ex)
    left = {}
    for k, v in right.items():  # each row's tokens moved to its right end
        am = right[k.replace("input_ids", "attention_mask").replace("labels", "attention_mask")]
        rows = zip(v, am, strict=True)
        left[k] = torch.stack([torch.roll(r, int((a == 0).sum())) for r, a in rows])
    assert left["chosen_attention_mask"][1, 0] == 0  # left-padded
    want = concatenated_forward(model, right, fused_lm_head=fused, padding_free=padding_free)
    got = concatenated_forward(model, left, fused_lm_head=fused, padding_free=padding_free)
    assert got.policy.counts.tolist() == want.policy.counts.tolist() == [3, 1, 1, 3]
    torch.testing.assert_close(got.policy.logps, want.policy.logps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "head"])
def test_a_gap_inside_a_row_is_scored_across(fused):
    """An attention mask with a hole inside a row: the tokens after it are scored from the model's
    logits of the row as given (no token moved), the label after the hole predicted from the
    masked position, as TRL's shifted completion mask does."""
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [3, 4, 9, 10, 11, 0]])
    am = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    cm = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    batch = {"input_ids": ids, "attention_mask": am, "completion_mask": cm}
    got = concatenated_forward(model, batch, fused_lm_head=fused).policy
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].double()
    tok = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = (cm[:, 1:] * am[:, 1:]).bool()
    assert got.counts.tolist() == mask.sum(1).tolist() == [3, 3]
    torch.testing.assert_close(got.logps.double(), (tok * mask).sum(1), rtol=1e-5, atol=1e-5)
