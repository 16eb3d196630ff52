"""The main job: forward+backward of the fused ops against naive PyTorch (and peers), in a table.

Measurement rules (shared/DESIGN.md): times are medians after a warm-up, all methods of a case in
the same process run, speed-ups are ratios within that run. Peak memory comes from one subprocess
per method: MALLOC_MMAP_THRESHOLD_ is set so freed tensors go back to the OS,
`/proc/self/clear_refs` resets the high-water mark after a warm-up, and the extra peak is VmHWM
after one fwd+bwd minus VmRSS before it. On CUDA: triton.testing.do_bench and
torch.cuda.max_memory_allocated. Every output is checked against the float64 reference; a fast
wrong answer is marked WRONG.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STREAM_BYTES = 1 << 29  # 512 MiB buffers for the bandwidth probe


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    method: str
    time_ms: float | None = None
    speedup: float | None = None
    extra_mib: float | None = None
    mem_ratio: float | None = None
    max_err: float | None = None
    roofline: float | None = None  # fraction of the bandwidth bound reached
    status: str = "ok"  # ok | WRONG | skipped
    note: str = ""


# ------------------------------------------------------------------------------------------
# Inputs and methods. A method builds a step() -> (per-sequence logps, input gradient or a tuple
# of them, or None for a gradient of another objective), or None for a timing reference.

Step = Callable[[], tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...] | None] | None]


def _prompt_mask(B: int, T: int, device: str) -> torch.Tensor:
    """[B, T] bool: the first quarter of each sequence is the prompt and does not count."""
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, : T // 4] = False
    return mask


def logits_inputs(case: Case, device: str):
    """Logits [B, T, V], labels [B, T], mask [B, T]: the first quarter of tokens is the prompt."""
    B, T, V = case.shape
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(DTYPES[case.dtype]).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    return logits, labels, _prompt_mask(B, T, device)


def linear_inputs(case: Case, device: str):
    """hidden [B, T, H] (randn), LM head weight [V, H] (randn * 0.02: logits of std ~0.45 at
    H = 512), labels [B, T], mask [B, T]: the first quarter of tokens is the prompt."""
    B, T, H, V = case.shape
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[case.dtype]
    hidden = torch.randn(B, T, H, generator=g).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) * 0.02).to(dtype).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    return hidden, weight, labels, _prompt_mask(B, T, device)


def _naive(case, device) -> Step:
    logits, labels, mask = logits_inputs(case, device)
    z = logits.requires_grad_()

    def step():
        z.grad = None
        lp = z.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        logps = (lp * mask).sum(-1)
        logps.sum().backward()
        return logps.detach(), z.grad

    return step


def _ours(case, device) -> Step:
    from .functional import sequence_logprobs

    logits, labels, mask = logits_inputs(case, device)
    z = logits.requires_grad_()

    def step():
        z.grad = None
        logps = sequence_logprobs(z, labels, mask=mask).logps
        logps.sum().backward()
        return logps.detach(), z.grad

    return step


def _trl_selective(case, device) -> Step:
    from trl.trainer.utils import selective_log_softmax

    logits, labels, mask = logits_inputs(case, device)
    z = logits.requires_grad_()

    def step():
        z.grad = None
        logps = (selective_log_softmax(z, labels) * mask).sum(-1)
        logps.sum().backward()
        return logps.detach(), z.grad

    return step


def _linear_step(case: Case, device: str, logps_of) -> Step:
    """fwd+bwd of logps_of(hidden, weight, labels, mask) -> [B]; gradients of hidden and weight."""
    hidden, weight, labels, mask = linear_inputs(case, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()

    def step():
        h.grad = w.grad = None
        logps = logps_of(h, w, labels, mask)
        logps.sum().backward()
        return logps.detach(), (h.grad, w.grad)

    return step


def _linear_naive(case, device) -> Step:
    def logps_of(h, w, labels, mask):
        lp = (h @ w.T).float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (lp * mask).sum(-1)

    return _linear_step(case, device, logps_of)


def _linear_ours(case, device) -> Step:
    from .functional import linear_sequence_logprobs

    return _linear_step(
        case,
        device,
        lambda h, w, labels, mask: linear_sequence_logprobs(h, w, labels, mask=mask).logps,
    )


def _linear_trl(case, device) -> Step:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer import utils

    # What TRL's DPOTrainer passes (one vocabulary chunk up to 32k), on the counted rows only.
    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)

    def logps_of(h, w, labels, mask):
        lp = ChunkedLogProbFunction.apply(h[mask], w, None, labels[mask], 1.0, chunk, None, 1.0, ())
        return lp[0].new_zeros(mask.shape).masked_scatter(mask, lp[0]).sum(-1)

    return _linear_step(case, device, logps_of)


def _cce(linear_cross_entropy) -> Callable[[Case, str], Step]:
    def build(case, device) -> Step:
        def logps_of(h, w, labels, mask):
            targets = labels.masked_fill(~mask, -100)
            return -linear_cross_entropy(h, w, targets, reduction="none").sum(-1)

        return _linear_step(case, device, logps_of)

    return build


def _cce_torch_compile(case, device) -> Step:
    from cut_cross_entropy.torch_compile import torch_compile_linear_cross_entropy

    return _cce(torch_compile_linear_cross_entropy)(case, device)


def _cce_triton(case, device) -> Step:
    from cut_cross_entropy import linear_cross_entropy

    return _cce(linear_cross_entropy)(case, device)


def _liger_dpo(case, device) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # Liger fuses the LM head with a whole DPO loss (first half chosen, second half rejected): its
    # sums are checked, its gradients (of the DPO loss, not of the sums) are not.
    loss_fn = LigerFusedLinearDPOLoss(use_ref_model=False)
    hidden, weight, labels, mask = linear_inputs(case, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    targets = labels.masked_fill(~mask, -100)

    def step():
        h.grad = w.grad = None
        loss, aux = loss_fn(w, h, targets)
        loss.backward()
        return torch.cat([aux[0], aux[1]]).detach(), None

    return step


def _linear_matmuls(case, device) -> Step:
    """Timing reference: the 4 plain matmuls the fused op does over the counted tokens."""
    hidden, weight, _, mask = linear_inputs(case, device)
    h = hidden[mask]
    dz = torch.randn(h.shape[0], weight.shape[0], device=device).to(weight.dtype)
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(weight)

    def step():  # into preallocated outputs: matmul time only, no page faults
        torch.mm(h, weight.T, out=z)  # forward
        torch.mm(h, weight.T, out=z)  # backward: recomputed
        torch.mm(dz, weight, out=dh)  # dh
        torch.mm(dz.T, h, out=dw)  # dW

    return step


def _has(module: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec(module) else f"{module} not installed"


def _cuda_only(device: str) -> str | None:
    return None if device == "cuda" else "its Triton kernels need CUDA"


# op -> [(method name, builder, availability check on the device: a reason to skip, or None)]
METHODS: dict[str, list[tuple[str, Callable[[Case, str], Step], Callable[[str], str | None]]]] = {
    "logprobs": [
        ("naive", _naive, lambda device: None),
        ("trl.selective_log_softmax", _trl_selective, lambda device: _has("trl")),
        ("dpo_kernels", _ours, lambda device: None),
    ],
    "linear": [
        ("naive", _linear_naive, lambda device: None),
        ("trl.ChunkedLogProbFunction", _linear_trl, lambda device: _has("trl")),
        ("cce.torch_compile", _cce_torch_compile, lambda device: _has("cut_cross_entropy")),
        ("cce", _cce_triton, lambda d: _has("cut_cross_entropy") or _cuda_only(d)),
        ("liger.LigerFusedLinearDPOLoss", _liger_dpo, lambda device: _has("liger_kernel")),
        ("dpo_kernels", _linear_ours, lambda device: None),
        ("matmuls", _linear_matmuls, lambda device: None),
    ],
}

DEFAULT_GRID = {
    "logprobs": [
        Case("logprobs", (4, 512, 32000), "fp32"),
        Case("logprobs", (4, 512, 32000), "bf16"),
        Case("logprobs", (2, 256, 128256), "bf16"),
    ],
    "linear": [  # (B, T, H, V); then sequences twice as long: [T, V] chunks double, tiles do not
        Case("linear", (8, 256, 512, 32000), "fp32"),
        Case("linear", (8, 512, 512, 32000), "fp32"),
    ],
}
QUICK_GRID = {
    "logprobs": [Case("logprobs", (2, 128, 32000), "fp32")],
    "linear": [Case("linear", (2, 64, 128, 4000), "fp32")],
}


def expected(case: Case, device: str):
    """float64 reference logps and gradient(s) of sum(logps) for the case's inputs."""
    if case.op == "linear":
        hidden, weight, labels, mask = linear_inputs(case, device)
        h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
        logps, _ = reference.sequence_logprobs(h @ w.T, labels, mask)
        logps.sum().backward()
        return logps.detach(), (h.grad, w.grad)
    logits, labels, mask = logits_inputs(case, device)
    z = logits.double().requires_grad_()
    logps, _ = reference.sequence_logprobs(z, labels, mask)
    logps.sum().backward()
    return logps.detach(), z.grad


