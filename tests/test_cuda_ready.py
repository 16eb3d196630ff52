"""What the first GPU would hit, checked without one: device guards, the out-dtype matmul, sync-free
checks and mode, 16-byte alignment of any row. The tests marked `cuda` / `two_gpus` run only where
those devices exist (scripts/gpu.sh)."""

import contextlib
import types

import pytest
import torch
from conftest import (
    GRAD_TOL,
    HAS_TRITON,
    TEST_DEVICE,
    assert_no_worse_than_naive,
    data_check,
    poison_empty,
)

import dpo_kernels
from dpo_kernels import backend as dispatch
from dpo_kernels.ops import reference

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

CUDA = torch.cuda.is_available()
TWO_GPUS = CUDA and torch.cuda.device_count() >= 2


def _triton_modules():
    from dpo_kernels.ops import triton_dpo_loss, triton_linear_logprobs, triton_logprobs

    return triton_logprobs, triton_linear_logprobs, triton_dpo_loss


# ------------------------------------------------------------------------------------------
# 1. Device guard: every launch (and the linear path's matmuls) runs with the tensors' device
# current, so Triton and cuBLAS use that device and its current stream.


def test_device_guard_asks_for_the_tensors_device(monkeypatch):
    K, _, _ = _triton_modules()
    asked = []

    class FakeDevice(contextlib.nullcontext):
        def __init__(self, device):
            super().__init__()
            asked.append(device)

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with K.device_guard(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert asked == [torch.device("cuda", 1)]
    with K.device_guard(torch.zeros(1, device="cpu")):  # CPU tensors: no CUDA call at all
        pass
    assert asked == [torch.device("cuda", 1)]


class _Guard:
    """Stands in for device_guard; records the device and whether a guard is open."""

    def __init__(self):
        self.devices, self.depth = [], 0

    def __call__(self, t):
        self.devices.append(t.device)

        @contextlib.contextmanager
        def guard():
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1

        return guard()


class _Launch:
    """Stands in for a JITFunction: asserts that it is launched inside a guard."""

    def __init__(self, guard, name, launched):
        self.guard, self.name, self.launched = guard, name, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            assert self.guard.depth > 0, f"{self.name} launched outside a device guard"
            self.launched.append(self.name)

        return launch


def test_every_launch_and_matmul_runs_inside_a_device_guard(monkeypatch):
    from dpo_kernels.gpu_check import cases
    from dpo_kernels.ops import triton_sibling_losses

    guard, launched = _Guard(), []
    for module in (*_triton_modules(), triton_sibling_losses):
        monkeypatch.setattr(module, "device_guard", guard)
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Launch(guard, name, launched))
    _, L, _ = _triton_modules()
    tiles = L._projected_tiles

    def guarded_tiles(*args):  # the cuBLAS tiles: inside the same guard as the kernels
        for item in tiles(*args):
            assert guard.depth > 0, "a projection tile computed outside the device guard"
            yield item

    monkeypatch.setattr(L, "_projected_tiles", guarded_tiles)
    seen = set()
    for name, run, _, _ in cases():
        op = name.split()[0]
        if op in seen:  # one case of each launcher is enough here
            continue
        seen.add(op)
        run()
    assert {"_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_dpo_loss_kernel",
            "_sibling_loss_kernel", "_linear_fwd_kernel",
            "_linear_bwd_kernel"} <= set(launched)  # fmt: skip
    assert guard.devices and all(d.type == TEST_DEVICE for d in guard.devices)


@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    logits = torch.randn(2, 7, 32001, device=dev, requires_grad=True)
    labels = torch.randint(0, 32001, (2, 7), device=dev)
    out = dpo_kernels.sequence_logprobs(logits, labels, stats=True, backend="triton")
    out.logps.sum().backward()
    expect = reference.sequence_logprobs(logits.detach().double().cpu(), labels.cpu())[0]
    torch.testing.assert_close(out.logps.cpu().double(), expect, rtol=1e-5, atol=1e-4)
    assert logits.grad.device == dev
    hidden = torch.randn(2, 7, 64, device=dev, requires_grad=True)
    weight = torch.randn(5000, 64, device=dev, requires_grad=True)
    lin = dpo_kernels.linear_sequence_logprobs(hidden, weight, labels % 5000, backend="triton")
    lin.logps.sum().backward()
    expect = reference.sequence_logprobs((hidden @ weight.T).detach().double().cpu(),
                                         (labels % 5000).cpu())[0]  # fmt: skip
    torch.testing.assert_close(lin.logps.cpu().double(), expect, rtol=1e-5, atol=1e-3)
    assert hidden.grad.device == dev and weight.grad.device == dev
    assert torch.cuda.current_device() == 0


# ------------------------------------------------------------------------------------------
# 2. The out-dtype matmul (CUDA only) reached on meta tensors.


