"""Gaps a mutation run found: each test checks one backend or path against a float64 formula
written here (never against the package's own reference module), on inputs where a wrong
`ignore_index`, logit transform or packed sequence end changes the numbers."""

import itertools

import pytest
import torch
from conftest import cpu_backends, preference_examples, tiny_causal_lm
from test_linear_logprobs import small_tiles  # noqa: F401 (a fixture, used by name)

import dpo_kernels
from dpo_kernels.batches import collate_preferences, pack, preference_batch
from dpo_kernels.forward import concatenated_forward

# Non-default ignore_index values: a valid token id (so a kernel that compares with -100 counts
# those tokens and reads a real logit) and a negative one other than -100.
IGNORE = [3, -1]


def f64_token_logps(z, labels, counted):
    """log_softmax(z)[label] in float64 where counted, else 0: [..., T]."""
    lp = z.double().log_softmax(-1).gather(-1, torch.where(counted, labels, 0).unsqueeze(-1))
    return torch.where(counted, lp.squeeze(-1), 0.0)


def labels_with(ignore_index, B, T, V, g):
    """Labels in [0, V) with about a third set to ignore_index, never -100, and a random mask."""
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.35] = ignore_index
    labels[labels == 3] = ignore_index if ignore_index == 3 else 3  # 3 appears only as ignored
    labels[0, 0] = ignore_index
    mask = torch.rand(B, T, generator=g) > 0.15
    return labels, mask


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ignore_index", IGNORE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_path_honours_ignore_index(backend, ignore_index, dtype):
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    B, T, V = 2, 5, 37
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ref_logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    labels, mask = labels_with(ignore_index, B, T, V, g)
    counted = (labels != ignore_index) & mask
    z = logits.clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(
        z, labels, mask=mask, ignore_index=ignore_index, ref_logits=ref_logits, backend=backend
    )
    z64 = logits.double().requires_grad_()
    tok = f64_token_logps(z64, labels, counted)
    assert out.counts.tolist() == counted.sum(-1).tolist()
    torch.testing.assert_close(out.token_logps.double(), tok.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logps.double(), tok.sum(-1).detach(), rtol=0, atol=2e-5)
    ref_tok = f64_token_logps(ref_logits, labels, counted)
    torch.testing.assert_close(out.ref_logps.double(), ref_tok.sum(-1), rtol=0, atol=2e-5)
    w = torch.randn(B, T, generator=g, dtype=torch.float64)
    (out.token_logps * w.float()).sum().backward()
    (tok * w).sum().backward()
    atol = 2 * (2**-8 if dtype == torch.bfloat16 else 1e-6) * w.abs().max().item()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=0, atol=atol)
    assert torch.all(z.grad[~counted] == 0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ignore_index", IGNORE)
def test_packed_logits_path_honours_ignore_index(backend, ignore_index):
    g = torch.Generator(torch.get_default_device()).manual_seed(2)
    lengths, V = [4, 1, 6], 23
    N = sum(lengths)
    logits = torch.randn(N, V, generator=g) * 2
    labels, mask = labels_with(ignore_index, 1, N, V, g)
    labels, mask = labels[0], mask[0]
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    out = dpo_kernels.sequence_logprobs(
        logits, labels, mask=mask, ignore_index=ignore_index, cu_seqlens=cu, backend=backend
    )
    tok = f64_token_logps(logits, labels, (labels != ignore_index) & mask)
    expect = torch.stack([tok[a:b].sum() for a, b in itertools.pairwise(cu)])
    torch.testing.assert_close(out.logps.double(), expect, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ignore_index", IGNORE)
@pytest.mark.parametrize("transform", [{}, dict(logit_scale=0.7, softcap=4.0, temperature=1.3)])
def test_linear_path_honours_ignore_index(backend, ignore_index, transform):
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    B, T, H, V = 2, 5, 8, 37
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.8
    bias = torch.randn(V, generator=g) * 0.3
    labels, mask = labels_with(ignore_index, B, T, V, g)
    counted = (labels != ignore_index) & mask
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = dpo_kernels.linear_sequence_logprobs(
        h, w, labels, bias=b, mask=mask, ignore_index=ignore_index, backend=backend, **transform
    )
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    x = h64 @ w64.T + b64
    if "softcap" in transform:
        x = transform["softcap"] * torch.tanh(x / transform["softcap"])
    z = x * transform.get("logit_scale", 1.0) / transform.get("temperature", 1.0)
    tok = f64_token_logps(z, labels, counted)
    assert out.counts.tolist() == counted.sum(-1).tolist()
    torch.testing.assert_close(out.token_logps.double(), tok.detach(), rtol=0, atol=1e-5)
    wt = torch.randn(B, T, generator=g, dtype=torch.float64)
    (out.token_logps * wt.float()).sum().backward()
    (tok * wt).sum().backward()
    for ours, ref in ((h, h64), (w, w64), (b, b64)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.all(h.grad[~counted] == 0)


def test_vocab_parallel_single_rank_honours_ignore_index(tmp_path):
    """The vocabulary-parallel code path in a one-process gloo group, against float64."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        g = torch.Generator(torch.get_default_device()).manual_seed(4)
        B, T, H, V = 2, 4, 6, 19
        logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
        labels, mask = labels_with(3, B, T, V, g)
        counted = (labels != 3) & mask
        z = logits.clone().requires_grad_()
        out = dpo_kernels.sequence_logprobs(
            z, labels, mask=mask, ignore_index=3, vocab_group=dist.group.WORLD
        )
        z64 = logits.clone().requires_grad_()
        tok = f64_token_logps(z64, labels, counted)
        torch.testing.assert_close(out.logps, tok.sum(-1).detach(), rtol=0, atol=1e-10)
        out.logps.sum().backward()
        tok.sum().backward()
        torch.testing.assert_close(z.grad, z64.grad, rtol=0, atol=1e-10)

        hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
        weight = torch.randn(V, H, generator=g, dtype=torch.float64)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = dpo_kernels.linear_sequence_logprobs(
            h, w, labels, mask=mask, ignore_index=3, softcap=3.0, vocab_group=dist.group.WORLD
        )
        h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        tok = f64_token_logps(3.0 * torch.tanh(h64 @ w64.T / 3.0), labels, counted)
        torch.testing.assert_close(out.logps, tok.sum(-1).detach(), rtol=0, atol=1e-10)
        out.logps.sum().backward()
        tok.sum().backward()
        torch.testing.assert_close(h.grad, h64.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(w.grad, w64.grad, rtol=0, atol=1e-10)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Logit transforms of model families: the fused LM head against the model's own logits.


def _tiny(config_cls, model_cls, **extra):
    import transformers

    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128)  # fmt: skip
    cfg = getattr(transformers, config_cls)(**{**base, **extra})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # a head large enough that the transform moves the log-probs by O(1)
        model.get_output_embeddings().weight.mul_(40.0)
    return model


INKLING = dict(head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
               moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
               n_shared_experts=1, use_cache=False)  # fmt: skip

FAMILIES = {
    "gemma2-softcap": lambda: _tiny(
        "Gemma2Config", "Gemma2ForCausalLM", head_dim=8, final_logit_softcapping=3.0
    ),
    "cohere-scale": lambda: _tiny("CohereConfig", "CohereForCausalLM", logit_scale=0.3),
    "granite-divisor": lambda: _tiny("GraniteConfig", "GraniteForCausalLM", logits_scaling=4.0),
    "hyperclovax-multiplier": lambda: _tiny(
        "HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", logits_scaling=0.25
    ),
    "inkling-mup-divisor": lambda: _tiny(
        "InklingTextConfig", "InklingForCausalLM", **INKLING, logits_mup_width_multiplier=6.0
    ),
    "inkling2-softcap-unpadded": lambda: _tiny(  # a head of unpadded_vocab_size rows, no cut
        "Inkling2TextConfig",
        "Inkling2ForCausalLM",
        **INKLING,
        final_logit_softcapping=3.0,
        unpadded_vocab_size=97,
        vocab_size=100,
    ),
    "recurrent-gemma-softcap": lambda: _tiny(
        "RecurrentGemmaConfig",
        "RecurrentGemmaForCausalLM",
        logits_soft_cap=3.0,
        block_types=("recurrent", "attention"),
        attention_window_size=64,
        use_cache=False,
    ),
}


NOT_PACKABLE = {"inkling-mup-divisor", "inkling2-softcap-unpadded", "recurrent-gemma-softcap"}


def test_unmapped_head_post_processing_raises():
    class Config:
        model_type = "muse_spark_text"
        output_multiplier = 0.18
        final_logit_softcapping = 20.0

    class Model:
        config = Config()

    from dpo_kernels.fused_head import head_transform

    with pytest.raises(NotImplementedError, match=r"output_multiplier.*fused_lm_head=False"):
        head_transform(Model())
    Config.output_multiplier = None
    Config.logits_soft_cap = 30.0  # two caps: which one the model applies is not known here
    with pytest.raises(NotImplementedError, match=r"several logit softcaps"):
        head_transform(Model())
    Config.final_logit_softcapping = None
    Config.vocab_size, Config.unpadded_vocab_size = 128, 100  # Inkling: logits[..., :100]
    with pytest.raises(NotImplementedError, match=r"unpadded_vocab_size=100.*fused_lm_head=False"):
        head_transform(Model())
    # The head's rows, not the config's vocab_size, set the cut (Inkling2: a head of
    # unpadded_vocab_size rows), also with ZeRO-3's empty partitioned weight (ds_shape)
    Model.get_output_embeddings = lambda self: head
    head = torch.nn.Linear(4, 100, bias=False)
    assert head_transform(Model())["softcap"] == 30.0
    head.weight = torch.nn.Parameter(torch.empty(0))  # partitioned: the shape is ds_shape
    head.weight.ds_shape = torch.Size([100, 4])
    assert head_transform(Model())["softcap"] == 30.0
    head.weight.ds_shape = torch.Size([128, 4])
    with pytest.raises(NotImplementedError, match=r"unpadded_vocab_size=100 \(of 128\)"):
        head_transform(Model())
    del Model.get_output_embeddings
    Config.unpadded_vocab_size = 128
    assert head_transform(Model())["softcap"] == 30.0
    del Config.logits_soft_cap
    Config.output_logit_soft_cap = 15.0  # xLSTM's name
    assert head_transform(Model())["softcap"] == 15.0


def model_logps_f64(model, batch):
    """Per-row sums of the completion tokens' log-probs from the model's own logits, float64."""
    b = preference_batch(batch)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    labels = b.input_ids[:, 1:]
    counted = (b.completion_mask[:, 1:] != 0) & (b.attention_mask[:, 1:] != 0)
    return f64_token_logps(logits[:, :-1], labels, counted).sum(-1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_fused_lm_head_applies_the_family_transform(family, padding_free):
    model = FAMILIES[family]()
    batch = collate_preferences(preference_examples(3))
    expect = model_logps_f64(model, batch)
    if padding_free and family in NOT_PACKABLE:  # the probe finds rows attending across
        with pytest.raises(ValueError, match=f"padding_free=True: {type(model).__name__}"):
            concatenated_forward(model, batch, fused_lm_head=True, padding_free=True)
        return
    fused = concatenated_forward(model, batch, fused_lm_head=True, padding_free=padding_free)
    plain_head = concatenated_forward(model, batch, fused_lm_head=False)
    torch.testing.assert_close(fused.policy.logps.double(), expect, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain_head.policy.logps.double(), expect, rtol=1e-5, atol=1e-4)
    # The control: without the transform the numbers are clearly different.
    b = preference_batch(batch)
    with torch.no_grad():
        hidden = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask)[0]
        raw = model.get_output_embeddings()(hidden)
    counted = (b.completion_mask[:, 1:] != 0) & (b.attention_mask[:, 1:] != 0)
    untransformed = f64_token_logps(raw[:, :-1], b.input_ids[:, 1:], counted).sum(-1)
    assert (untransformed - expect).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# Packed layouts whose sequence ends fall on counted tokens.


def test_pack_labels_match_a_per_row_construction():
    # Empty prompts: every row starts with a completion token, so the token after a sequence's
    # end would count if pack() let labels cross into the next sequence.
    ex = preference_examples(3, seed=5)
    for e in ex[::2]:  # rows 1, 3 (and 4, 6) keep a prompt: a prompt-to-completion step too
        e["prompt_ids"] = []
    b = preference_batch(collate_preferences(ex))
    p = pack(b, ignore_index=-7)
    want_labels, want_mask, want_pos = [], [], []
    for ids, am, cm in zip(b.input_ids, b.attention_mask, b.completion_mask, strict=True):
        n = int(am.sum())
        row = ids[:n].tolist()
        want_labels += [*row[1:], -7]
        want_mask += [bool(c) for c in cm[1:n].tolist()] + [False]
        want_pos += list(range(n))
    assert p.labels.tolist() == want_labels
    assert p.mask.tolist() == want_mask
    assert p.position_ids[0].tolist() == want_pos
    assert p.cu_seqlens.tolist() == [0, *b.attention_mask.sum(1).cumsum(0).tolist()]
    assert p.input_ids[0].tolist() == b.input_ids[b.attention_mask != 0].tolist()


def test_padding_free_forward_with_completions_at_every_boundary():
    ex = preference_examples(3, seed=6)
    for e in ex[::2]:  # these rows start with a completion token: right after an end
        e["prompt_ids"] = []
    batch = collate_preferences(ex)
    model = tiny_causal_lm()
    expect = model_logps_f64(model, batch)
    for fused in (False, True):
        out = concatenated_forward(model, batch, padding_free=True, fused_lm_head=fused)
        torch.testing.assert_close(out.policy.logps.double(), expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_packed_op_counts_first_and_last_tokens_of_each_sequence(backend):
    g = torch.Generator(torch.get_default_device()).manual_seed(7)
    lengths, V = [3, 1, 5, 2], 17
    N = sum(lengths)
    logits = torch.randn(N, V, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)  # every token counts, boundaries included
    cu = torch.tensor([0, 3, 4, 9, 11], dtype=torch.int32)
    z = logits.clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, cu_seqlens=cu, backend=backend)
    z64 = logits.double().requires_grad_()
    tok = f64_token_logps(z64, labels, torch.ones(N, dtype=torch.bool))
    expect = torch.stack([tok[a:b].sum() for a, b in itertools.pairwise(cu)])
    torch.testing.assert_close(out.logps.double(), expect.detach(), rtol=0, atol=2e-5)
    assert out.counts.tolist() == lengths
    w = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    (out.logps * w.float()).sum().backward()
    (expect * w).sum().backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The accuracy checks themselves can fail: controls for errors the naive bound alone let through.


@pytest.mark.parametrize(
    "dtype,kind,error",
    [(torch.float16, "large", 1000.0), (torch.bfloat16, "normal", None)],
    ids=["fp16-overflowing-naive-plus-1000", "bf16-naive-sized-error"],
)
def test_logprob_check_rejects_a_wrong_forward(monkeypatch, dtype, kind, error):
    import test_logprobs

    real = dpo_kernels.sequence_logprobs
    inputs = test_logprobs.make_inputs(2, 4, 300, dtype, kind)
    if error is None:  # as wrong as the naive bf16 sums: the naive bound lets it through
        logits, labels, mask = inputs
        ref = f64_token_logps(logits, labels, (labels != -100) & mask).sum(-1)
        error = (test_logprobs.naive_sums(*inputs).double() - ref).abs().max().item()
        assert error > 10 * test_logprobs.fwd_tol(inputs[0], 4), error

    def off_by(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(logps=out.logps + error)

    test_logprobs.check_case("reference", *inputs)  # the unshifted result passes
    monkeypatch.setattr(dpo_kernels, "sequence_logprobs", off_by)
    with pytest.raises(AssertionError, match="float32 accumulation"):
        test_logprobs.check_case("reference", *inputs)


# ---------------------------------------------------------------------------------------------
# Statistics of the fused LM head where the label is the argmax in a later vocabulary block.


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("backend", cpu_backends())
def test_linear_stats_with_labels_at_the_argmax_of_later_blocks(backend):
    g = torch.Generator(torch.get_default_device()).manual_seed(8)
    B, T, H, V = 2, 6, 8, 40  # vocabulary blocks of 16 (small_tiles): the argmax is in any block
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    z = hidden @ weight.T
    labels = z.argmax(-1)
    labels[:, ::3] = (labels[:, ::3] + 1) % V  # some labels that are not the argmax
    assert (z.argmax(-1) >= 16).any()
    out = dpo_kernels.linear_sequence_logprobs(hidden, weight, labels, stats=True, backend=backend)
    p = z.softmax(-1)
    torch.testing.assert_close(out.stats.entropy, -(p * p.log()).sum(-1), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.stats.mean_logits, z.mean(-1), rtol=0, atol=1e-10)
    assert torch.equal(out.stats.is_top1, z.argmax(-1) == labels)


@pytest.mark.parametrize("backend", cpu_backends())
def test_logits_with_a_vocabulary_stride_reach_the_kernel_as_they_are(backend):
    # tests/test_cpu_backend.py's strided case is cloned by its helper, and clone() of a
    # non-dense view is contiguous: this one passes the stride-2 view itself.
    g = torch.Generator(torch.get_default_device()).manual_seed(9)
    B, T, V = 2, 3, 37
    wide = (torch.randn(B, T, 2 * V, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    view = wide[:, :, ::2]
    assert view.stride(-1) == 2
    out = dpo_kernels.sequence_logprobs(view, labels, ref_logits=view.detach(), backend=backend)
    z64 = view.detach().double().requires_grad_()
    tok = f64_token_logps(z64, labels, torch.ones(B, T, dtype=torch.bool))
    torch.testing.assert_close(out.logps.double(), tok.sum(-1).detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(out.ref_logps.double(), tok.sum(-1).detach(), rtol=0, atol=2e-5)
    out.logps.sum().backward()
    tok.sum().backward()
    torch.testing.assert_close(wide.grad[:, :, ::2].double(), z64.grad, rtol=0, atol=1e-6)
    assert torch.all(wide.grad[:, :, 1::2] == 0)


# ---------------------------------------------------------------------------------------------
# Heads the fused path cannot read off get_output_embeddings(), found by a sweep of transformers'
# causal LMs: a prediction-head transform between the backbone and the head's Linear (BERT-style),
# a base_model_prefix naming no attribute (Llama4ForCausalLM), attention that is not causal.


def test_fused_lm_head_refuses_a_transform_before_the_head():
    # RoBERTa's lm_head is dense + gelu + layer_norm + decoder, get_output_embeddings() the
    # decoder alone: the fused head read the backbone's output straight into it.
    model = tiny_causal_lm("roberta")
    batch = collate_preferences(preference_examples(3))
    with pytest.raises(NotImplementedError, match=r"lm_head.dense.*fused_lm_head=False"):
        concatenated_forward(model, batch, fused_lm_head=True)
    assert not dpo_kernels.fused_head.fused_head_supported(model)
    plain = concatenated_forward(model.double(), batch, fused_lm_head=False)  # the fallback
    torch.testing.assert_close(plain.policy.logps.double(), model_logps_f64(model, batch))


def test_fused_lm_head_finds_the_backbone_of_llama4():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Llama4TextConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             intermediate_size=64, intermediate_size_mlp=64,
                             num_local_experts=2)  # fmt: skip
    model = T.Llama4ForCausalLM(cfg).eval().double()
    batch = collate_preferences(preference_examples(3))
    fused = concatenated_forward(model, batch, fused_lm_head=True)
    torch.testing.assert_close(fused.policy.logps.double(), model_logps_f64(model, batch))


def test_padding_free_refuses_attention_that_is_not_causal():
    # XLM's default causal=False: the probe's 2nd and 4th sequences see the same pack both ways,
    # so only a forward with a later sequence changed tells.
    batch = collate_preferences(preference_examples(3))
    with pytest.raises(ValueError, match=r"padding_free=True: XLMWithLMHeadModel.*after it"):
        concatenated_forward(tiny_causal_lm("xlm"), batch, padding_free=True)


# ---------------------------------------------------------------------------------------------
# Vision-language models, found by a sweep of transformers' image-text-to-text classes: their
# text_config's logit post-processing applies only where their own forward applies it; GIT puts
# its image positions before the text; Chameleon masks its image tokens' logits.

_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0)  # fmt: skip
_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=8, patch_size=4)  # fmt: skip


def _vlm(name: str):
    import transformers as T

    torch.manual_seed(0)
    if name == "aya-vision-cohere2":  # Cohere2's logit_scale (0.0625): Aya's forward ignores it
        cfg = T.AyaVisionConfig(
            text_config=dict(_TEXT, model_type="cohere2"), vision_config=_VISION
        )
        model = T.AyaVisionForConditionalGeneration(cfg)
    elif name == "llava-gemma2":  # a Gemma-2 text config's softcap: LLaVA's forward ignores it
        cfg = T.LlavaConfig(text_config=dict(_TEXT, model_type="gemma2"), vision_config=_VISION)
        model = T.LlavaForConditionalGeneration(cfg)
    elif name == "paligemma-softcap":  # PaliGemma's forward applies its text config's softcap
        text = dict(_TEXT, model_type="gemma2", final_logit_softcapping=3.0)
        cfg = T.PaliGemmaConfig(text_config=text, vision_config=_VISION, projection_dim=32)
        model = T.PaliGemmaForConditionalGeneration(cfg)
    elif name == "hcx-vision-granite-text":  # multiplies by logits_scaling, whatever the text
        vision = dict(model_type="qwen2_5_vl_vision", depth=1, hidden_size=16,
                      intermediate_size=32, num_heads=2, out_hidden_size=32)  # fmt: skip
        text = dict(_TEXT, model_type="granite", logits_scaling=4.0)  # (Granite's divides)
        text.pop("head_dim")
        cfg = T.HyperCLOVAXVisionV2Config(text_config=text, vision_config=vision)
        model = T.HyperCLOVAXVisionV2ForConditionalGeneration(cfg)
    model = model.eval().double()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # logits large enough for the transforms
    return model


@pytest.mark.parametrize(
    "name", ["aya-vision-cohere2", "llava-gemma2", "paligemma-softcap", "hcx-vision-granite-text"]
)
def test_vision_language_head_applies_what_its_forward_applies(name):
    model = _vlm(name)
    batch = collate_preferences(preference_examples(3))
    fused = concatenated_forward(model, batch, fused_lm_head=True)
    torch.testing.assert_close(fused.policy.logps.double(), model_logps_f64(model, batch))


def test_git_image_positions_before_the_text():
    import transformers as T

    torch.manual_seed(0)
    text = {k: v for k, v in _TEXT.items() if k not in ("head_dim", "num_key_value_heads")}
    cfg = T.GitConfig(vision_config=dict(_VISION, image_size=16, patch_size=8), **text)
    model = T.GitForCausalLM(cfg).eval().double()
    batch = collate_preferences(preference_examples(3))
    pixels = {"pixel_values": torch.randn(6, 3, 16, 16, dtype=torch.float64)}
    b = preference_batch(batch)
    with torch.no_grad():  # the model's own logits of the text positions (the last T)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, **pixels).logits
    logits = logits[:, -b.input_ids.shape[1] :]
    counted = (b.completion_mask[:, 1:] != 0) & (b.attention_mask[:, 1:] != 0)
    expect = f64_token_logps(logits[:, :-1], b.input_ids[:, 1:], counted).sum(-1)
    for fused_lm_head in (True, False):
        got = concatenated_forward(model, batch, fused_lm_head=fused_lm_head, model_kwargs=pixels)
        torch.testing.assert_close(got.policy.logps.double(), expect)


def test_chameleon_image_token_mask_is_refused():
    import transformers as T

    torch.manual_seed(0)
    vocab_map = {"<image>": 5, **{f"IMGIMG{chr(65 + i)}Z": 100 + i for i in range(10)}}
    text = {k: v for k, v in _TEXT.items() if k != "head_dim"}
    vq = dict(embed_dim=32, channel_multiplier=[1], num_res_blocks=1, base_channels=32,
              latent_channels=32, attn_resolutions=[], resolution=8)  # fmt: skip
    cfg = T.ChameleonConfig(**text, vocabulary_map=vocab_map, vq_config=vq)
    model = T.ChameleonForConditionalGeneration(cfg).eval()
    batch = collate_preferences(preference_examples(3))
    with pytest.raises(NotImplementedError, match=r"masks logits of its own.*fused_lm_head=False"):
        concatenated_forward(model, batch, fused_lm_head=True)
