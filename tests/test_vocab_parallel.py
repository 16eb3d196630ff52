"""Vocabulary-parallel log-probs over torch.distributed (gloo; 2 and 4 processes)."""

import pytest
import torch
from conftest import cpu_backends
from dist_worker import (
    anisotropic_head_case,
    linear_vocab_parallel_case,
    linear_vocab_parallel_worker,
    reduced_dh_vocab_parallel_worker,
    spawn_ranks,
    vocab_parallel_case,
    vocab_parallel_refusals_worker,
    vocab_parallel_worker,
    vocab_slices,
)

import dpo_kernels


def f64_logps(z, labels, mask):
    """Per-sequence sums of log_softmax(z)[label] in float64, written out (not the package's)."""
    counted = (labels != -100) & mask
    lp = z.double().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(counted, lp, 0.0).sum(-1)


@pytest.mark.parametrize("world", [2, 4])
def test_split_vocabulary_equals_single_process(world, tmp_path):
    backends = cpu_backends()
    spawn_ranks(vocab_parallel_worker, world, tmp_path, backends)
    logits, _, mask = vocab_parallel_case()
    slices = vocab_slices(logits.shape[-1], world)
    per_rank = [torch.load(tmp_path / f"vp_rank{r}.pt") for r in range(world)]
    labels = per_rank[0][backends[0]][2]
    for a, b in slices:  # the boundary labels are really there
        assert (labels == a).any() and (labels == b - 1).any()
    w = torch.linspace(-1, 1, labels.shape[0])
    for backend in backends:
        z = logits.clone().requires_grad_()
        full = dpo_kernels.sequence_logprobs(z, labels, mask=mask, backend=backend)
        (full.logps * w).sum().backward()
        z64 = logits.double().requires_grad_()
        expect = f64_logps(z64, labels, mask)
        (expect * w.double()).sum().backward()
        torch.testing.assert_close(full.logps.double(), expect.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(z.grad.double(), z64.grad, rtol=0, atol=1e-6)
        for r in range(world):
            logps, _grad, _ = per_rank[r][backend]
            torch.testing.assert_close(logps, full.logps.detach(), rtol=1e-6, atol=1e-5)
        grads = torch.cat([per_rank[r][backend][1] for r in range(world)], dim=-1)
        torch.testing.assert_close(grads, z.grad, rtol=1e-5, atol=1e-6, msg=backend)


@pytest.mark.parametrize("world", [2, 4])
def test_split_lm_head_equals_single_process(world, tmp_path):
    backends = cpu_backends()
    spawn_ranks(linear_vocab_parallel_worker, world, tmp_path, backends)
    hidden, weight, bias, _, mask = linear_vocab_parallel_case()
    per_rank = [torch.load(tmp_path / f"lvp_rank{r}.pt") for r in range(world)]
    for backend in backends:
        labels = per_rank[0][backend][4]
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        full = dpo_kernels.linear_sequence_logprobs(
            h, w, labels, bias=b, mask=mask, softcap=3.0, backend=backend
        )
        (full.logps * torch.tensor([0.7, -1.3], dtype=full.logps.dtype)).sum().backward()
        h64 = hidden.clone().requires_grad_()
        expect = f64_logps(3.0 * torch.tanh((h64 @ weight.T + bias) / 3.0), labels, mask)
        torch.testing.assert_close(full.logps, expect.detach(), rtol=0, atol=1e-10)
        (expect * torch.tensor([0.7, -1.3], dtype=expect.dtype)).sum().backward()
        torch.testing.assert_close(h.grad, h64.grad, rtol=0, atol=1e-10)
        for r in range(world):
            logps, dh, *_ = per_rank[r][backend]
            torch.testing.assert_close(logps, full.logps.detach(), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(dh, h.grad, rtol=1e-10, atol=1e-10, msg="hidden")
        dw = torch.cat([per_rank[r][backend][2] for r in range(world)])
        db = torch.cat([per_rank[r][backend][3] for r in range(world)])
        torch.testing.assert_close(dw, w.grad, rtol=1e-10, atol=1e-10, msg="weight")
        torch.testing.assert_close(db, b.grad, rtol=1e-10, atol=1e-10, msg="bias")


def test_refusals_reach_every_rank(tmp_path):
    """Slices that overlap or leave a gap are refused on every rank (a label owned by two ranks,
    or none, gave a wrong sum silently), and so are labels or a mask that differ between the
    ranks (the ranks' parts of two batches were added up silently); an argument one rank gets
    wrong, or an empty slice, or a mask value, makes every rank raise at once (the others
    waited in a collective until the group's timeout); dtypes, hidden sizes or logit transforms
    that differ between the ranks are refused on every rank (a dtype or a size ended the
    processes inside gloo, a transform gave wrong log-probs silently); a rank outside the group
    is told so; a double backward raises the package's error (it gave wrong second derivatives
    or a torch error deep inside)."""
    import json

    spawn_ranks(vocab_parallel_refusals_worker, 2, tmp_path)
    runs = [json.load(open(tmp_path / f"vpr_rank{r}.json")) for r in range(2)]
    for r, res in enumerate(runs):
        for case in ("overlap", "gap"):
            assert res[case][0] == "ValueError" and "must tile [0, V)" in res[case][1], (r, res)
        for case in (
            "one_rank_other_labels",
            "one_rank_other_labels_linear",
            "one_rank_other_mask",
        ):
            kind, message = res[case]
            assert kind == "ValueError" and "ranks passed different labels" in message, (r, case)
        for case in ("double_backward_logits", "double_backward_linear"):
            kind, message = res[case]
            assert kind == "RuntimeError" and "double backward" in message, (r, case, message)
    for r, res in enumerate(runs):
        for case in ("one_rank_other_dtype", "one_rank_other_softcap_linear",
                     "one_rank_other_hidden_size"):  # fmt: skip
            kind, message = res[case]
            assert kind == "ValueError" and "ranks passed different" in message, (r, case)
    assert "must hold only 0 and 1" in runs[0]["one_rank_bad_mask_value"][1]
    assert "another rank refused its inputs" in runs[1]["one_rank_bad_mask_value"][1]
    assert runs[0]["not_a_member"] is None  # a group of rank 0 alone: its own vocabulary
    assert "not a member of the group" in runs[1]["not_a_member"][1]
    assert "vocab_start must be a non-negative int" in runs[1]["one_rank_bad_start"][1]
    assert "another rank refused its inputs" in runs[0]["one_rank_bad_start"][1]
    assert "empty vocabulary" in runs[1]["one_rank_empty_slice"][1]
    assert "another rank refused its inputs" in runs[0]["one_rank_empty_slice"][1]


def test_reduced_hidden_gradient_added_in_float32(tmp_path):
    """bf16 / fp16: the ranks' partial hidden gradients (large and mostly cancelling where the
    head's rows share a direction) are added in float32 and rounded once: as close to float64
    as the single-process op's (added in bf16, the error was ~100x it: a fifth of max |dh|)."""
    backends = cpu_backends()
    spawn_ranks(reduced_dh_vocab_parallel_worker, 2, tmp_path, backends)
    hidden, weight, labels = anisotropic_head_case()
    per_rank = [torch.load(tmp_path / f"rdh_rank{r}.pt") for r in range(2)]
    for backend in backends:
        for dtype in (torch.bfloat16, torch.float16):
            h64 = hidden.to(dtype).double().requires_grad_()
            z = h64 @ weight.to(dtype).double().T
            z.log_softmax(-1).gather(-1, labels[..., None]).sum().backward()
            hs = hidden.to(dtype).requires_grad_()
            out = dpo_kernels.linear_sequence_logprobs(
                hs, weight.to(dtype), labels, backend=backend
            )
            out.logps.sum().backward()
            single = (hs.grad.double() - h64.grad).abs().max().item()
            for r in range(2):
                err = (per_rank[r][backend, str(dtype)].double() - h64.grad).abs().max().item()
                assert err <= 2 * single + 1e-6, (backend, dtype, r, err, single)


def test_compute_dtype_rounds_the_inputs_not_the_gradients(tmp_path):
    """compute_dtype=bf16 on a float32 head split over 2 ranks: the matmuls take the inputs
    rounded to bf16 (cast inside the op, forward and backward), and the gradients of hidden (all
    ranks' parts added up), of each rank's rows and bias come back in float32, as float64 gives
    them on the rounded inputs."""
    backends = cpu_backends()
    spawn_ranks(linear_vocab_parallel_worker, 2, tmp_path, backends, torch.bfloat16)
    hidden, weight, bias, _, mask = linear_vocab_parallel_case()
    per_rank = [torch.load(tmp_path / f"cdt_rank{r}.pt") for r in range(2)]
    for backend in backends:
        labels = per_rank[0][backend][4]
        h, w, b = (t.float().to(torch.bfloat16).double().requires_grad_()
                   for t in (hidden, weight, bias))  # fmt: skip
        x = h @ w.T + b
        want = f64_logps(3.0 * torch.tanh(x / 3.0), labels, mask)
        (want * torch.tensor([0.7, -1.3]).double()).sum().backward()
        for r in range(2):
            torch.testing.assert_close(per_rank[r][backend][0].double(), want.detach(),
                                       rtol=0, atol=1e-5)  # fmt: skip
            assert per_rank[r][backend][1].dtype == torch.float32
            torch.testing.assert_close(per_rank[r][backend][1].double(), h.grad, rtol=0,
                                       atol=1e-5 * h.grad.abs().max().item())  # fmt: skip
        for i, want in ((2, w.grad), (3, b.grad)):
            got = torch.cat([per_rank[r][backend][i] for r in range(2)])
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=0,
                                       atol=1e-5 * want.abs().max().item())  # fmt: skip


def test_labels_digest_tells_batches_apart():
    """The digest the ranks compare: the same for the same counted tokens (int32 or int64
    labels, no mask or an all-ones one, other labels where nothing counts), different for
    differences a linear digest missed (labels +1, -2, +1 in a row; two rows swapped whose
    label sums are equal) and for one changed label or one more counted token."""
    from dpo_kernels.vocab_parallel import _labels_digest

    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    y = torch.randint(0, 50, (4, 9), generator=g)
    y[3] = y[2].roll(1)  # rows 2 and 3: equal sums
    y[0, 0] = -100
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 8] = False
    base = _labels_digest(y, mask, -100)
    same = y.int().clone()
    same[1, 8] = 7  # not counted
    assert _labels_digest(same, mask, -100) == base
    assert _labels_digest(y, None, -100) == _labels_digest(y, torch.ones_like(mask), -100)
    steps = y.clone()
    steps[1, 2:5] += torch.tensor([1, -2, 1])
    more = mask.clone()
    more[1, 8] = True
    one = y.clone()
    one[2, 4] += 1
    for other, m in ((steps, mask), (y[[0, 1, 3, 2]], mask), (one, mask), (y, more)):
        assert _labels_digest(other, m, -100) != base
    # Vocabularies past 2^21 ids: (position p, label l + 2^21) is not (p + 1, l).
    big = torch.tensor([[2**21 + 7, 3]])
    shifted = torch.tensor([[2**21 + 3, 7]])
    assert _labels_digest(big, None, -100) != _labels_digest(shifted, None, -100)