def _meta_operands():
    acc = torch.empty(8, 4, device="meta")
    a = torch.empty(8, 16, dtype=torch.bfloat16, device="meta")
    b = torch.empty(16, 4, dtype=torch.bfloat16, device="meta")
    return acc, a, b


def _spy(monkeypatch, calls, *names):
    for name in names:
        real = getattr(torch, name)

        def matmul(*args, real=real, name=name, **kwargs):
            calls.append((name, kwargs.get("out_dtype")))
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, name, matmul)


def test_out_dtype_matmul_path_on_meta_tensors(monkeypatch):
    _, L, _ = _triton_modules()
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    monkeypatch.setattr(L, "_OUT_DTYPE_MM", None)
    monkeypatch.setattr(L, "_ACC_BY_ADD", False)
    assert L.has_out_dtype_mm() == ((major, minor) >= (2, 8))
    calls = []
    _spy(monkeypatch, calls, "addmm", "mm", "baddbmm")
    acc, a, b = _meta_operands()
    L.addmm_acc(acc, a, b, fresh=True)  # written over: the plain out-dtype product
    assert acc.dtype == torch.float32 and acc.shape == (8, 4)
    if L.has_out_dtype_mm():
        assert calls == [("mm", torch.float32)]
        calls.clear()
        # Added to: the batched form, which adds into its float32 out (CUDA's addmm wants its
        # `self` in the inputs' dtype); meta's may reject it: then the product and an add.
        L.addmm_acc(acc, a, b)
        assert calls[0] == ("baddbmm", torch.float32)
        assert ("addmm", torch.float32) not in calls


