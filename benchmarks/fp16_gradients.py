"""Error of float16 gradients of the fused linear DPO loss, against float64, at a GradScaler's
scale: naive PyTorch (float16 matmuls, float32 log-softmax; TRL's way under float16 autocast),
ours on the C++ CPU backend, and ours on the CUDA route, emulated on CPU tensors (Triton under
the interpreter, `Rows` told it is on CUDA: the gradient tiles rounded to float16 for the
matmuls, as cuBLAS takes them). Prints the norm error and the median elementwise relative error
of dh and dW. Small beta, many pairs or a large vocabulary put g * softmax (the logits' gradient
at the loss's scale) into float16's subnormals.

    PYTHONPATH=. python benchmarks/fp16_gradients.py [--pairs 64] [--tokens 8] [--hidden 128]
        [--vocab 32000] [--beta 0.1] [--scale 65536] [--methods naive,cpu,cuda_emulated]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the emulated CUDA route's Triton kernels

import torch

import dpo_kernels
from dpo_kernels import linear_dpo_rows

METHODS = ("naive", "cpu", "cuda_emulated")


def naive_grads(h, w, labels, rc, rr, beta, scale):
    """dh, dW of logits + log_softmax (float32 when h is reduced) + the sigmoid loss, times
    scale, divided back in float64."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    z = h @ w.T
    logp = z.float().log_softmax(-1) if h.dtype != torch.float64 else z.log_softmax(-1)
    counted = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    sums = torch.where(counted, tok, 0.0).sum(-1)
    P = h.shape[0] // 2
    r = (rc.to(sums.dtype), rr.to(sums.dtype))
    loss = dpo_kernels.dpo_loss(sums[:P], sums[P:], *r, beta=beta, backend="reference").loss
    (loss * scale).backward()
    return h.grad.double() / scale, w.grad.double() / scale


def ours_grads(h, w, labels, rc, rr, beta, scale, backend):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    out = dpo_kernels.linear_dpo_loss(h, w, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                      beta=beta, backend=backend)  # fmt: skip
    (out.loss * scale).backward()
    return h.grad.double() / scale, w.grad.double() / scale


def emulate_cuda_route() -> None:
    """Rows of the Triton backend take their CUDA branch on CPU tensors."""
    init = linear_dpo_rows.Rows.__init__

    def on_cuda(self, backend, *args):
        init(self, backend, *args)
        self.cuda = backend == "triton"
        if not isinstance(getattr(type(self), "dz_kernel", None), property):
            self.dz_kernel = self.cuda and self.reduced  # commits before float16's two passes

    linear_dpo_rows.Rows.__init__ = on_cuda


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    norm = ((ours - ref).norm() / ref.norm()).item()
    rel = ((ours - ref).abs() / ref.abs().clamp(min=1e-300))[ref != 0].median().item()
    return norm, rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--scale", type=float, default=65536.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    methods = args.methods.split(",")
    if bad := sorted(set(methods) - set(METHODS)):
        ap.error(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    if min(args.pairs, args.tokens, args.hidden, args.vocab) < 1 or args.tokens < 4:
        ap.error("--pairs, --hidden and --vocab must be >= 1 and --tokens >= 4")
    torch.manual_seed(0)
    P, T, H, V = args.pairs, args.tokens, args.hidden, args.vocab
    h = torch.randn(2 * P, T, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * 0.05
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, : T // 4] = -100  # a prompt
    rc = torch.randn(P) * 2 - 10 * T
    rr = rc.clone()
    h16, w16 = h.half(), w.half()  # the float64 reference takes the same (rounded) inputs
    dh64, dw64 = naive_grads(h16.double(), w16.double(), labels, rc, rr, args.beta, 1.0)
    print(f"P={P} T={T} H={H} V={V} beta={args.beta} scale={args.scale:g}, float16 inputs; "
          f"|dh| max {dh64.abs().max():.2e}, median {dh64.abs().median():.2e}")  # fmt: skip
    print(f"{'method':<15} {'dh norm err':>12} {'dh median rel':>14} {'dW norm err':>12} "
          f"{'dW median rel':>14}")  # fmt: skip
    for m in methods:
        if m == "naive":
            dh, dw = naive_grads(h16, w16, labels, rc, rr, args.beta, args.scale)
        else:
            if m == "cuda_emulated":
                emulate_cuda_route()
            backend = "cpu" if m == "cpu" else "triton"
            dh, dw = ours_grads(h16, w16, labels, rc, rr, args.beta, args.scale, backend)
        (a, b), (c, d) = errors(dh, dh64), errors(dw, dw64)
        print(f"{m:<15} {a:>12.2e} {b:>14.2e} {c:>12.2e} {d:>14.2e}", flush=True)


if __name__ == "__main__":
    main()
