"""The chunk runner of the fused linear losses (`linear_dpo.py`): any loss of per-sequence sums.

`run(...)` takes the last hidden states of a [chosen (P); rejected (P)] batch, the LM head and a
`PairLoss` (the loss's gradient with respect to the per-sequence log-prob sums), and computes the
sums, the per-token log-probs (and, when asked, the token statistics trainers log) and the
gradients of hidden, weight and bias, keeping at most `budget` bytes of logits alive:

- pairs go in chunks whose float32 logits fit: matmul 1 projects the chunk; one read of the
  logits folds each row's log-sum-exp (and statistics) and turns the row into q = onehot -
  softmax in place; the chunk's sums give the loss gradient g of each row (dz = g * q), and
  matmuls 2 and 3 give dh = g * (q @ W) and dW += q.T @ (g * h): 3 matmuls over the counted
  tokens, g applied to their small operands rather than to the logits (CUDA, bf16: dz kept
  for consecutive chunks and dW made once for them, `DeferredDW`);
- a pair that does not fit alone goes in token x vocabulary tiles, with the logits recomputed for
  the gradient (4 matmuls);
- a loss whose per-pair gradient needs every pair's sums (`PairLoss.coupled`) takes that tiled
  route for the whole batch: all sums first, then the gradient; so do float16 inputs on CUDA,
  whose gradient tiles are rounded to float16 for the matmuls: the batch's largest loss factor,
  known then, scales them into float16's range (`Grads.lift`).
Row kernels per backend: `linear_dpo_rows.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

from ._autograd import refuse_double_backward
from .common import LogitTransform, acc_dtype, cast_to, no_autocast, stats_dtypes
from .linear_dpo_rows import VOCAB_BLOCK, Fold, Rows

# Bytes of float32 logits alive at once (the chunk buffer), by device type. CPU: 64 MiB holds one
# pair of 2 x 192 counted tokens at V = 32000 (the extra peak then stays under half of CCE's).
# CUDA: 2 GiB holds the float32 logits of ~2090 tokens at V = 128256 and the bf16 dz of twice as
# many (`DeferredDW`), so that pairs of typical lengths stay on the 3-matmul route.
DEFAULT_MEMORY_BUDGET = {"cpu": 64 * 2**20, "cuda": 2 * 2**30}


class PairLoss(Protocol):
    """A loss of the per-sequence sums, as the runner needs it."""

    coupled: bool  # True: a pair's gradient needs every pair's sums (the two-pass route)

    def grad(self, k0: int, k1: int, sums: torch.Tensor) -> torch.Tensor:
        """[2c] gradient of the batch loss with respect to the sums of pairs [k0, k1) (c of them),
        given those sums as [chosen (c); rejected (c)]; coupled losses get (0, P) only."""

    def loss(self, pc: torch.Tensor, pr: torch.Tensor) -> torch.Tensor:
        """The batch loss (a scalar) of all P pairs' sums."""


# --------------------------------------------------------------------------------------------
# The driver