def test_out_dtype_matmul_falls_back_when_rejected(monkeypatch):
    _, L, _ = _triton_modules()
    monkeypatch.setattr(L, "_OUT_DTYPE_MM", True)
    monkeypatch.setattr(L, "_ACC_BY_ADD", False)

    def rejecting(name):
        real = getattr(torch, name)

        def matmul(*args, **kwargs):
            if "out_dtype" in kwargs:
                raise RuntimeError("out_dtype float32 is not supported for BFloat16 inputs")
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, name, matmul)

    calls = []
    _spy(monkeypatch, calls, "mm")
    rejecting("baddbmm")
    acc, a, b = _meta_operands()
    L.addmm_acc(acc, a, b)  # the product in float32, then an add
    assert L._ACC_BY_ADD and L._OUT_DTYPE_MM and calls == [("mm", torch.float32)]
    rejecting("mm")
    L.addmm_acc(acc, a, b)  # upcasts instead (no warning off CUDA)
    assert L._OUT_DTYPE_MM is False


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="the out-dtype matmuls run on CUDA")
@pytest.mark.parametrize("form", ["batched", "add", "upcast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_out_dtype_matmul_forms_agree_on_cuda(monkeypatch, form, dtype):
    """Each form of acc += a @ b (a a float32 gradient tile, as in dW) against float64, with
    acc strided like a padded tile: within float32 accumulation of the rounded operands."""
    _, L, _ = _triton_modules()
    monkeypatch.setattr(L, "_OUT_DTYPE_MM", form != "upcast")
    monkeypatch.setattr(L, "_ACC_BY_ADD", form == "add")
    a = torch.randn(300, 77) * 3
    b = torch.randn(300, 40).to(dtype)
    acc = torch.randn(77, 48)[:, :40]
    expect = acc.double() + a.to(dtype).double().T @ b.double()
    L.addmm_acc(acc, a.T, b)
    if form == "upcast":  # the float32 tile is not rounded to dtype first
        expect += (a.double() - a.to(dtype).double()).T @ b.double()
    assert (acc.double() - expect).abs().max() <= 300 * 2**-22 * expect.abs().max()
    L.addmm_acc(acc, a.T, b, fresh=True)
    expect = (a if form == "upcast" else a.to(dtype)).double().T @ b.double()
    assert (acc.double() - expect).abs().max() <= 300 * 2**-22 * expect.abs().max()


# ------------------------------------------------------------------------------------------
# 4. No host sync: device-side checks, sync-free mode.


@data_check
def test_device_side_checks_raise_with_a_message(monkeypatch):
    monkeypatch.setattr(dispatch, "device_side_checks", lambda device: True)
    logits = torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    labels[1, 2] = 11
    # On CPU tensors torch._assert_async raises at once; on CUDA it stops a later CUDA call.
    with pytest.raises(RuntimeError, match=r"outside the vocabulary \[0, 11\)"):
        dpo_kernels.sequence_logprobs(logits, labels, backend="reference")
    labels[1, 2] = 3
    with pytest.raises(RuntimeError, match="mask holds a value other than 0 and 1"):
        dpo_kernels.sequence_logprobs(logits, labels, mask=torch.full((2, 3), 2))
    with pytest.raises(RuntimeError, match="cu_seqlens must rise"):
        dpo_kernels.sequence_logprobs(logits[0], labels[0], cu_seqlens=torch.tensor([0, 2, 1]))
    dpo_kernels.sequence_logprobs(logits, labels, backend="reference")  # good input passes
    sums, n = torch.randn(3) - 5, torch.tensor([2, 0, 1])
    with pytest.raises(RuntimeError, match=r"rejected_counts holds a value below 1 \(or NaN\)"):
        dpo_kernels.orpo_loss(sums, sums, chosen_counts=n + 1, rejected_counts=n)
    with pytest.raises(RuntimeError, match=r"chosen_counts holds a value below 0 \(or NaN\)"):
        dpo_kernels.dpo_loss(sums, sums, loss_type="ipo", chosen_counts=n - 1, rejected_counts=n)
    dpo_kernels.dpo_loss(sums, sums, loss_type="ipo", chosen_counts=n, rejected_counts=n)


_BAD_DATA = """
import sys, torch, dpo_kernels
torch.set_default_device("cuda")
logits, labels, case = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3)), sys.argv[1]
if case.startswith("label"):
    labels[1, 2] = 11
    dpo_kernels.sequence_logprobs(logits, labels, backend=case.split()[1])
elif case == "linear label":
    labels[1, 2] = 11
    dpo_kernels.linear_sequence_logprobs(torch.randn(2, 3, 4), torch.randn(11, 4), labels)
elif case == "mask":
    dpo_kernels.sequence_logprobs(logits, labels, mask=torch.full((2, 3), 2))
elif case == "cu_seqlens":
    dpo_kernels.sequence_logprobs(logits[0], labels[0], cu_seqlens=torch.tensor([0, 2, 1]))
elif case == "counts":
    n = torch.tensor([2, -1])
    dpo_kernels.dpo_loss(logits[:, 0, 0], logits[:, 0, 1], loss_type="ipo", chosen_counts=n,
                         rejected_counts=n)
torch.cuda.synchronize()
print("no assert")
"""


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="device-side asserts are CUDA's")
@pytest.mark.parametrize(
    "case,message",
    [
        ("label triton", r"outside the vocabulary \[0, 11\)"),
        ("label reference", r"outside the vocabulary \[0, 11\)"),
        ("linear label", r"outside the vocabulary \[0, 11\)"),
        ("mask", "mask holds a value other than 0 and 1"),
        ("cu_seqlens", r"cu_seqlens must rise from 0 to the number of tokens \(3\)"),
        ("counts", r"chosen_counts holds a value below 0 \(or NaN\); token counts cannot be neg"),
        ("good", None),
    ],
)
def test_device_side_asserts_in_child_processes(case, message):
    """On CUDA a data check is a device-side assert, which ends the process's CUDA context: each
    bad input runs in a fresh interpreter, which must stop with the check's message on stderr
    (the `data_check` cases elsewhere are skipped on CUDA for this reason)."""
    import os
    import re
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _BAD_DATA, case], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    if message is None:
        assert proc.returncode == 0 and "no assert" in out, out[-2000:]
    else:
        assert proc.returncode != 0 and "no assert" not in out, out[-2000:]
        assert re.search(r"Assertion `[^`]*" + message, out), out[-2000:]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sync_free_linear_path_matches_the_default(monkeypatch, backend):
    B, T, H, V = 2, 5, 8, 37
    hidden = torch.randn(B, T + 1, H, dtype=torch.float64)[:, :-1]
    weight = torch.randn(V, H, dtype=torch.float64) / H**0.5
    bias = torch.randn(V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    mask = torch.rand(B, T) > 0.3
    hidden[1, 0] = float("nan")  # a token that does not count: must not reach anything
    mask[1, 0] = False
    outs = []
    for mode in (False, True):
        monkeypatch.setattr(dispatch, "_SYNC_FREE", mode)
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        out = dpo_kernels.linear_sequence_logprobs(
            h, w, labels, bias=b, mask=mask, softcap=3.0, stats=True, backend=backend
        )
        (out.logps.sum() + out.token_logps.square().sum()).backward()
        outs.append((out.logps, out.token_logps, *out.stats, h.grad, w.grad, b.grad))
    for x, y in zip(*outs, strict=True):
        assert not y.isnan().any()
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)


