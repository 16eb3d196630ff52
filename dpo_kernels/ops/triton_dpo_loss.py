"""Triton kernel for the DPO loss family: loss and gradient of every pair in one launch.

One program walks the P pairs in blocks (P is a per-device batch, small): per pair it computes the
weighted sum of the selected losses and its derivative with respect to the policy's chosen and
rejected log-probs, and accumulates the mean loss in a fixed order (deterministic, no atomics).
The formulas are those of ops/torch_dpo_loss.py (closed forms of ops/reference.py::dpo_losses).
The kernel computes the loss types registered below with `_in_kernel` (one branch each); the torch
closed forms add the others (the sorting losses aot and aot_unpaired, which need the whole batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import ALPHA_CLAMP_MAX, F_DIVERGENCES, LOSS_TYPES, LOSSES, DPOLossSpec, acc_dtype
from .triton_common import (
    LN2,
    device_constants,
    device_guard,
    expm1,
    log1p,
    softplus,
    tl_acc_dtype,
)

# The loss types this kernel computes, in registration order (see `_in_kernel`).
KERNEL_TYPES: list[str] = []


def _in_kernel(kind: str) -> tl.constexpr:
    """Registers `kind` as computed by the kernel and returns its index in LOSS_TYPES: bit i of
    TYPES selects LOSS_TYPES[i] (tested as `(ONE << i) & TYPES`: constexpr first), and w_ptr[i]
    is its weight. The kernel walks the pairs one by one: no sorting loss here."""
    assert not LOSSES[kind].sorting, kind
    KERNEL_TYPES.append(kind)
    return tl.constexpr(LOSS_TYPES.index(kind))


ONE = tl.constexpr(1)
SIGMOID = _in_kernel("sigmoid")
HINGE = _in_kernel("hinge")
IPO = _in_kernel("ipo")
EXO = _in_kernel("exo_pair")
NCA = _in_kernel("nca_pair")
ROBUST = _in_kernel("robust")
BCO = _in_kernel("bco_pair")
SPPO = _in_kernel("sppo_hard")
APO_ZERO = _in_kernel("apo_zero")
APO_DOWN = _in_kernel("apo_down")
DISCOPOP = _in_kernel("discopop")
SFT = _in_kernel("sft")
SIGMOID_NORM = _in_kernel("sigmoid_norm")


@triton.jit
def _score(x, FDIV: tl.constexpr, a1, hi):
    """f-divergence score of log-ratios x and its derivative."""
    if FDIV == 1:
        e = tl.exp(-x)
        return 1.0 - e, e
    elif FDIV == 2:
        return LN2 - softplus(-x), tl.sigmoid(-x)
    elif FDIV == 3:
        t = a1 * x
        tc = tl.minimum(t, hi, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN
        e = tl.exp(tc)
        return expm1(tc, e) / a1, tl.where(t <= hi, e, 0.0)
    else:
        return x, tl.zeros_like(x) + 1.0  # not x * 0 + 1: NaN for an infinite x


@triton.jit
def _dpo_loss_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, nc_ptr, nr_ptr,  # [P] inputs, ACC
    w_ptr,  # [len(LOSS_TYPES)] loss weights
    loss_ptr,  # [1] out: mean over pairs
    per_ptr, dpc_ptr, dpr_ptr,  # [P] out: per-pair loss, dloss/dpc, dloss/dpr
    prm_ptr,  # [5] beta, label smoothing, discopop tau, alpha - 1, alpha clamp (in ACC: a float
    P,  # argument would arrive as float32)
    TYPES: tl.constexpr, FDIV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    beta = tl.load(prm_ptr)
    eps = tl.load(prm_ptr + 1)
    tau = tl.load(prm_ptr + 2)
    a1 = tl.load(prm_ptr + 3)
    hi = tl.load(prm_ptr + 4)
    sum_pc = tl.zeros([], ACC)
    tokens = tl.zeros([], ACC)
    if (ONE << SFT) & TYPES:  # sft needs the batch's chosen log-prob sum and token count first
        for start in range(0, P, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < P
            sum_pc += tl.sum(tl.load(pc_ptr + offs, mask=m, other=0.0), 0)
            tokens += tl.sum(tl.load(nc_ptr + offs, mask=m, other=0.0), 0)
        tokens = tl.maximum(tokens, 1.0)
    total = tl.zeros([], ACC)
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < P
        pc = tl.load(pc_ptr + offs, mask=m, other=0.0)
        pr = tl.load(pr_ptr + offs, mask=m, other=0.0)
        c = pc - tl.load(rc_ptr + offs, mask=m, other=0.0)
        r = pr - tl.load(rr_ptr + offs, mask=m, other=0.0)
        nc = tl.maximum(tl.load(nc_ptr + offs, mask=m, other=1.0), 1.0)
        nr = tl.maximum(tl.load(nr_ptr + offs, mask=m, other=1.0), 1.0)
        sc, dsc = _score(c, FDIV, a1, hi)
        sr, dsr = _score(r, FDIV, a1, hi)
        u = beta * (sc - sr)
        loss = tl.zeros([BLOCK], ACC)
        du = tl.zeros([BLOCK], ACC)  # d/du of the losses of u = beta * (sc - sr)
        gc = tl.zeros([BLOCK], ACC)  # d/dc of the others
        gr = tl.zeros([BLOCK], ACC)
        if (ONE << SIGMOID) & TYPES:
            w = tl.load(w_ptr + SIGMOID)
            loss += w * softplus(-u)
            du -= w * tl.sigmoid(-u)
        if (ONE << HINGE) & TYPES:
            w = tl.load(w_ptr + HINGE)
            loss += w * tl.maximum(1.0 - u, 0.0, propagate_nan=tl.PropagateNan.ALL)
            du -= w * tl.where(1.0 - u > 0.0, 1.0, 0.0)
        if (ONE << ROBUST) & TYPES:
            w = tl.load(w_ptr + ROBUST) / (1.0 - 2.0 * eps)
            # eps = 0 adds nothing, not 0 * inf = NaN at an infinite margin
            loss += w * ((1.0 - eps) * softplus(-u) - tl.where(eps == 0, 0.0, eps * softplus(u)))
            du -= w * ((1.0 - eps) * tl.sigmoid(-u) + eps * tl.sigmoid(u))
        if (ONE << EXO) & TYPES:
            w = tl.load(w_ptr + EXO)
            qw = tl.sigmoid(u)
            ql = tl.sigmoid(-u)  # not 1 - qw: 0 in float32 above u ~ 17, and the gradient with it
            kl_w = -softplus(-u) - log1p(-eps)
            kl_l = -softplus(u) - tl.log(eps)
            loss += w * (qw * kl_w + ql * kl_l)
            du += w * qw * ql * (kl_w - kl_l)
        if (ONE << DISCOPOP) & TYPES:
            w = tl.load(w_ptr + DISCOPOP)
            # no inf * 0 at large |u|: 1 - m = sigmoid(-u / tau),
            # exp(-u) * m = exp(-u - softplus(-u / tau))
            mix = tl.sigmoid(u / tau)
            mix1 = tl.sigmoid(-u / tau)
            a = softplus(-u)
            em = tl.exp(-u - softplus(-u / tau))
            loss += w * (a * mix1 + em)
            amm = tl.where(mix * mix1 == 0.0, 0.0, a * mix * mix1)  # 0, not inf * 0, at u = -inf
            du += w * (-tl.sigmoid(-u) * mix1 - amm / tau + em * (mix1 / tau - 1.0))
        gc += beta * du * dsc
        gr -= beta * du * dsr
        if (ONE << IPO) & TYPES or (ONE << SIGMOID_NORM) & TYPES:
            d = sc / nc - sr / nr
            dd = tl.zeros([BLOCK], ACC)
            if (ONE << IPO) & TYPES:
                w = tl.load(w_ptr + IPO)
                q = d - 1.0 / (2.0 * beta)
                loss += w * q * q
                dd += w * 2.0 * q
            if (ONE << SIGMOID_NORM) & TYPES:
                w = tl.load(w_ptr + SIGMOID_NORM)
                loss += w * softplus(-beta * d)
                dd -= w * beta * tl.sigmoid(-beta * d)
            gc += dd * dsc / nc
            gr -= dd * dsr / nr
        if (ONE << NCA) & TYPES:
            w = tl.load(w_ptr + NCA)
            loss += w * (softplus(-beta * c) + 0.5 * softplus(beta * c) + 0.5 * softplus(beta * r))
            gc += w * beta * (0.5 * tl.sigmoid(beta * c) - tl.sigmoid(-beta * c))
            gr += w * 0.5 * beta * tl.sigmoid(beta * r)
        if (ONE << BCO) & TYPES:
            w = tl.load(w_ptr + BCO)
            loss += w * (softplus(-beta * c) + softplus(beta * r))
            gc -= w * beta * tl.sigmoid(-beta * c)
            gr += w * beta * tl.sigmoid(beta * r)
        if (ONE << SPPO) & TYPES:
            w = tl.load(w_ptr + SPPO)
            a = c - 0.5 / beta
            b = r + 0.5 / beta
            loss += w * (a * a + b * b)
            gc += w * 2.0 * a
            gr += w * 2.0 * b
        if (ONE << APO_ZERO) & TYPES:
            w = tl.load(w_ptr + APO_ZERO)
            s_c = tl.sigmoid(beta * c)
            s_r = tl.sigmoid(beta * r)
            loss += w * (1.0 - s_c + s_r)
            gc -= w * beta * s_c * (1.0 - s_c)
            gr += w * beta * s_r * (1.0 - s_r)
        if (ONE << APO_DOWN) & TYPES:
            w = tl.load(w_ptr + APO_DOWN)
            s_c = tl.sigmoid(beta * c)
            s_d = tl.sigmoid(beta * (c - r))
            dd = beta * s_d * (1.0 - s_d)
            loss += w * (s_c + 1.0 - s_d)
            gc += w * (beta * s_c * (1.0 - s_c) - dd)
            gr += w * dd
        if (ONE << SFT) & TYPES:
            w = tl.load(w_ptr + SFT)
            loss += w * (-sum_pc / tokens)
            gc -= w * P / tokens
        tl.store(per_ptr + offs, loss, mask=m)
        tl.store(dpc_ptr + offs, gc / P, mask=m)
        tl.store(dpr_ptr + offs, gr / P, mask=m)
        total += tl.sum(tl.where(m, loss, 0.0), 0)
    tl.store(loss_ptr, total / P)


def dpo_loss_and_grads(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    nc: torch.Tensor,
    nr: torch.Tensor,
    spec: DPOLossSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-pair loss [P], dloss/dpc [P], dloss/dpr [P]); see torch_dpo_loss.py."""
    P = pc.shape[0]
    dtype = acc_dtype(pc.dtype)
    args = [x.to(dtype).contiguous() for x in (pc, pr, rc, rr, nc, nr)]
    rest, here = spec.split(KERNEL_TYPES)  # the torch closed forms add `rest`
    weights = [0.0] * len(LOSS_TYPES) if here is None else here.type_weights()
    types = 0 if here is None else sum(1 << LOSS_TYPES.index(t) for t in set(here.loss_types))
    out = [torch.empty(P, dtype=dtype, device=pc.device) for _ in range(3)]
    loss = torch.empty(1, dtype=dtype, device=pc.device)
    a1 = spec.f_alpha_divergence_coef - 1.0
    fdiv = F_DIVERGENCES.index(spec.f_divergence_type)
    if fdiv == 3 and abs(a1) < 1e-6:
        fdiv = 0  # alpha -> 1 is reverse KL
    params = (
        float(spec.beta),
        float(spec.label_smoothing),
        float(spec.discopop_tau),
        float(a1 if fdiv == 3 else 1.0),
        float(ALPHA_CLAMP_MAX),
    )
    with device_guard(pc):
        _dpo_loss_kernel[(1,)](
            *args,
            device_constants(tuple(weights), dtype, pc.device),  # no host-to-device copy
            loss,
            *out,
            device_constants(params, dtype, pc.device),
            P,
            TYPES=types,
            FDIV=fdiv,
            ACC=tl_acc_dtype(dtype),
            BLOCK=min(1024, max(16, triton.next_power_of_2(P))),
        )
    loss = loss[0]
    per, dpc, dpr = out
    if rest is not None:
        from . import torch_dpo_loss

        s_loss, s_per, s_dpc, s_dpr = torch_dpo_loss.dpo_loss_and_grads(*args, rest)
        loss, per, dpc, dpr = loss + s_loss, per + s_per, dpc + s_dpc, dpr + s_dpr
    return loss, per, dpc, dpr
