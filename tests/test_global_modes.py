"""The ops under global torch modes a user may have on: anomaly detection, the default dtype,
meta and fake tensors."""

import pytest
import torch
from conftest import cpu_backends

import dpo_kernels as dk


def _linear_batch(dtype=torch.float32, rows=4, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    hidden = torch.randn(rows, 5, 8, generator=g, dtype=dtype)
    weight = torch.randn(11, 8, generator=g, dtype=dtype)
    labels = torch.randint(0, 11, (rows, 5), generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("backend", cpu_backends())
def test_linear_orpo_under_detect_anomaly(backend):
    """The validation dry run took average log-probs of 0 (infinite odds): a NaN that the
    reference backend's autograd reported as an anomaly on healthy inputs."""
    hidden, weight, labels = _linear_batch()
    hidden.requires_grad_()
    plain = dk.linear_orpo_loss(hidden, weight, labels, backend=backend).loss
    with torch.autograd.detect_anomaly():
        loss = dk.linear_orpo_loss(hidden, weight, labels, backend=backend).loss
        loss.backward()
    assert torch.equal(loss, plain)


@pytest.mark.parametrize("backend", cpu_backends())
def test_kto_kl_number_is_not_rounded_to_the_default_dtype(backend):
    """A Python-float kl was made a tensor at torch's default dtype (float32) before the float64
    loss used it: the kl metric 0.30000001192092896 and the loss off by 9e-9."""
    ref = torch.tensor([-20.0, -18.0, -25.0, -19.5], dtype=torch.float64)
    logps = ref + torch.tensor([0.25, 0.6, 0.1, 0.9], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    out = dk.kto_loss(logps, ref, desirable, kl=0.3, beta=10.0, backend=backend)
    assert out.metrics["kl"].dtype == torch.float64 and out.metrics["kl"].item() == 0.3
    x = logps - ref
    d, u = 1 - torch.sigmoid(10 * (x - 0.3)), 1 - torch.sigmoid(10 * (0.3 - x))
    torch.testing.assert_close(out.loss, torch.where(desirable, d, u).mean(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", cpu_backends())
def test_linear_kto_float64_kl_tensor_kept_in_float64(backend):
    """linear_kto_loss took its kl from a dry run on float32 zeros: a float64 kl was rounded."""
    hidden, weight, labels = _linear_batch(torch.float64)
    ref = torch.tensor([-20.0, -18.0, -25.0, -19.5], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    kl = torch.tensor(0.1 + 1e-9, dtype=torch.float64)
    out = dk.linear_kto_loss(hidden, weight, labels, ref, desirable, kl=kl, backend=backend)
    assert out.metrics["kl"].item() == kl.item()
    lp = dk.linear_sequence_logprobs(hidden, weight, labels, backend=backend).logps
    want = dk.kto_loss(lp, ref, desirable, kl=kl, backend=backend).loss
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-14)


def _kto(h, w, lab, dev):
    desirable = torch.tensor([True, False, True, False], device=dev)
    return dk.kto_loss(h[:, 0, 0], h[:, 0, 1], desirable, kl=0.1)


def _linear_kto(h, w, lab, dev):
    return dk.linear_kto_loss(
        h, w, lab, h[:, 0, 0], torch.tensor([True, False, True, False], device=dev), kl=0.1
    )


REFUSED = {
    "kto_loss": _kto,
    "linear_cpo_loss": lambda h, w, lab, dev: dk.linear_cpo_loss(h, w, lab),
    "linear_orpo_loss": lambda h, w, lab, dev: dk.linear_orpo_loss(h, w, lab),
    "linear_pair_loss": lambda h, w, lab, dev: dk.linear_pair_loss(
        h, w, lab, lambda pc, pr, nc, nr: pr - pc
    ),
    "linear_kto_loss": _linear_kto,
}


@pytest.mark.parametrize("kind", ["meta", "fake"])
@pytest.mark.parametrize("op", list(REFUSED))
def test_meta_and_fake_tensors_refused_by_name(op, kind):
    """The paths that read values on the host raise an error naming the package on meta and fake
    tensors (before: torch's "Cannot copy out of meta tensor; no data!" or a
    DataDependentOutputException from inside the chunk planner or the KTO metrics)."""
    if kind == "meta":
        h, w, lab = (t.to("meta") for t in _linear_batch())
        with pytest.raises(NotImplementedError, match=r"dpo_kernels: .*meta and fake tensors"):
            REFUSED[op](h, w, lab, "meta")
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            h, w, lab = _linear_batch()
            with pytest.raises(NotImplementedError, match=r"dpo_kernels: .*meta and fake tensors"):
                REFUSED[op](h, w, lab, h.device)


def test_vocab_group_meta_labels_refused_by_name():
    from dpo_kernels.vocab_parallel import check_global_values

    labels = torch.zeros(2, 3, dtype=torch.long, device="meta")
    with pytest.raises(NotImplementedError, match="dpo_kernels: vocab_group"):
        check_global_values(labels, None, -100, 11, 0, None, {})