def test_sync_free_mode_switch(monkeypatch):
    monkeypatch.delenv("DPO_KERNELS_SYNC_FREE", raising=False)
    monkeypatch.setattr(dispatch, "_SYNC_FREE", None)
    assert not dispatch.sync_free(torch.device("cpu"))
    monkeypatch.setenv("DPO_KERNELS_SYNC_FREE", "1")
    assert dispatch.sync_free(torch.device("cpu"))
    dpo_kernels.set_sync_free(False)
    assert not dispatch.sync_free(torch.device("cpu"))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_on_cuda(monkeypatch):
    """Forward, backward and loss with torch's sync debugging set to raise on any sync."""
    monkeypatch.setattr(dispatch, "_SYNC_FREE", True)
    logits = torch.randn(4, 9, 32001, device="cuda", requires_grad=True)
    labels = torch.randint(0, 32001, (4, 9), device="cuda")
    hidden = torch.randn(4, 9, 64, device="cuda", requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda", requires_grad=True)
    dpo_kernels.sequence_logprobs(logits, labels)  # compile the kernels before checking
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = dpo_kernels.sequence_logprobs(logits, labels, stats=True)
        lin = dpo_kernels.linear_sequence_logprobs(hidden, weight, labels % 5000, stats=True)
        pc, pr = out.logps.chunk(2)
        lc, lr = lin.logps.chunk(2)
        loss = dpo_kernels.dpo_loss(pc, pr, lc.detach(), lr.detach(), beta=0.1).loss
        (loss + lin.logps.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_capture_of_forward_and_backward():
    logits = torch.randn(2, 9, 32001, device="cuda", requires_grad=True)
    labels = torch.randint(0, 32001, (2, 9), device="cuda")
    hidden = torch.randn(2, 9, 64, device="cuda", requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda", requires_grad=True)

    def step():
        out = dpo_kernels.sequence_logprobs(logits, labels)
        lin = dpo_kernels.linear_sequence_logprobs(hidden, weight, labels % 5000)
        (out.logps.sum() + lin.logps.sum()).backward()
        return out.logps.detach() + lin.logps.detach()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: kernels compiled, constants cached
            eager = step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # sync-free mode switches itself on while capturing
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)


# ------------------------------------------------------------------------------------------
# 3. Rows at any 16-byte phase: head, aligned body and end, under the interpreter.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead", [0, 3])
def test_rows_at_every_alignment(dtype, lead):
    """V = 53 (odd): consecutive rows start at every phase of a 16-byte vector; `lead` more
    elements put the first row off the allocation's boundary too. Values, stats (a tie for the
    max inside a row's head) and the gradient against float64."""
    B, T, V = 2, 6, 53
    storage = torch.randn(lead + B * (T + 1) * V, dtype=torch.float64).to(dtype)
    full = storage[lead:].view(B, T + 1, V)
    logits = full[:, :-1]
    labels = torch.randint(0, V, (B, T))
    top = logits.double().amax(-1)
    logits[0, 1, 1] = logits[0, 1, 4] = top[0, 1] + 1  # first argmax at 1: in the head
    labels[0, 1] = 4
    labels[1, 2] = -100
    z = logits.detach().requires_grad_()
    out = dpo_kernels.sequence_logprobs(z, labels, stats=True, backend="triton")
    z64 = logits.detach().double().requires_grad_()
    ref, _ = reference.sequence_logprobs(z64, labels)
    naive = reference.sequence_logprobs(logits.detach().float(), labels)[0]
    assert_no_worse_than_naive(out.logps, naive, ref.detach(), 2e-5, "fwd")
    counted = labels != -100
    lse = torch.where(counted, z64.detach().logsumexp(-1), 0)
    _, _, top1, _ = reference.token_stats(z64.detach(), lse, labels.clamp(min=0), counted)
    assert torch.equal(out.stats.is_top1, top1) and not out.stats.is_top1[0, 1]
    w = torch.randn(B)
    (out.logps * w.to(out.logps.dtype)).sum().backward()
    (ref * w.double()).sum().backward()
    tol = 2 * GRAD_TOL[dtype] * w.abs().max().item()  # one rounding to the logits' dtype
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=0, atol=tol)


def test_gradient_keeps_the_logits_layout():
    """The gradient of logits[:, :-1] has the logits' strides (same 16-byte phase per row), so the
    backward's loads and stores are both whole vectors; a layout with large gaps is not copied."""
    K, _, _ = _triton_modules()
    assert K.grad_strides((2, 8, 53), (9 * 53, 53, 1)) == (9 * 53, 53, 1)
    assert K.grad_strides((2, 8, 53), (8 * 53, 53, 1)) == (8 * 53, 53, 1)
    assert K.grad_strides((2, 8, 53), (100 * 53, 53, 1)) is None  # mostly gaps: contiguous
    assert K.grad_strides((2, 8, 53), (53, 2 * 53, 1)) is None  # batch-major rows interleaved
    logits = torch.randn(2, 9, 53)[:, :-1].requires_grad_()
    out = dpo_kernels.sequence_logprobs(logits, torch.randint(0, 53, (2, 8)), backend="triton")
    grad = torch.autograd.grad(out.logps.sum(), logits)[0]
    assert grad.stride() == logits.stride()


def test_launch_config_keeps_registers_bounded():
    K, _, _ = _triton_modules()
    for esize in (2, 4, 8):
        for V in (37, 4096, 32001, 151665):
            for stats in (False, True):
                block, warps = K.launch_config(V, esize, stats)
                per_thread = block // (32 * warps)  # whole 16-byte vectors, a bounded number
                vec = K.vec_elems(esize)
                most = (32 if stats else 64) // esize  # bytes per thread, as registers allow
                assert per_thread % vec == 0 and vec <= per_thread <= max(vec, most)


# ------------------------------------------------------------------------------------------
# 5. The fused linear losses' single pass on CUDA with bf16/fp16 inputs: the gradient kernel reads
# the float32 logits once and writes dz = g * q in the inputs' dtype (linear_dpo_rows.Rows).

_TRANSFORMS = [{}, {"logit_scale": 1.7, "temperature": 0.6},
               {"softcap": 2.5, "logit_scale": 1.3, "temperature": 0.8}]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", _TRANSFORMS)
@pytest.mark.parametrize("nv", [53, 40])
def test_gradient_kernel_writes_dz_in_the_inputs_dtype(dtype, transform, nv):
    """Rows.grad with `out`: float32 tile rows padded as Rows.tile lays them out (odd widths:
    the last vector runs into the padding), labels inside and outside the tile; dz against
    float64 within one rounding to dtype, the tile only read, nothing written past the vectors
    that hold a row."""
    from dpo_kernels.common import LogitTransform
    from dpo_kernels.linear_dpo_rows import Rows

    n = 7
    tf = LogitTransform(transform.get("logit_scale", 1.0), transform.get("softcap"),
                        transform.get("temperature", 1.0))  # fmt: skip
    rows = Rows("triton", dtype, torch.get_default_device(), tf)
    rows.cuda = True  # the CUDA route's semantics on CPU tensors too (fp16: see tile_factor)
    buf = torch.randn(n * 64 + rows.slack(n)) * 3
    x = rows.tile(buf, n, nv)
    labels = torch.randint(0, nv, (n,))
    labels[1], labels[4] = -1, nv + 3  # not in this tile: no onehot term
    labels[2] = nv - 1  # the last column, in the row's last (partial) vector
    g = torch.randn(n, dtype=torch.float64) * 4
    x64 = x.double()
    z = x64 if tf.softcap is None else tf.softcap * torch.tanh(x64 / tf.softcap)
    slope = tf.factor * (1 - torch.tanh(x64 / tf.softcap) ** 2) if tf.softcap else tf.factor
    z = z * tf.factor
    lse = z.logsumexp(-1)
    onehot = (torch.arange(nv) == labels[:, None]).double()
    # fp16: the factor is left out of dz (tile_factor; the matmuls' float32 results get it)
    expect = g[:, None] * (onehot - torch.exp(z - lse[:, None])) * slope / rows.tile_factor
    assert rows.tile_factor == (tf.factor if dtype == torch.float16 else 1.0)
    width = rows._tl.padded(nv)
    store = torch.full((n * width,), float("nan"), dtype=dtype)
    dz = store.view(n, width)[:, :nv]
    before = buf.clone()
    rows.grad(x, labels, g.float(), lse.float(), out=dz)
    assert torch.equal(buf, before)  # the float32 logits are only read
    # One rounding to dtype: to nearest on a GPU (cvt.rn), GRAD_TOL is twice its unit roundoff;
    # the interpreter's float32 -> bf16 cast truncates (numpy has no bf16): up to one ulp there.
    rtol = GRAD_TOL[dtype] * (2 if dtype == torch.bfloat16 and TEST_DEVICE == "cpu" else 1)
    atol = 1e-6 * g.abs().max().item() * tf.factor / rows.tile_factor + 2**-24  # fp16 subnormals
    err = (dz.double() - expect).abs()
    bad = err > rtol * expect.abs() + atol
    assert not bad.any(), (bad.nonzero(), dz[bad], expect[bad], labels)
    written = -(-nv // 8) * 8  # whole 16-byte vectors of the output
    assert store.view(n, width)[:, written:].isnan().all()


def _rows_on_cuda(monkeypatch) -> None:
    """Rows take their CUDA branch on CPU tensors (bf16 through the dz kernel, under the
    interpreter; fp16 by the two-pass route; the out-dtype matmuls fall back to upcasting on
    CPU)."""
    from dpo_kernels import linear_dpo_rows

    init = linear_dpo_rows.Rows.__init__

    def on_cuda(self, backend, *args):
        init(self, backend, *args)
        self.cuda = backend == "triton"

    monkeypatch.setattr(linear_dpo_rows.Rows, "__init__", on_cuda)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("budget", [None, 14, 12])
def test_single_pass_on_cuda_route_with_reduced_inputs(monkeypatch, dtype, bias, budget):
    """linear_dpo_loss through Rows' CUDA branch for bf16 (Rows told it is on CUDA; the
    out-dtype matmuls fall back to upcasting on CPU): without bias the gradient kernel writes dz
    in dtype and the dh matmul reads that very buffer (no float32 q, no cast of the tile); with
    bias it writes the float32 tile (db sums it), rounded into the dz buffer. dW is made once for
    the dz of up to twice the chunk tokens the budget allows (`DeferredDW`): the pairs count 12,
    13 and 13 tokens, so a budget of 14 tokens (8 bytes per logit on this route) makes a chunk of
    each pair and two dW matmuls (K = 12 + 13, then 13); 12 tokens sends pairs 2 and 3 to the
    recompute route (dW per tile) and the single pass's dW comes last. Loss and gradients
    against float64 with the tolerances of test_linear_dpo.py::test_bfloat16_within_naive_error."""
    from test_linear_dpo import H, V, assert_close, make_batch, reference64, run

    from dpo_kernels.ops import triton_linear_logprobs as L

    _rows_on_cuda(monkeypatch)
    launches, dh_mm, dw_mm = [], [], []
    kernel, addmm_acc = L._linear_bwd_kernel, L.addmm_acc

    class Spy:
        def __getitem__(self, grid):
            def launch(tile, out, *args, **kwargs):
                launches.append((tile.data_ptr(), out))  # kept: its memory is not reused
                return kernel[grid](tile, out, *args, **kwargs)

            return launch

    def spy_mm(acc, a, b, fresh=False):
        if b.shape == (V, H):  # dh [n, H] (+)= dz [n, V] @ W
            dh_mm.append((a.data_ptr(), a.dtype, b.dtype))
        elif acc.shape == (V, H):  # dW (+)= dz.T [V, K] @ h [K, H]
            dw_mm.append((a.shape[1], fresh, a.dtype, b.dtype))
        return addmm_acc(acc, a, b, fresh)

    monkeypatch.setattr(L, "_linear_bwd_kernel", Spy())
    monkeypatch.setattr(L, "addmm_acc", spy_mm)
    poison_empty(monkeypatch)  # dh and dw are written by their first matmul, not zero filled
    batch = make_batch(dtype=dtype, bias=bias)
    kw = {"softcap": 2.5, "logit_scale": 1.3, "temperature": 0.7}
    ref, dh64, dw64, db64 = reference64(*batch, **kw)
    memory_budget = None if budget is None else budget * V * 8
    out, dh, dw, db = run(*batch, backend="triton", memory_budget=memory_budget, **kw)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    assert_close(dh, dh64, 2**-7, "hidden grad")
    assert_close(dw, dw64, 2**-7, "weight grad")
    if bias:
        assert_close(db, db64, 2**-7, "bias grad")
    to_dz = [out.data_ptr() for tile, out in launches if out.dtype == dtype]
    assert all(tile != out.data_ptr() for tile, out in launches if out.dtype == dtype)
    if bias:
        assert not to_dz and all(tile == out.data_ptr() for tile, out in launches)
    else:
        assert len(to_dz) == {None: 1, 14: 3, 12: 1}[budget]  # the single pass's chunks
        # dh reads each dz itself (once), in dtype; the store's first rows serve again after
        # a flush, so a pointer may come back
        reads = [(p, a, b) for p, a, b in dh_mm if p in to_dz]
        assert sorted(p for p, _, _ in reads) == sorted(to_dz)
        assert all(a == b == dtype for _, a, b in reads)
    assert all(a == b == dtype for *_, a, b in dw_mm)
    if budget == 12:
        assert dw_mm[0][1] and dw_mm[-1][:2] == (12, False)
    else:
        assert [k[:2] for k in dw_mm] == {None: [(38, True)], 14: [(25, True), (13, False)]}[budget]


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_cuda_route_with_a_frozen_input(monkeypatch, frozen):
    """The CUDA branch (bf16, bias, a budget of one pair per chunk and two dW matmuls) with the
    hidden states or the head frozen: the other's gradient as with both trainable, against
    float64, and the loss unchanged (no dz kept for a frozen head, no dh for frozen states)."""
    from test_linear_dpo import V, assert_close, make_batch, reference64

    _rows_on_cuda(monkeypatch)
    poison_empty(monkeypatch)
    hidden, weight, bias, labels, mask, rc, rr = make_batch(dtype=torch.bfloat16)
    kw = {"softcap": 2.5}
    ref, dh64, dw64, db64 = reference64(hidden, weight, bias, labels, mask, rc, rr, **kw)
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    b = bias.clone().requires_grad_()
    out = dpo_kernels.linear_dpo_loss(h, w, labels, bias=b, mask=mask, ref_chosen_logps=rc,
                                      ref_rejected_logps=rr, backend="triton",
                                      memory_budget=14 * V * 8, **kw)  # fmt: skip
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    assert (h.grad is None) == (frozen == "hidden") and (w.grad is None) == (frozen == "weight")
    if frozen != "hidden":
        assert_close(h.grad, dh64, 2**-7, "hidden grad")
    if frozen != "weight":
        assert_close(w.grad, dw64, 2**-7, "weight grad")
    assert_close(b.grad, db64, 2**-7, "bias grad")


def test_reference_backend_on_cuda_with_reduced_inputs(monkeypatch):
    """backend="reference" on a CUDA device with bf16 inputs upcasts like the CPU route (it has
    no Triton module for the out-dtype matmuls): Rows built for a CUDA device, run on CPU
    tensors, against float64."""
    from test_linear_dpo import assert_close, make_batch, reference64, run

    from dpo_kernels import linear_dpo_rows

    init = linear_dpo_rows.Rows.__init__
    built = []

    def on_cuda(self, backend, dtype, device, tf):
        init(self, backend, dtype, torch.device("cuda"), tf)
        built.append(self.cuda)

    monkeypatch.setattr(linear_dpo_rows.Rows, "__init__", on_cuda)
    batch = make_batch(dtype=torch.bfloat16)
    ref, dh64, dw64, db64 = reference64(*batch, softcap=2.5)
    out, dh, dw, db = run(*batch, backend="reference", softcap=2.5)
    assert built == [False]
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    for got, want, name in ((dh, dh64, "hidden"), (dw, dw64, "weight"), (db, db64, "bias")):
        assert_close(got, want, 2**-7, f"{name} grad")


def _matmuls_round_like_cuda(monkeypatch) -> None:
    """The out-dtype matmuls as on CUDA, on CPU tensors: the float32 gradient tile rounded to the
    inputs' dtype before the product (CPU upcasts it exactly), and `tile_factor` as on CUDA."""
    from dpo_kernels.ops import triton_linear_logprobs as L

    addmm_acc, tile_factor = L.addmm_acc, L.tile_factor

    def rounded(acc, a, b, fresh=False):
        low = b.dtype if a.dtype == acc.dtype else a.dtype
        return addmm_acc(acc, a.to(low), b.to(low), fresh)

    monkeypatch.setattr(L, "addmm_acc", rounded)
    monkeypatch.setattr(L, "tile_factor", lambda tf, dtype, on_cuda: tile_factor(tf, dtype, True))


# logit_scale / temperature = 1e6: |dz| = 1e6 * |g * q| passes float16's 65504 wherever
# |g * q| > 0.066, while the gradients (1e6 * dz' @ W with |W| ~ 0.01, 1e6 * dz'.T @ h with
# |h| ~ 1e-3) stay in range. A GPU run made the 4-matmul op's fp16 gradient inf and NaN there.
HUGE_FACTOR = {"logit_scale": 1e3, "temperature": 1e-3}


def _small_fp16(hidden, weight):
    return (hidden.double() * 1e-3).half(), (weight.double() * 0.04).half()


def test_fp16_gradient_tiles_leave_the_transform_factor_out(monkeypatch):
    """linear_sequence_logprobs' backward with CUDA's rounding of the tiles (emulated on CPU):
    the tiles are made without the factor (|.| <= |g|) and the float32 results get it, so the
    fp16 gradients are finite and agree with float64 where the factor alone would overflow the
    tiles; the gradients of a factor-1 transform are unchanged (the factor is 1 there)."""
    from test_linear_dpo import assert_close, make_batch

    _matmuls_round_like_cuda(monkeypatch)
    hidden, weight, _, labels, mask, *_ = make_batch(dtype=torch.float16, bias=False)
    hidden, weight = _small_fp16(hidden, weight)
    labels = torch.where(mask, labels, -100)
    wt = torch.randn(labels.shape, dtype=torch.float64) * 0.2
    grads = []
    for dtype, backend in ((torch.float64, "reference"), (torch.float16, "triton")):
        h, w = (t.to(dtype).requires_grad_() for t in (hidden, weight))
        out = dpo_kernels.linear_sequence_logprobs(h, w, labels, backend=backend, **HUGE_FACTOR)
        (out.token_logps.double() * wt).sum().backward()
        grads.append((h.grad, w.grad))
    (dh64, dw64), (dh, dw) = grads
    z = hidden.double() @ weight.double().T * 1e6
    q = torch.nn.functional.one_hot(labels.clamp(min=0), z.shape[-1]) - z.softmax(-1)
    dz = torch.where(labels[..., None] >= 0, wt[..., None] * q * 1e6, 0.0)
    assert dz.abs().max() > 65504  # dz with the factor would overflow float16 ...
    assert dh64.abs().max() < 6e4 and dw64.abs().max() < 6e4  # ... but not the gradients
    assert_close(dh, dh64, 2**-7, "hidden grad")
    assert_close(dw, dw64, 2**-7, "weight grad")


@pytest.mark.parametrize("budget", [None, 12])
def test_fp16_dz_leaves_the_transform_factor_out(monkeypatch, budget):
    """linear_dpo_loss on Rows' CUDA route with fp16 (emulated on CPU, as above): dz in float16
    is made without the factor, which the float32 dh, dW are multiplied by (the two-pass route,
    at the default budget and at one of 12 tokens a tile) against float64."""
    from test_linear_dpo import V, assert_close, make_batch, reference64, run

    _rows_on_cuda(monkeypatch)
    _matmuls_round_like_cuda(monkeypatch)
    hidden, weight, _, labels, mask, rc, rr = make_batch(dtype=torch.float16, bias=False)
    batch = (*_small_fp16(hidden, weight), None, labels, mask, rc, rr)
    kw = dict(HUGE_FACTOR, beta=1.0)
    ref, dh64, dw64, _ = reference64(*batch, **kw)
    assert dh64.abs().max() < 6e4 and dw64.abs().max() < 6e4
    memory_budget = None if budget is None else budget * V * 8
    out, dh, dw, _ = run(*batch, backend="triton", memory_budget=memory_budget, **kw)
    # float32 logits, times 1e6: the sums' rounding grows with the factor
    assert_close(out.loss, ref.loss, 1e-4, "loss")
    assert_close(dh, dh64, 2**-7, "hidden grad")
    assert_close(dw, dw64, 2**-7, "weight grad")


@pytest.mark.parametrize("loss", ["dpo", "pair"])
def test_fp16_tiles_lifted_by_the_largest_loss_factor(monkeypatch, loss):
    """The losses on Rows' CUDA route with fp16 (emulated on CPU, as above): the gradient tiles,
    rounded to float16 for the matmuls, are g * q with g ~ beta / P, most of whose entries sat
    in float16's subnormals or at 0 at the loss's scale. float16 takes the two-pass route (no dz
    kernel), where the batch's largest |g| lifts them by a power of two that the float32
    results lose again: at a GradScaler's 65536, the gradients as precise as float16 allows
    (test_linear_dpo.py's batch, factors and bound), with a transform on the logits."""
    from test_linear_dpo import make_batch, scaled_fp16_grads

    from dpo_kernels.ops import triton_linear_logprobs as L

    _rows_on_cuda(monkeypatch)
    _matmuls_round_like_cuda(monkeypatch)
    launches = []
    kernel = L._linear_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(tile, out, *args, **kwargs):
                launches.append(out.dtype)
                return kernel[grid](tile, out, *args, **kwargs)

            return launch

    monkeypatch.setattr(L, "_linear_bwd_kernel", Spy())
    kw = {"softcap": 2.5, "logit_scale": 1.3, "temperature": 0.7}
    batch = make_batch(dtype=torch.float16)
    (dh, dw), (dh64, dw64) = scaled_fp16_grads(batch, loss, 65536.0, backend="triton", **kw)
    assert torch.float16 not in launches  # no dz kernel: the tiles are float32
    for ours, ref in ((dh, dh64), (dw, dw64)):
        assert ours.isfinite().all() and ref.abs().max() < 2**-14
        err = (ours.double() / 65536 - ref).norm() / ref.norm()
        assert err < 1e-3, err


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_linear_dpo_syncs_once_for_its_plan():
    """linear_dpo_loss on CUDA waits for the device once, in the forward, for the rows' lengths
    that plan its chunks (the counted tokens' indices come from nonzero_static); the backward,
    which multiplies the gradients by the incoming one unless it is 1, never waits."""
    import warnings

    from test_linear_dpo import make_batch

    hidden, weight, bias, labels, mask, rc, rr = make_batch(dtype=torch.bfloat16)
    h, w, y = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_(), labels.cuda()
    args = dict(bias=bias.cuda(), mask=mask.cuda(), ref_chosen_logps=rc.cuda(),
                ref_rejected_logps=rr.cuda())  # fmt: skip
    for call, scale in enumerate((1.0, 1.0, 2.0, 1.0)):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = dpo_kernels.linear_dpo_loss(h, w, y, **args).loss
                forward = sum("synchroniz" in str(c.message) for c in caught)
                (loss * scale).backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        backward = sum("synchroniz" in str(c.message) for c in caught) - forward
        if call:  # the first call compiles the kernels and fills the constants' cache
            assert (forward, backward) == (1, 0), [str(c.message)[:300] for c in caught]
