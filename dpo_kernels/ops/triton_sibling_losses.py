"""Triton kernel for the sibling losses (CPO / SimPO / AlphaPO, ORPO, KTO): the loss, the
per-example losses and the gradient with respect to the per-sequence sums, in one launch.

One program walks the N examples in blocks (a per-device batch: small) and accumulates the mean in
a fixed order (deterministic, no atomics). The formulas are the closed forms of
ops/torch_sibling_losses.py (spec: ops/reference_siblings.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import FAMILIES, SiblingSpec
from .triton_common import (
    LN2,
    device_constants,
    device_guard,
    expm1,
    log1p,
    softplus,
    tl_acc_dtype,
)

CPO, ORPO = (tl.constexpr(FAMILIES[k].kernel) for k in ("cpo", "orpo"))  # else: kto
# LTYPE: the index of the loss type in its family's FAMILIES[...].loss_types
SIGMOID, HINGE, IPO, SIMPO = (
    tl.constexpr(FAMILIES["cpo"].loss_types.index(t)) for t in ("sigmoid", "hinge", "ipo", "simpo")
)


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation for small x (Kahan's correction)."""
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(u)))


@triton.jit
def _log1mexp(x):
    """log(1 - exp(x)) for x < 0."""
    return tl.where(x < -LN2, log1p(-tl.exp(x)), tl.log(-_expm1(x)))


