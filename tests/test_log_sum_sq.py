"""The log_sum_sq token statistic (log sum_v p_v^2, for WPO weights) on every CPU-runnable backend,
logits path and fused LM head, against a float64 formula written here."""

import math

import pytest
import torch
from conftest import cpu_backends
from test_linear_logprobs import small_tiles  # noqa: F401  (fixture)

import dpo_kernels


def log_sum_sq64(z: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 in float64 from its definition: p = softmax(z)."""
    p = torch.softmax(z.double(), dim=-1)
    return torch.log((p * p).sum(-1))


def extreme_logits(V: int, dtype: torch.dtype) -> torch.Tensor:
    """[4, 3, V] rows: ordinary, huge magnitudes, one dominant entry, all equal, partly -inf."""
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    z = torch.randn(4, 3, V, generator=g, dtype=torch.float64) * 3
    z[1] *= 3e3  # |z| ~ 1e4: exp overflows without the running max
    z[2, 0] = 0.0
    z[2, 0, V - 1] = 1e4  # p = one-hot at the last entry: log sum p^2 = 0
    z[2, 1] = 7.5  # uniform: -log V
    z[2, 2, : V // 2] = float("-inf")  # half the vocabulary impossible
    z[3, :, 1] = z[3].max() + 40  # dominant entry in the first block, the rest ~e-40
    return z.to(dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("V", [37, 4096 + 300], ids=["V37", "V4396-multiblock"])
def test_logits_path_log_sum_sq(backend, dtype, V):
    z = extreme_logits(V, dtype)
    labels = torch.full(z.shape[:2], V - 1)
    labels[0, 1] = -100  # not counted: 0
    out = dpo_kernels.sequence_logprobs(z, labels, stats=True, backend=backend)
    expect = log_sum_sq64(z)
    expect[0, 1] = 0.0
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    got = out.stats.log_sum_sq
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), expect, rtol=tol, atol=tol)
    assert abs(got[2, 0].item()) < tol  # one-hot: log 1
    assert got[2, 1].item() == pytest.approx(-math.log(V), abs=tol)  # uniform: log(1 / V)
    assert not got.requires_grad


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_fused_lm_head_log_sum_sq(small_tiles, backend, dtype, softcap):  # noqa: F811
    # Tiles of 3 tokens x 16 vocabulary entries: the statistic is folded across blocks and tiles.
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    B, T, H, V = 2, 5, 8, 40
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    hidden[0, 0] *= 300  # extreme logits: |z| in the thousands (or at the softcap)
    hidden[1, 2] = weight[33] * 40  # one dominant entry, in the third vocabulary block
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    kw = dict(logit_scale=0.8, temperature=0.7, softcap=softcap)
    out = dpo_kernels.linear_sequence_logprobs(
        hidden.to(dtype), weight.to(dtype), labels, bias=bias.to(dtype), mask=mask, stats=True,
        backend=backend, **kw,
    )  # fmt: skip
    x = hidden @ weight.T + bias
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    expect = torch.where(mask, log_sum_sq64(x * 0.8 / 0.7), 0.0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.stats.log_sum_sq.double(), expect, rtol=tol, atol=tol)