def max_error(got, ref) -> tuple[float, bool]:
    """Largest error of logps (relative to their scale) and gradient(s); True when within
    tolerance. A method whose gradient is of another objective (None) is checked on logps only."""
    lp, grad = got
    rlp, rgrad = ref
    lp_err = ((lp.double() - rlp).abs() / rlp.abs().clamp(min=1)).max().item()
    if grad is None:
        return lp_err, lp_err <= 1e-3
    grads, rgrads = (grad, rgrad) if isinstance(grad, tuple) else ((grad,), (rgrad,))
    g_err = max((g.double() - r).abs().max().item() for g, r in zip(grads, rgrads, strict=True))
    ok = lp_err <= 1e-3 and g_err <= 2e-2  # bf16 gradients carry one bf16 rounding (~4e-3)
    return max(lp_err, g_err), ok


# ------------------------------------------------------------------------------------------
# Measurement


def time_step(step: Step, device: str, reps: int) -> float:
    """Median milliseconds of step() after one warm-up."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(case: Case, method: str, device: str) -> int:
    """Extra peak bytes of one fwd+bwd (run in a fresh subprocess; see the module docstring)."""
    import gc

    builder = {name: b for name, b, _ in METHODS[case.op]}[method]
    step = builder(case, device)
    step()  # warm-up: allocator pools, lazy inits, the first gradient
    _release_grad(step)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def _release_grad(step: Step) -> None:
    for cell in step.__closure__ or ():
        v = cell.cell_contents
        if isinstance(v, torch.Tensor) and v.requires_grad:
            v.grad = None


def measure_memory(case: Case, method: str, device: str) -> int | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    arg = json.dumps({"case": dataclasses.asdict(case), "method": method, "device": device})
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_kernels.bench", "--probe", arg],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    return int(proc.stdout.strip().splitlines()[-1])


def stream_bandwidth(device: str) -> float:
    """Measured bytes/s of a large read+write copy on this machine (the roofline's slope)."""
    n = STREAM_BYTES // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    else:
        b.copy_(a)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            b.copy_(a)
            ts.append(time.perf_counter() - t0)
        ms = statistics.median(ts) * 1e3
    return 2 * a.numel() * 4 / (ms * 1e-3)


def must_move_bytes(case: Case) -> int | None:
    """Bytes logprobs fwd+bwd must move: read the counted rows twice, write the whole gradient
    once. None for the linear op, which is bound by its matmuls (see its "matmuls" row)."""
    if case.op != "logprobs":
        return None
    B, T, V = case.shape
    esize = DTYPES[case.dtype].itemsize
    counted_rows = B * (T - T // 4)
    return (2 * counted_rows + B * T) * V * esize


def run_case(
    case: Case, device: str, reps: int, bandwidth: float | None, memory: bool
) -> list[Row]:
    ref = expected(case, device)
    rows: list[Row] = []
    for name, builder, available in METHODS[case.op]:
        row = Row(case.op, case.label, case.dtype, name)
        reason = available(device)
        if reason:
            row.status, row.note = "skipped", reason
            rows.append(row)
            continue
        try:
            step = builder(case, device)
            out = step()
            if out is None:
                row.note = "timing reference, no result"
            else:
                row.max_err, ok = max_error(out, ref)
                row.status = "ok" if ok else "WRONG"
            row.time_ms = time_step(step, device, reps)
            del step, out
        except Exception as exc:  # a peer that fails on this case is a skipped row, not a crash
            row.status, row.note = "skipped", f"{type(exc).__name__}: {str(exc)[:60]}"
            rows.append(row)
            continue
        if memory and row.max_err is not None:
            extra = measure_memory(case, name, device)
            row.extra_mib = None if extra is None else extra / 2**20
        moved = must_move_bytes(case)
        if bandwidth and moved:
            row.roofline = moved / bandwidth * 1e3 / row.time_ms
        rows.append(row)
    base = next((r for r in rows if r.method == "naive" and r.time_ms), None)
    for r in rows:
        if base and r.time_ms:
            r.speedup = base.time_ms / r.time_ms
        if base and base.extra_mib and r.extra_mib is not None:
            r.mem_ratio = r.extra_mib / base.extra_mib
    return rows


def format_table(rows: list[Row]) -> str:
    head = ["op", "shape", "dtype", "method", "ms", "speed-up", "extra MiB", "mem ratio",
            "max err", "roofline", "status"]  # fmt: skip

    def f(v, spec, unit=""):
        return "-" if v is None else format(v, spec) + unit

    lines = [head]
    for r in rows:
        roof = None if r.roofline is None else 100 * r.roofline
        lines.append([
            r.op, r.shape, r.dtype, r.method, f(r.time_ms, ".1f"), f(r.speedup, ".2f", "x"),
            f(r.extra_mib, ".0f"), f(r.mem_ratio, ".2f"), f(r.max_err, ".1e"), f(roof, ".0f", "%"),
            r.status + (f" ({r.note})" if r.note else ""),
        ])  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(
    grid: dict[str, list[Case]],
    device: str,
    reps: int = 5,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Row], dict]:
    """Run every case of the grid; returns the rows and facts about the machine."""
    bandwidth = stream_bandwidth(device)
    facts = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stream_GBps": bandwidth / 1e9,
        "date": time.strftime("%Y-%m-%d"),
    }
    rows: list[Row] = []
    cases = [c for cs in grid.values() for c in cs]
    for i, case in enumerate(cases):
        if progress:
            progress(f"[{i + 1}/{len(cases)}] {case.op} {case.label} {case.dtype}")
        rows += run_case(case, device, reps, bandwidth, memory)
    return rows, facts


def _probe_main(arg: str) -> int:
    spec = json.loads(arg)
    c = spec["case"]
    case = Case(c["op"], tuple(c["shape"]), c["dtype"])
    print(probe_memory(case, spec["method"], spec["device"]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        sys.exit(_probe_main(sys.argv[2]))
    from .cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
