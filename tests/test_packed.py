"""Padding-free packed sequences: the op's cu_seqlens layout and the packed concatenated forward."""

import pytest
import torch
from conftest import (
    TEST_DEVICE,
    cpu_backends,
    data_check,
    preference_examples,
    prompt_tuned_lm,
    tiny_causal_lm,
)

import dpo_kernels
from dpo_kernels.batches import collate_preferences, pack, preference_batch
from dpo_kernels.forward import concatenated_forward
from dpo_kernels.ops import reference


def packed_case(lengths, V=50, dtype=torch.float32, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    N = sum(lengths)
    logits = (torch.randn(N, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    mask = torch.rand(N, generator=g) < 0.8
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return logits, labels, mask, cu


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sums_equal_per_sequence_sums(backend, dtype):
    lengths = [5, 1, 0, 9, 3]  # an empty sequence too
    logits, labels, mask, cu = packed_case(lengths, dtype=dtype)
    z = logits.clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, mask=mask, cu_seqlens=cu, backend=backend)
    assert out.logps.shape == (len(lengths),) and out.token_logps.shape == (sum(lengths),)
    z64 = logits.double().requires_grad_()
    expect, counts = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        s, c = reference.sequence_logprobs(z64[a:b][None], labels[a:b][None], mask[a:b][None])
        expect.append(s[0])
        counts.append(c[0])
    expect = torch.stack(expect)
    assert out.counts.tolist() == torch.stack(counts).tolist()
    torch.testing.assert_close(out.logps.double(), expect.detach(), rtol=1e-5, atol=1e-4)
    w = torch.randn(len(lengths), dtype=torch.float64)
    (out.logps * w.float()).sum().backward()
    (expect * w).sum().backward()
    atol = (1e-6 if dtype == torch.float32 else 2**-7) * w.abs().max().item()  # one rounding
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=0, atol=atol)


def test_packed_gradcheck():
    logits, labels, mask, cu = packed_case([3, 4, 2], V=6, dtype=torch.float64)
    z = logits.clone().requires_grad_()
    f = lambda x: dpo_kernels.sequence_logprobs(x, labels, mask=mask, cu_seqlens=cu).logps  # noqa: E731
    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", cpu_backends())
def test_packed_under_torch_compile_fullgraph(backend):
    """Packed sequences traced whole by torch.compile(fullgraph=True): cu_seqlens is checked by
    an assert on the device, not read on the host (that read broke the graph); sums and
    gradients as eager, a bad cu_seqlens still stops the compiled call, and meta inputs give
    the output shape (backends that take them)."""
    logits, labels, mask, cu = packed_case([3, 4, 2])

    def f(z, y, m, cu):
        return dpo_kernels.sequence_logprobs(z, y, mask=m, cu_seqlens=cu, backend=backend).logps

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    z1, z2 = (logits.clone().requires_grad_() for _ in range(2))
    eager, comp = f(z1, labels, mask, cu), compiled(z2, labels, mask, cu)
    w = torch.randn(3)
    (eager * w).sum().backward()
    (comp * w).sum().backward()
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z2.grad, z1.grad, rtol=1e-6, atol=1e-7)
    if TEST_DEVICE == "cpu":  # (on CUDA a device-side assert: test_cuda_ready's child processes)
        with pytest.raises(RuntimeError, match="cu_seqlens must rise"):
            compiled(logits, labels, mask, torch.tensor([0, 5, 4, 9], dtype=torch.int32))
    # (the C++ backend refuses meta tensors by name; Triton's without the interpreter, on a GPU)
    if backend == "reference" or (backend == "triton" and TEST_DEVICE == "cpu"):
        meta = f(*(t.to("meta") for t in (logits, labels, mask, cu)))
        assert meta.shape == (3,) and meta.device.type == "meta"