@triton.jit
def _sibling_loss_kernel(
    a_ptr, b_ptr, na_ptr, nb_ptr,  # [N] inputs, ACC
    kl_ptr,  # [1] KTO's KL estimate (ACC)
    prm_ptr,  # [7] beta, label smoothing, simpo gamma, alpha, cpo_alpha, desirable / undesirable
    loss_ptr,  # [1] out: mean loss (+ the NLL term)
    per_ptr, ga_ptr, gb_ptr,  # [N] out: per-example loss, dloss/da, dloss/db
    N,
    KIND: tl.constexpr, LTYPE: tl.constexpr, SHAPED: tl.constexpr, NLL: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    beta = tl.load(prm_ptr)
    eps = tl.load(prm_ptr + 1)
    gamma = tl.load(prm_ptr + 2)
    alpha = tl.load(prm_ptr + 3)
    cpo_alpha = tl.load(prm_ptr + 4)
    w_d = tl.load(prm_ptr + 5)
    w_u = tl.load(prm_ptr + 6)
    sum_a = tl.zeros([], ACC)
    tokens = tl.zeros([], ACC)
    if NLL:  # CPO's NLL: the batch's chosen log-prob sum over its token count, first
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < N
            sum_a += tl.sum(tl.load(a_ptr + offs, mask=m, other=0.0), 0)
            tokens += tl.sum(tl.load(na_ptr + offs, mask=m, other=0.0), 0)
        tokens = tl.maximum(tokens, 1.0)  # no chosen token anywhere: the NLL is 0
    total = tl.zeros([], ACC)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < N
        a = tl.load(a_ptr + offs, mask=m, other=-1.0)
        b = tl.load(b_ptr + offs, mask=m, other=-1.0)
        na = tl.load(na_ptr + offs, mask=m, other=1.0)
        nb = tl.load(nb_ptr + offs, mask=m, other=1.0)
        if KIND == CPO:
            xc = a
            xr = b
            dxc = tl.zeros([BLOCK], ACC) + 1.0
            dxr = tl.zeros([BLOCK], ACC) + 1.0
            if LTYPE == IPO or LTYPE == SIMPO:  # a count of 0 counts as 1 (reference)
                na = tl.maximum(na, 1.0)
                nb = tl.maximum(nb, 1.0)
                xc = a / na
                xr = b / nb
                dxc = 1.0 / na
                dxr = 1.0 / nb
            if SHAPED:  # AlphaPO: (1 - p^-alpha) / alpha
                tc = -alpha * xc
                tr = -alpha * xr
                ec = tl.exp(tc)
                er = tl.exp(tr)
                xc = -expm1(tc, ec) / alpha
                xr = -expm1(tr, er) / alpha
                dxc = dxc * ec
                dxr = dxr * er
            z = xc - xr
            if LTYPE == SIMPO:
                z = z - gamma / beta
            if LTYPE == HINGE:
                per = tl.maximum(1.0 - beta * z, 0.0, propagate_nan=tl.PropagateNan.ALL)
                dz = -beta * tl.where(1.0 - beta * z > 0.0, 1.0, 0.0)
            elif LTYPE == IPO:
                q = z - 1.0 / (2.0 * beta)
                per = q * q
                dz = 2.0 * q
            else:  # sigmoid, simpo
                u = beta * z
                # eps = 0 adds nothing (not 0 * inf at an infinite margin)
                per = (1.0 - eps) * softplus(-u) + tl.where(eps == 0, 0.0, eps * softplus(u))
                dz = beta * (eps * tl.sigmoid(u) - (1.0 - eps) * tl.sigmoid(-u))
            ga = dz * dxc / N
            gb = -dz * dxr / N
            if NLL:
                ga -= cpo_alpha / tokens
        elif KIND == ORPO:
            ac = a / na
            ar = b / nb
            lo = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
            per = beta * softplus(-lo)
            dlo = -beta * tl.sigmoid(-lo) / N
            ga = dlo * (-1.0 / _expm1(ac)) / na
            gb = dlo / _expm1(ar) / nb
        else:  # KTO; na holds the labels (1.0 desirable)
            x = a - b
            d = na > 0.5
            sign = tl.where(d, -beta, beta)
            if LTYPE == 0:  # kto
                kl = tl.load(kl_ptr)
                s = tl.sigmoid(-sign * (x - kl))
                per = 1.0 - s
            else:  # apo_zero_unpaired
                s = tl.sigmoid(beta * x)
                per = tl.where(d, 1.0 - s, s)
            w = tl.where(d, w_d, w_u)
            ga = w * sign * s * (1.0 - s) / N
            gb = -ga
            per = w * per
        tl.store(per_ptr + offs, per, mask=m)
        tl.store(ga_ptr + offs, ga, mask=m)
        tl.store(gb_ptr + offs, gb, mask=m)
        total += tl.sum(tl.where(m, per, 0.0), 0)
    loss = total / N
    if NLL:
        loss -= cpo_alpha * sum_a / tokens
    tl.store(loss_ptr, loss)


def sibling_loss_and_grads(
    spec: SiblingSpec,
    a: torch.Tensor,
    b: torch.Tensor,
    na: torch.Tensor,
    nb: torch.Tensor,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss with its NLL term, per-example losses, dloss/da, dloss/db); one launch.
    Inputs in the accumulation dtype (float32, or float64)."""
    N, dtype, dev = a.shape[0], a.dtype, a.device
    fam = FAMILIES[spec.family]
    args = [x.contiguous() for x in (a, b, na, nb)]
    kl_t = (kl if kl is not None else a.new_zeros(())).to(dtype).reshape(1)
    params = (
        spec.beta, spec.label_smoothing, spec.simpo_gamma, spec.alpha, spec.cpo_alpha,
        spec.desirable_weight, spec.undesirable_weight,
    )  # fmt: skip
    out = [torch.empty(N, dtype=dtype, device=dev) for _ in range(3)]
    loss = torch.empty(1, dtype=dtype, device=dev)
    with device_guard(a):
        _sibling_loss_kernel[(1,)](
            *args, kl_t, device_constants(tuple(map(float, params)), dtype, dev), loss, *out, N,
            KIND=fam.kernel, LTYPE=fam.loss_types.index(spec.loss_type),
            SHAPED=spec.family == "cpo" and spec.alpha != 0.0,
            NLL=spec.family == "cpo" and spec.cpo_alpha != 0.0,
            ACC=tl_acc_dtype(dtype), BLOCK=min(1024, max(16, triton.next_power_of_2(N))),
        )  # fmt: skip
    return (loss[0], *out)