class _Batch:
    """The counted tokens of a [2P, T] batch in pair order (pair 0's chosen row, its rejected
    row, pair 1's chosen row, ...), so that pairs [k0, k1)'s tokens are one slice of each
    per-token tensor. All made before the step's one host sync (the per-pair counts), so that
    a chunk then needs one kernel (the gather of its hidden rows) before its first matmul: on
    CUDA the device idles from that sync until then."""

    def __init__(self, hidden: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor):
        B, T, H = hidden.shape
        self.hidden, self.P = hidden, B // 2
        dev = counted.device
        slots = torch.arange(B, device=dev).view(2, self.P).t().reshape(-1)  # [0, P, 1, P + 1..]
        by_slot = counted.index_select(0, slots)
        self.counts = by_slot.sum(-1)  # [2P] tokens of each (pair, side) slot
        pos = _nonzero(by_slot.reshape(-1))  # positions in the slots' [2P, T] layout (+ padding)
        slot, t = pos // T, pos % T
        row = slots[slot]  # the token's row in the batch
        self.flat = row * T + t  # [>= M] index in the [2P * T] tokens
        self.labels = labels.index_select(0, self.flat)
        self.pair, self.side = slot // 2, slot % 2  # side: 0 chosen, 1 rejected
        s0, s1, s2 = hidden.stride()
        self.src = self.row = None
        if T and s2 == 1 and s1 > 0 and s0 % s1 == 0:  # rows at a common stride: index_select
            self.rows = hidden.as_strided(((B - 1) * (s0 // s1) + T, H), (s1, 1))
            self.src = row * (s0 // s1) + t
        else:  # any other layout: a gather by (row, position)
            self.row, self.t = row, t
        self.offsets: list[int] = []  # [P + 1] start of each pair's tokens (`sync`)

    def sync(self) -> list[int]:
        """Reads the counts (the host sync); returns the tokens of each pair."""
        ends = torch.cumsum(self.counts, 0).tolist()
        self.offsets = [0, *ends[1::2]]
        return [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]

    def span(self, k0: int, k1: int) -> slice:
        """Pairs [k0, k1)'s tokens in the per-token tensors."""
        return slice(self.offsets[k0], self.offsets[k1])

    def hidden_rows(self, sl: slice) -> torch.Tensor:
        """[n, H] hidden rows of the tokens in `sl` (only those rows are copied)."""
        if self.src is not None:
            return self.rows.index_select(0, self.src[sl])
        return self.hidden[self.row[sl], self.t[sl]]

    def row_ids(self, sl: slice, k0: int, k1: int) -> torch.Tensor:
        """[n] row within pairs [k0, k1) of each token in `sl`: 0..c-1 chosen, c..2c-1
        rejected (the order of the sums `PairLoss.grad` takes)."""
        return torch.add(self.pair[sl], self.side[sl], alpha=k1 - k0).sub_(k0)


class Grads:
    """Gradient buffers in the accumulation dtype, as the backward takes them (`scaled_grads`
    rounds them to the inputs' dtype once, after the incoming scale): dh [2P * T, H]
    (contiguous), dw [V, H] and db [V]; None where not wanted."""

    def __init__(self, hidden, weight, bias, acc, wants, factor: float = 1.0):
        self.factor = factor  # what the gradients made from `Rows.grad`'s tiles lack
        self.dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device).view(
            -1, hidden.shape[-1]
        ) if wants[0] else None  # fmt: skip
        # No zero fill (2 GiB at V = 128256, H = 4096): the first pass over the vocabulary writes dw
        dw = torch.empty(weight.shape, dtype=acc, device=weight.device) if wants[1] else None
        self.dw, self.dw_fresh = dw, True
        use_b = wants[2] and bias is not None
        self.db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if use_b else None

    def lift(self, g: torch.Tensor) -> torch.Tensor:
        """g [n] (the loss factors of every row, before any gradient tile) times the power of two
        that brings its largest magnitude to 2^14, the results' factor divided by it: the
        float16 tiles g * q (|q| <= 1) then use float16's range, where at the loss's scale
        (g ~ beta / P) most of a row's g * softmax sank into its subnormals or to 0. One host
        sync (the two-pass route's, once per call)."""
        top = g.abs().max().item() if g.numel() else 0.0
        if not 0 < top < math.inf:
            return g
        lift = 2.0 ** min(100, 14 - math.ceil(math.log2(top)))
        self.factor /= lift
        return g * lift

    def done_pass(self) -> None:
        """One pass over the whole vocabulary has written dw: add to it from now on."""
        self.dw_fresh = False

    def put_dh(self, idx: torch.Tensor, dh: torch.Tensor) -> None:
        """Writes the dh rows [n, H] (accumulation dtype) of the flat token indices idx."""
        if self.factor != 1:
            dh.mul_(self.factor)
        self.dh.index_copy_(0, idx, dh)

    def finish(self) -> None:
        if self.dw is not None and self.dw_fresh:  # no token counted anywhere
            self.dw.zero_()
        if self.factor != 1:
            for t in (self.dw, self.db):
                if t is not None:
                    t.mul_(self.factor)


@dataclasses.dataclass
class Output:
    """What `run` computes. tok and stats are flat over the [2P * T] tokens (0 where not
    counted); stats: (entropy, mean logit, is_top1, log_sum_sq) or None."""

    sums: torch.Tensor  # [2P] per-sequence log-prob sums, [chosen; rejected]
    grads: Grads
    tok: torch.Tensor
    stats: tuple[torch.Tensor, ...] | None


class DeferredDW:
    """CUDA route, bf16 (`Rows.dz_kernel`): the dz of consecutive chunks (inputs' dtype)
    and their hidden rows, kept until `capacity` tokens, then dW (+)= dz.T @ h for all of them in
    one matmul. Each dW matmul reads and writes the whole float32 dW (2 GiB at V = 128256,
    H = 4096), so it is made once per `capacity` tokens rather than once per chunk."""

    def __init__(self, rows: Rows, grads: Grads, weight: torch.Tensor, capacity: int):
        V, H = weight.shape
        self.rows, self.grads, self.weight = rows, grads, weight
        self.dz = torch.empty(capacity, rows.padded(V), dtype=weight.dtype, device=weight.device)
        self.h = torch.empty(capacity, H, dtype=weight.dtype, device=weight.device)
        self.filled = 0

    def take(self, h: torch.Tensor) -> torch.Tensor:
        """An [n, V] buffer for the dz of the n rows h (kept with it), flushing first if full."""
        n, V = h.shape[0], self.weight.shape[0]
        if self.filled + n > self.dz.shape[0]:
            self.flush()
        self.h[self.filled : self.filled + n] = h
        self.filled += n
        return self.dz[self.filled - n : self.filled, :V]

    def flush(self) -> None:
        n, grads = self.filled, self.grads
        if n:
            dz = self.dz[:n, : self.weight.shape[0]]
            self.rows.backprop(dz, self.h[:n], self.weight, 0, None, grads.dw, None,
                               grads.dw_fresh)  # fmt: skip
            grads.done_pass()
        self.filled = 0


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a flat mask, first in a [mask.numel()] tensor (the rest
    0): `nonzero_static` needs no host sync (`nonzero` waits for the count), where this build
    has it for the device, so that it is queued before the step's one sync."""
    try:
        return torch.nonzero_static(mask, size=mask.numel(), fill_value=0).squeeze(1)
    except NotImplementedError:
        return mask.nonzero().squeeze(1)


def _tile_shape(n_tokens: int, vocab: int, budget_logits: int) -> tuple[int, int]:
    """(token tile, vocabulary block) of the recompute route within budget_logits logits."""
    block = min(vocab, VOCAB_BLOCK, max(1, budget_logits))
    return max(1, min(n_tokens, budget_logits // block)), block


def _row_sums(tok: torch.Tensor, seg: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row sums of the token log-probs, added up in float64 and rounded once: a running
    float32 sum of hundreds of terms near -10 is off by ~1e-4, which beta * (pc - pr) carries
    into the loss."""
    out = torch.zeros(rows, dtype=torch.float64, device=tok.device)
    return out.index_add_(0, seg, tok.double()).to(tok.dtype)


class _Runner:
    """One call's state: the batch, the row kernels, the gradient and token output buffers."""

    def __init__(self, rows, batch, grads, weight, bias, buf, budget_logits, loss, stats,
                 deferred=None):  # fmt: skip
        self.rows, self.batch, self.grads = rows, batch, grads
        self.weight, self.bias, self.buf = weight, bias, buf
        self.budget_logits, self.loss, self.deferred = budget_logits, loss, deferred
        n, acc, dev = batch.hidden.shape[0] * batch.hidden.shape[1], buf.dtype, buf.device
        self.tok = torch.zeros(n, dtype=acc, device=dev)
        self.stats = None
        if stats:
            self.stats = [torch.zeros(n, dtype=d, device=dev) for d in stats_dtypes(acc)]

    def _outputs(self, idx, y, f: Fold) -> torch.Tensor:
        """Writes the chunk's token outputs; returns its token log-probs."""
        tok = f.target - f.lse()
        self.tok.index_copy_(0, idx, tok)
        if self.stats is not None:
            for out, v in zip(self.stats, f.token_stats(self.weight.shape[0], y), strict=True):
                out.index_copy_(0, idx, v)
        return tok

    def _dh(self, n, h):
        """A chunk's (tile's) dh, written by the first vocabulary block's matmul."""
        if self.grads.dh is None:
            return None
        return torch.empty(n, h.shape[1], dtype=self.buf.dtype, device=self.buf.device)

    def single_pass(self, k0: int, k1: int, grad_on: bool) -> torch.Tensor:
        """Pairs [k0, k1) whose logits fit the buffer: 3 matmuls. Returns the [2c] row sums."""
        rows, batch, grads = self.rows, self.batch, self.grads
        sl = batch.span(k0, k1)
        h = rows.rows_in(batch.hidden_rows(sl))
        n, V = h.shape[0], self.weight.shape[0]
        x = rows.tile(self.buf, n, V)
        rows.project(x, h, self.weight, self.bias, 0)  # launched first: the rest is small
        idx, y, seg = batch.flat[sl], batch.labels[sl], batch.row_ids(sl, k0, k1)
        f = Fold(n, x.dtype, x.device, self.stats is not None, rows.backend)
        # With gradient, x becomes q = onehot - softmax in the same read: dz = g * q, and g (the
        # loss's factor of each row, known once the sums are) scales the matmuls' operands. (CUDA,
        # bf16: x stays the logits, and backprop writes g * q in the inputs' dtype.)
        (rows.fold_softmax if grad_on else lambda *a: rows.fold(*a, 0))(x, y, f)
        sums = _row_sums(self._outputs(idx, y, f), seg, 2 * (k1 - k0))
        if not grad_on:
            return sums
        g = self.loss.grad(k0, k1, sums)[seg]
        dh = self._dh(n, h)
        if self.deferred is None:
            rows.backprop(x, h, self.weight, 0, dh, grads.dw, grads.db, grads.dw_fresh, g=g,
                          fold=(y, f))  # fmt: skip
            grads.done_pass()
        else:  # dz kept: dW later, with the next chunks' (DeferredDW.flush)
            rows.backprop(x, h, self.weight, 0, dh, None, grads.db, g=g, fold=(y, f),
                          dz=self.deferred.take(h))  # fmt: skip
        if dh is not None:
            grads.put_dh(idx, dh)
        return sums

    def recompute(self, k0: int, k1: int, grad_on: bool) -> torch.Tensor:
        """Pairs [k0, k1) in token x vocabulary tiles: log-sum-exps first, then each tile again
        for its gradient (4 matmuls). Returns the [2c] row sums."""
        rows, batch, grads, weight = self.rows, self.batch, self.grads, self.weight
        sl = batch.span(k0, k1)
        hid = batch.hidden_rows(sl)
        idx, y, seg = batch.flat[sl], batch.labels[sl], batch.row_ids(sl, k0, k1)
        n, V = idx.numel(), weight.shape[0]
        tile, block = _tile_shape(n, V, self.budget_logits)
        tiles = [(ts, min(n, ts + tile)) for ts in range(0, n, tile)]
        blocks = [(vs, min(V, vs + block)) for vs in range(0, V, block)]
        f = Fold(n, self.buf.dtype, self.buf.device, self.stats is not None, rows.backend)
        for ts, te in tiles:
            h = rows.rows_in(hid[ts:te])
            part = Fold(te - ts, f.m.dtype, f.m.device, f.stats, rows.backend)
            for vs, ve in blocks:
                x = rows.tile(self.buf, te - ts, ve - vs)
                rows.project(x, h, weight, self.bias, vs)
                rows.fold(x, y[ts:te], part, vs)
            for a, b in ((f.m, part.m), (f.s, part.s), (f.target, part.target)):
                a[ts:te] = b
            if f.stats:
                f.st[:, ts:te], f.arg[ts:te] = part.st, part.arg
        sums = _row_sums(self._outputs(idx, y, f), seg, 2 * (k1 - k0))
        if not grad_on:
            return sums
        g = self.loss.grad(k0, k1, sums)[seg]
        if rows.f16_tiles:
            g = grads.lift(g)
        lse = f.lse()
        for ts, te in tiles:
            h = rows.rows_in(hid[ts:te])
            dh = self._dh(te - ts, h)
            for vs, ve in blocks:
                x = rows.tile(self.buf, te - ts, ve - vs)
                rows.project(x, h, weight, self.bias, vs)
                local = torch.where((y[ts:te] >= vs) & (y[ts:te] < ve), y[ts:te] - vs, -1)
                rows.grad(x, local, g[ts:te], lse[ts:te])
                rows.backprop(x, h, weight, vs, dh, grads.dw, grads.db, grads.dw_fresh)
            grads.done_pass()
            if dh is not None:
                grads.put_dh(idx[ts:te], dh)
        return sums


def _chunks(pair_tokens: list[int], max_tokens: int) -> list[tuple[int, int, bool]]:
    """Consecutive pairs grouped while their tokens fit max_tokens: (k0, k1, fits)."""
    out, k0, total = [], 0, 0
    for k, n in enumerate(pair_tokens):
        if n > max_tokens:  # too long for the budget on its own: the recompute route
            if k > k0:
                out.append((k0, k, True))
            out.append((k, k + 1, False))
            k0, total = k + 1, 0
        elif total + n > max_tokens:
            out.append((k0, k, True))
            k0, total = k, n
        else:
            total += n
    if k0 < len(pair_tokens):
        out.append((k0, len(pair_tokens), True))
    return out


def run(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    counted: torch.Tensor,
    loss: PairLoss,
    tf: LogitTransform,
    budget: int,
    backend: str,
    wants: tuple[bool, bool, bool],
    stats: bool = False,
) -> Output:
    """Sums, token outputs and the gradients (those in `wants`: hidden, weight, bias) of `loss`
    for a validated [2P, T, H] batch; see the module docstring for the routes."""
    B, T, _ = hidden.shape
    P, V = B // 2, weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    # What needs no lengths first: the lengths are the step's one host sync, and on CUDA the
    # device idles from there until the first chunk's matmul is launched.
    rows = Rows(backend, hidden.dtype, hidden.device, tf)
    grads = Grads(hidden, weight, bias, acc, wants, rows.tile_factor)
    weight = weight.detach()
    bias = None if bias is None else bias.detach().to(acc)
    batch = _Batch(hidden.detach(), labels.reshape(B * T).long(), counted)
    pair_tokens = batch.sync()
    budget_logits = max(1, budget // rows.bytes_per_logit())
    grad_on = any(wants)
    plan = _chunks(pair_tokens, budget_logits // V)
    if grad_on and (loss.coupled or rows.f16_tiles):  # every pair's sums first, then gradients
        plan = [(0, P, False)]
    # One buffer for every chunk: the largest chunk's logits, or one tile of the recompute route.
    need = [sum(pair_tokens[k0:k1]) * V if fits else min(budget_logits, sum(pair_tokens[k0:k1]) * V)
            for k0, k1, fits in plan]  # fmt: skip
    buf = torch.empty(max(1, *need) + rows.slack(sum(pair_tokens)), dtype=acc, device=hidden.device)
    deferred = None
    fitting = [sum(pair_tokens[k0:k1]) for k0, k1, fits in plan if fits]
    if rows.dz_kernel and grads.dw is not None and fitting:  # (a dw buffer: grad_on)
        # dz of up to twice the chunk tokens the budget allows (Rows.bytes_per_logit counts it)
        capacity = min(sum(fitting), max(*fitting, 2 * (budget_logits // V)))
        deferred = DeferredDW(rows, grads, weight, capacity)
    runner = _Runner(rows, batch, grads, weight, bias, buf, budget_logits, loss, stats, deferred)
    sums = torch.empty(B, dtype=acc, device=hidden.device)
    for k0, k1, fits in plan:
        s = (runner.single_pass if fits else runner.recompute)(k0, k1, grad_on)
        sums[k0:k1], sums[P + k0 : P + k1] = s[: k1 - k0], s[k1 - k0 :]
    del runner.buf, buf
    if deferred is not None:
        deferred.flush()
        del runner.deferred, deferred
    grads.finish()
    return Output(sums, grads, runner.tok, None if runner.stats is None else tuple(runner.stats))


def loss_outputs(hidden, weight, bias, labels, counted, loss_fn, tf, budget, backend, wants,
                 stats, compute_dtype) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """`run` packed as op outputs, on hidden, weight and bias cast to compute_dtype (None: as
    they are; the cast copies live for this call only): (loss, sums [2P], token log-probs
    [2P, T], the four token statistics [2P, T] ([0] each without stats), dh, dw, db
    (accumulation dtype; each [0] where not in `wants`)). Every output is its own tensor (op
    outputs may not alias each other)."""
    with no_autocast(hidden):
        h, w, b = cast_to(compute_dtype, hidden, weight, bias)
        out = run(h, w, b, labels, counted, loss_fn, tf, budget, backend, wants, stats)
    P = hidden.shape[0] // 2
    loss = loss_fn.loss(out.sums[:P], out.sums[P:])
    token_stats = [hidden.new_empty(0) for _ in range(4)]
    if stats:
        token_stats = [t.view(labels.shape) for t in out.stats]
    dh, dw, db = out.grads.dh, out.grads.dw, out.grads.db
    grads = (
        hidden.new_empty(0) if dh is None else dh.view(hidden.shape),
        hidden.new_empty(0) if dw is None else dw,
        hidden.new_empty(0) if db is None else db,
    )
    return loss, out.sums, out.tok.view(labels.shape), *token_stats, *grads


def save_grads(ctx, grads: tuple[torch.Tensor, ...], wants: tuple[bool, ...],
               inputs: tuple[torch.Tensor | None, ...]) -> None:  # fmt: skip
    """Keeps the gradients made in the forward (accumulation dtype) for `scaled_grads`, which
    rounds them to the dtypes of `inputs` (as given to the op, before any `compute_dtype` cast).
    Saved (not kept as attributes) so that autograd frees them right after the backward call: in
    place (float32 inputs), the gradient handed to AccumulateGrad is then its only reference, and
    becomes .grad without a copy."""
    ctx.save_for_backward(*grads)
    ctx.wanted = tuple(wants)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)  # (hidden, weight, bias)


_CAST_BLOCK = 1 << 22  # elements of the CPU backward's float32 temporaries (16 MiB)


def _scaled(g: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g * s, s in g's (the accumulation) dtype, rounded once to `dtype` (the input's): in place
    when that is g's, with no pass over g when s == 1 (the usual ``loss.backward()``); else in
    the same pass as the rounding, into a new tensor (bf16/fp16 inputs: one read of the float32
    gradient, where a cast in the forward and a scale here were two). On CUDA the kernel reads s
    on the device (`ops/triton_scale.py`): asking the host would wait for the whole step to
    finish before the backward could go on."""
    s = s.to(g.dtype)
    if g.device.type == "cuda":  # (g: a contiguous gradient buffer; s: the scalar loss's)
        from .ops.triton_scale import scale

        return scale(g, s.reshape(1), dtype)
    one = bool((s == 1).all())
    if dtype == g.dtype:
        return g if one else g.mul_(s)
    if one:
        return g.to(dtype)
    out = torch.empty_like(g, dtype=dtype)
    flat, step = g.view(-1), _CAST_BLOCK  # float32 products in blocks, not one the size of dW
    for a in range(0, flat.numel(), step):
        out.view(-1)[a : a + step] = flat[a : a + step] * s
    return out


def scaled_grads(ctx, grad_loss: torch.Tensor) -> list[torch.Tensor | None]:
    """The saved (hidden, weight, bias) gradients times the incoming one, in the inputs' dtypes:
    in place where they are in that dtype and the graph is freed after this call (nothing else
    holds them); out of place when the graph is retained (a later call needs them unscaled, and
    .grad must not share their storage: through a view's backward, x.view(...) or w.t(), it
    would take the returned tensor uncopied, and its += or an in-place clip would write them),
    and when traced (torch.compile, AOT autograd: the incoming gradient is then a fake or
    functional tensor, whose value no branch may look at) or on meta tensors."""
    if torch.is_grad_enabled():  # create_graph: these gradients have no derivative of their own
        refuse_double_backward("the fused LM-head losses (linear_*_loss)")
    grads, dtypes, wanted = ctx.saved_tensors, ctx.dtypes, ctx.wanted
    if (
        torch.compiler.is_compiling()
        or type(grad_loss) is not torch.Tensor
        or grad_loss.is_meta
        or _keeps_graph()
    ):
        out = [_times(g, grad_loss, d) for g, d in zip(grads, dtypes, strict=True)]
    else:  # .data: no version bump of a saved tensor
        out = [_scaled(g.data, grad_loss.detach(), d) if want else None
               for g, want, d in zip(grads, wanted, dtypes, strict=True)]  # fmt: skip
    return [g if want else None for g, want in zip(out, wanted, strict=True)]


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph); True where this torch cannot
    tell (then every call is out of place: correct, one copy more)."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def _times(g: torch.Tensor, s: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """g * s out of place, in g's (the accumulation) dtype, rounded once to `dtype` (the
    input's; s not rounded to float16 first: a GradScaler's 65536 is inf there)."""
    return (g * s.to(g.dtype)).to(dtype or g.dtype)


class LinearLossFunction(torch.autograd.Function):
    """`loss_outputs` as an autograd function, for losses given as Python objects
    (`linear_pair_loss`; `linear_dpo` is the `dpo_kernels::linear_dpo` custom op). Forward: the
    loss of `make_loss(accumulation dtype)` (a `PairLoss`) with the gradients of hidden, weight
    and bias computed alongside and kept; backward: those gradients times the incoming one.
    Returns `loss_outputs` without the gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, counted, make_loss, tf, budget, backend,
                grad_on, stats, compute_dtype):  # fmt: skip
        wants = tuple(grad_on and w for w in ctx.needs_input_grad[:3])
        loss_fn = make_loss(acc_dtype(compute_dtype or hidden.dtype))
        *outs, dh, dw, db = loss_outputs(hidden, weight, bias, labels, counted, loss_fn, tf,
                                         budget, backend, wants, stats, compute_dtype)  # fmt: skip
        save_grads(ctx, (dh, dw, db), wants, (hidden, weight, bias))
        ctx.mark_non_differentiable(*outs[1:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return *scaled_grads(ctx, grad_loss), *(None,) * 9