@pytest.mark.parametrize(
    "cu,match",
    [
        pytest.param(
            torch.tensor([0, 3, 2, 9]),
            r"cu_seqlens\[2\] = 2 < cu_seqlens\[1\] = 3",
            marks=data_check,
        ),
        pytest.param(torch.tensor([1, 9]), r"cu_seqlens\[0\] = 1, must be 0", marks=data_check),
        pytest.param(torch.tensor([0, 8]), r"cu_seqlens\[1\] = 8, must be 9", marks=data_check),
        (torch.tensor([[0, 9]]), "must be 1-D"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    logits, labels, _mask, _ = packed_case([4, 5])
    with pytest.raises(ValueError, match=match):
        dpo_kernels.sequence_logprobs(logits, labels, cu_seqlens=cu)


def test_packed_needs_a_flat_layout():
    with pytest.raises(ValueError, match="logits must be packed"):
        dpo_kernels.sequence_logprobs(
            torch.randn(2, 3, 5),
            torch.zeros(2, 3, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 3]),
        )


def test_pack_drops_padding_and_never_crosses_sequences():
    b = preference_batch(collate_preferences(preference_examples(3)))
    p = pack(b)
    assert p.input_ids.shape[1] == int(b.attention_mask.sum())
    ends = p.cu_seqlens[1:].long() - 1
    assert torch.all(p.labels[ends] == -100) and not p.mask[ends].any()
    assert torch.all(p.position_ids[0, p.cu_seqlens[:-1].long()] == 0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padding_free_forward_equals_padded(kind):
    model, ref_model = tiny_causal_lm(kind), tiny_causal_lm(kind, seed=1)
    batch = collate_preferences(preference_examples(4))
    padded = concatenated_forward(model, batch, ref_model=ref_model)
    packed = concatenated_forward(model, batch, ref_model=ref_model, padding_free=True)
    torch.testing.assert_close(packed.policy.logps, padded.policy.logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        packed.ref_chosen_logps, padded.ref_chosen_logps, rtol=1e-5, atol=1e-4
    )
    assert packed.policy.counts.tolist() == padded.policy.counts.tolist()
    g1 = torch.autograd.grad(padded.policy.logps.sum(), list(model.parameters()))
    g2 = torch.autograd.grad(packed.policy.logps.sum(), list(model.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_packing_without_restarting_positions_would_differ():
    # The control that shows the comparison above can fail: one long sequence attends across rows.
    model = tiny_causal_lm()
    b = preference_batch(collate_preferences(preference_examples(4)))
    p = pack(b)
    wrong = model(input_ids=p.input_ids, use_cache=False).logits[0]
    right = model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits[0]
    assert (wrong - right).abs().max() > 1e-3


# Whether transformers keeps packed sequences apart: OPT takes its positions from the attention
# mask, Bloom and MPT (ALiBi) take no position_ids.
PACKS = {"qwen2": True, "gpt_neox": True, "opt": False, "bloom": False, "mpt": False}


@pytest.mark.parametrize("family", PACKS)
def test_padding_free_refuses_a_model_whose_attention_crosses_sequences(family):
    from dpo_kernels import forward

    packs = PACKS[family]
    model = tiny_causal_lm(family, attn="eager")
    batch = collate_preferences(preference_examples(3))
    padded = forward.batch_logprobs(model.eval(), batch).logps
    model.train()
    frozen = next(m for m in model.modules() if len(list(m.children())) == 0)
    frozen.eval()  # a part the caller keeps in eval mode stays there
    if packs:
        forward.check_packing(model, pack(preference_batch(batch)).input_ids)
        # the check ran in eval mode and restored each module's mode
        assert model.training and not frozen.training
        packed = forward.batch_logprobs(model.eval(), batch, padding_free=True).logps
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)
        return
    with pytest.raises(ValueError, match=rf"padding_free=True: {type(model).__name__}.*attend"):
        forward.batch_logprobs(model, batch, padding_free=True)
    assert model.training and not frozen.training
    # The refusal is right: let the model through, and its packed log-probs are wrong.
    forward._PACKING_CHECKED.add(model)
    packed = forward.batch_logprobs(model.eval(), batch, padding_free=True).logps
    assert (packed - padded).abs().max() > 1e-3


@pytest.mark.parametrize("option", ["padding_free", "fused_lm_head"])
def test_prompt_learning_peft_is_refused_packed_or_fused(option):
    """Its virtual tokens would be seen by the first packed sequence only, and the fused head's
    hidden states would not line up with the labels."""
    model = prompt_tuned_lm()
    batch = collate_preferences(preference_examples(2))
    with pytest.raises(ValueError, match=rf"{option}=True with a prompt-learning PEFT.*{option}=F"):
        concatenated_forward(model, batch, **{option: True})


def test_packing_probe_reads_every_expert_count():
    # The packing check's second forward (a later sequence changed) is skipped for mixtures of
    # experts, whose expert groupings, and so last bits, may change with the other tokens: the
    # count is read under each family's name.
    import transformers as T

    from dpo_kernels.forward import _experts

    cases = [
        (T.LlamaConfig(), 0),
        (T.GPT2Config(), 0),
        (T.MixtralConfig(num_local_experts=4), 4),
        (T.Qwen3MoeConfig(num_experts=6), 6),
        (T.DeepseekV3Config(n_routed_experts=5), 5),
        (T.Ernie4_5_MoeConfig(moe_num_experts=3), 3),
        (T.DbrxConfig(ffn_config={"moe_num_experts": 7}), 7),
    ]
    for cfg, n in cases:
        assert _experts(cfg) == n, type(cfg).__name__
