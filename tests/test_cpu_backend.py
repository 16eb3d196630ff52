"""The C++ CPU backend: it is what CPU tensors run, odd shapes, threads, determinism, no-build."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import record_calls
from test_logprobs import check_case, make_inputs

import dpo_kernels
from dpo_kernels.ops import cpu as cpu_ops
from dpo_kernels.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def test_extension_is_built_and_is_what_cpu_tensors_run(monkeypatch):
    assert dpo_kernels.cpu_extension_available(), "the C++ extension did not build or load"
    cap = torch.backends.cpu.get_cpu_capability().upper()
    expect = (
        "avx512" if cap.startswith("AVX512") else "avx2" if cap.startswith("AVX2") else "default"
    )
    assert cpu_ops.VARIANT == expect
    assert torch.ops.dpo_kernels_cpu.build_info() == expect.upper()
    monkeypatch.delenv("DPO_KERNELS_BACKEND", raising=False)
    assert dpo_kernels.resolve_backend(None, torch.device("cpu")) == "cpu"
    calls = record_calls(monkeypatch, cpu_ops, "logprobs_forward", "logprobs_backward")
    logits, labels, mask = make_inputs(2, 3, 40, torch.float32)
    z = logits.clone().requires_grad_()
    dpo_kernels.sequence_logprobs(z, labels, mask=mask).logps.sum().backward()
    assert calls == ["logprobs_forward", "logprobs_backward"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(2, 3, 1), (2, 3, 3), (3, 2, 17), (2, 1, 33), (1, 2, 4096 * 2 + 31)]
)
def test_odd_shapes(dtype, shape):
    # V=1 and V=3 are all tail; 17 and 33 straddle every vector width; 8223 spans two chunks.
    check_case("cpu", *make_inputs(*shape, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_logits_and_labels(dtype):
    logits, labels, mask = make_inputs(4, 6, 300, dtype)
    wide = torch.randn(4, 6, 2 * 300).to(dtype)
    strided_vocab = wide[:, :, ::2]  # vocab stride 2: copied internally, still right
    strided_vocab.copy_(logits)
    check_case("cpu", strided_vocab, labels.t().contiguous().t(), mask.t().contiguous().t())
    check_case("cpu", logits.transpose(0, 1).contiguous().transpose(0, 1), labels, mask)


def _run(logits, labels, mask):
    z = logits.clone().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, mask=mask, backend="cpu")
    (out.logps.sum() + out.token_logps.square().sum()).backward()
    return out.logps.detach(), out.token_logps.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_across_runs_and_thread_counts(dtype):
    logits, labels, mask = make_inputs(6, 40, 5000, dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = _run(logits, labels, mask)
        b = _run(logits, labels, mask)
        torch.set_num_threads(1)
        c = _run(logits, labels, mask)
    finally:
        torch.set_num_threads(before)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y), "repeated runs differ"
        assert torch.equal(x, z), "1 and 2 threads differ"


def test_package_works_without_a_compiler(tmp_path):
    # An empty cache and no compiler: one warning that names the cause and the fix, the reference
    # path for CPU tensors, and a clear error for backend='cpu'.
    code = (
        "import warnings\n"
        "import torch, dpo_kernels\n"
        "z = torch.randn(2, 3, 11)\n"
        "y = torch.randint(0, 11, (2, 3))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = dpo_kernels.sequence_logprobs(z, y)\n"
        "    dpo_kernels.sequence_logprobs(z, y)\n"
        "    msgs = [str(x.message) for x in w if 'C++ CPU kernels' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert not dpo_kernels.cpu_extension_available()\n"
        "assert dpo_kernels.resolve_backend(None, torch.device('cpu')) == 'reference'\n"
        "ref = z.double().log_softmax(-1).gather(-1, y[..., None])[..., 0].sum(-1)\n"
        "torch.testing.assert_close(out.logps, ref.float())  # float32 output: float32 tolerance\n"
        "try:\n"
        "    dpo_kernels.sequence_logprobs(z, y, backend='cpu')\n"
        "    raise SystemExit('no error')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
        "print(msgs[0])\n"
    )
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-c++"),
        "DPO_KERNELS_CACHE_DIR": str(tmp_path / "cache"),
    }
    env.pop("DPO_KERNELS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error, warning = proc.stdout.strip().splitlines()
    for msg in (error, warning):
        assert "no C++ compiler" in msg and "dpo-kernels build" in msg, msg
    assert "backend='cpu'" in error
    assert "compiling" not in proc.stderr


def test_bf16_sums_within_1e3_relative_on_long_sequences():
    # The accuracy bar at a realistic length: 512 counted tokens per sequence.
    logits = (torch.randn(4, 512, 2000) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 2000, (4, 512))
    out = dpo_kernels.sequence_logprobs(logits, labels, backend="cpu")
    ref, _ = reference.sequence_logprobs(logits.double(), labels)
    assert ((out.logps.double() - ref).abs() / ref.abs()).max() < 1e-3


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "n, H, V",
    # Blocks of 1 MiB of w, so 4096 / 32 / 64 / 1024 rows of w (fp32) at these H: the whole
    # vocabulary in one block; 4 blocks, the last one short; one block shorter than a block; V =
    # 1; no tokens.
    [(5, 64, 3000), (3, 8192, 100), (7, 4096, 17), (4, 256, 1), (0, 64, 40)],
)
def test_vocab_blocked_mm(dtype, n, H, V, threads):
    # The linear losses' projection (csrc/vocab_blocked_mm.cpp) against float64 and torch.mm,
    # into a column slice of a wider buffer (the bf16 route's per-block upcast writes there).
    g = torch.Generator().manual_seed(n * V + H)
    h = torch.randn(n, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    wide = torch.full((n, V + 9), 7.0, dtype=dtype)
    out = wide[:, 4 : 4 + V]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        torch.ops.dpo_kernels_cpu.vocab_blocked_mm(out, h.to(dtype), w.to(dtype))
    finally:
        torch.set_num_threads(before)
    # The worst-case rounding of a length-H dot product, whatever the summation order.
    bound = H * torch.finfo(dtype).eps * (h.abs() @ w.abs().T)
    assert ((out.double() - h @ w.T).abs() <= bound).all()
    torch.testing.assert_close(out, h.to(dtype) @ w.to(dtype).T)
    assert (wide[:, :4] == 7).all() and (wide[:, 4 + V :] == 7).all(), "wrote outside out"


def _zeros(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "args, match",
    [
        ((_zeros(3, 5), _zeros(3, 8), _zeros(5, 7)), "shapes do not match"),
        ((_zeros(3, 4), _zeros(3, 8), _zeros(5, 8)), "shapes do not match"),
        ((_zeros(3, 5), _zeros(3, 8), _zeros(5, 8, 1)), "must be matrices"),
        ((_zeros(3, 5, dtype=torch.float64), _zeros(3, 8), _zeros(5, 8)), "one dtype"),
        (tuple(_zeros(*s, dtype=torch.float16) for s in ((3, 5), (3, 8), (5, 8))), "float32 or"),
        ((_zeros(5, 3).T, _zeros(3, 8), _zeros(5, 8)), "unit stride"),
    ],
    ids=["H", "V", "rank", "dtype mix", "fp16", "out strides"],
)
def test_vocab_blocked_mm_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dpo_kernels_cpu.vocab_blocked_mm(*args)


def test_backend_env_variable(monkeypatch):
    """DPO_KERNELS_BACKEND picks the backend when none is passed; a value passed overrides it; a
    bad value in it is named as coming from it."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("DPO_KERNELS_BACKEND", "reference")
    assert dpo_kernels.resolve_backend(None, cpu) == "reference"
    assert dpo_kernels.resolve_backend("cpu", cpu) == "cpu"
    monkeypatch.setenv("DPO_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"'bogus' .*DPO_KERNELS_BACKEND"):
        dpo_kernels.resolve_backend(None, cpu)
    with pytest.raises(ValueError, match=r"got 'fast'$"):
        dpo_kernels.resolve_backend("fast", cpu)
