"""The fused linear DPO loss: hidden states + LM head + DPO loss, gradients made in the forward.

`linear_dpo_loss(hidden, weight, labels, ...)` takes the last hidden states of a concatenated
[chosen (P); rejected (P)] batch and the LM head, and returns what `dpo_loss` returns. The
[tokens, vocab] logits never exist at once: the counted tokens are processed in chunks of whole
pairs whose float32 logits fit `memory_budget`. Once a chunk's logits are projected (matmul 1),
each pair's log-prob sums are known, so the loss gradient g of each pair is too (the loss family's
closed forms, called on the chunk's sums); dz = g * (onehot - softmax) overwrites the logits in
place and gives dh = dz @ W (matmul 2) and dW += dz.T @ h (matmul 3). That is 3 matmuls over the
counted tokens, against 4 for `linear_sequence_logprobs` + `dpo_loss` (whose backward recomputes
the logits). The backward only scales the stored gradients by the incoming one.

Two routes recompute the logits (4 matmuls, still bounded by the budget):
- a pair whose counted tokens alone do not fit the budget is done in token x vocabulary tiles: a
  first pass folds the log-sum-exps, a second recomputes each tile and forms its gradient;
- loss types whose per-pair gradient depends on the other pairs' log-probs (`aot`,
  `aot_unpaired`: they sort the whole batch) take a two-pass route: every pair's sums first, then
  the loss gradient of the whole batch, then the tiles again for dh and dW.
`sft` is normalized by the batch's chosen tokens, which are known before any matmul, so it stays
on the 3-matmul route.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .backend import dpo_loss_kernel as _dpo_loss_kernel
from .backend import resolve_backend
from .common import DPOLossSpec, LogitTransform
from .losses import DPOLossOutput, dpo_loss, make_spec
from .ops import reference
from .validation import check_linear_inputs as _check_linear_inputs
from .validation import check_values as _check_values

# Bytes of float32 logits alive at once (the chunk buffer), by device type. CPU: 64 MiB holds one
# pair of 2 x 192 counted tokens at V = 32000 (the extra peak then stays under half of CCE's).
# CUDA: 2 GiB holds ~2800 tokens at V = 128256 (float32 logits and their bf16 gradient), so that
# pairs of typical lengths stay on the 3-matmul route.
DEFAULT_MEMORY_BUDGET = {"cpu": 64 * 2**20, "cuda": 2 * 2**30}
# Loss types whose per-pair gradient needs every pair's log-probs first: the two-pass route.
BATCH_COUPLED = frozenset(("aot", "aot_unpaired"))
# Loss types normalized by a batch total that is known before the forward (chosen token counts).
COUNT_COUPLED = frozenset(("sft",))
# Vocabulary block of the recompute route's tiles, and of upcast weight blocks (bf16 on CPU).
_VOCAB_BLOCK = 4096


# --------------------------------------------------------------------------------------------
# Row work on a float32 (float64) tile of projected logits x [n, nv]: one backend each.


class _Rows:
    """The two row kernels and the three matmuls of one backend, for one dtype and transform."""

    def __init__(self, backend: str, dtype: torch.dtype, device: torch.device, tf: LogitTransform):
        self.backend, self.dtype, self.tf = backend, dtype, tf
        self.acc = reference.acc_dtype(dtype)
        self.reduced = self.acc != dtype
        self.cuda = device.type == "cuda"
        if backend == "triton":
            from .ops import triton_linear_logprobs as tl_ops

            self._tl = tl_ops
            self._params = tl_ops._params(tf, torch.empty(0, dtype=dtype, device=device))

    def tile(self, buf: torch.Tensor, n: int, nv: int) -> torch.Tensor:
        """An [n, nv] tile in `buf`; for the Triton kernels its rows are padded to whole 16-byte
        vectors, which they read and write (`slack` elements of `buf` cover the padding)."""
        if self.backend != "triton":
            return buf[: n * nv].view(n, nv)
        width = self._tl.padded(nv)
        return buf[: n * width].view(n, width)[:, :nv]

    def slack(self, n_rows: int) -> int:
        """Extra elements of the tile buffer that padded rows of `n_rows` tokens need."""
        return n_rows * self._tl._ROW_ALIGN if self.backend == "triton" else 0

    def bytes_per_logit(self) -> int:
        """Bytes of working memory per projected logit (the float32 tile, and what rides on it)."""
        size = torch.empty(0, dtype=self.acc).element_size()
        if self.backend == "reference":
            size *= 3  # plain PyTorch: the transformed logits and the softmax are temporaries
        if self.reduced and self.cuda:
            size += torch.empty(0, dtype=self.dtype).element_size()  # dz in the inputs' dtype
        return size

    # -- matmuls ----------------------------------------------------------------------------

    def rows_in(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden rows in the dtype the matmuls take (bf16 on CPU: float32, no bf16 BLAS form)."""
        return h.to(self.acc) if self.reduced and not self.cuda else h

    def _blocks(self, weight: torch.Tensor, vs: int, nv: int):
        """(offset in the tile, weight rows) of vocabulary [vs, vs + nv), upcast per block on CPU
        for reduced dtypes (never the whole head at once)."""
        if not (self.reduced and not self.cuda):
            yield 0, weight[vs : vs + nv]
            return
        for s in range(0, nv, _VOCAB_BLOCK):
            yield s, weight[vs + s : vs + min(nv, s + _VOCAB_BLOCK)].to(self.acc)

    def project(self, x, h, weight, bias, vs) -> None:
        """x [n, nv] <- h @ weight[vs:vs + nv].T + bias, in the accumulation dtype."""
        nv = x.shape[1]
        for s, w in self._blocks(weight, vs, nv):
            out = x if w.shape[0] == nv else x[:, s : s + w.shape[0]]
            if self.reduced and self.cuda:  # float32 result, the out-dtype matmul version-gated
                self._tl._project(h, w, None, out)
            elif out is x:
                torch.mm(h, w.T, out=out)
            else:
                out.copy_(h @ w.T)
        if bias is not None:
            x.add_(bias[vs : vs + nv])

    def backprop(self, x, h, weight, vs, dh, dw, db, dw_fresh=False) -> None:
        """dh (+)= x @ W_blk, dw[blk] (+)= x.T @ h, db[blk] += sum of x (those not None). dh is
        written, not added to, at vs == 0 and dw with dw_fresh: no zero fill (CPU; on CUDA the
        buffers start at zero and are always added to)."""
        nv = x.shape[1]
        if self.reduced and self.cuda:
            xd = x.to(self.dtype)
            w = weight[vs : vs + nv]
            if dh is not None:
                self._tl._addmm_acc(dh, xd, w)
            if dw is not None:
                self._tl._addmm_acc(dw[vs : vs + nv], xd.T, h)
        else:
            for s, w in self._blocks(weight, vs, nv):
                xs = x if w.shape[0] == nv else x[:, s : s + w.shape[0]]
                if dh is not None:
                    if vs == 0 and s == 0:
                        torch.mm(xs, w, out=dh)
                    else:
                        dh.addmm_(xs, w)
                if dw is not None:
                    rows = dw[vs + s : vs + s + w.shape[0]]
                    if dw_fresh:
                        torch.mm(xs.T, h, out=rows)
                    else:
                        rows.addmm_(xs.T, h)
        if db is not None:
            db[vs : vs + nv] += x.sum(0)

    # -- row kernels ------------------------------------------------------------------------

    def lse(self, x: torch.Tensor, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-sum-exp [n], label logit [n]) of z(x); local: label column, -1 if not in x."""
        tf = self.tf
        if self.backend == "cpu":
            op = torch.ops.dpo_kernels_cpu.linear_dpo_rows_lse
            return op(x, local, tf.logit_scale, tf.softcap, tf.temperature)
        if self.backend == "triton":
            n, nv = x.shape
            acc, dev = x.dtype, x.device
            if n == 0:  # no rows: no launch (an empty grid)
                return x.new_zeros(0), x.new_zeros(0)
            m = torch.full((n,), float("-inf"), dtype=acc, device=dev)
            s, target, dummy = (torch.zeros(k, dtype=acc, device=dev) for k in (n, n, 1))
            block, warps = self._tl.launch_config(nv, x.element_size())
            vec = self._tl.vec_elems(x.element_size())
            with self._tl.device_guard(x):
                self._tl._linear_fwd_kernel[(n,)](
                    x, local, m, s, dummy, dummy, dummy, dummy.long(), target, self._params, nv,
                    -(-nv // vec) * vec, x.stride(0), 0, HAS_SOFTCAP=tf.softcap is not None,
                    STATS=False, ACC=self._tl.tl_acc_dtype(acc), BLOCK_V=block, VEC=vec,
                    num_warps=warps,
                )  # fmt: skip
            return m + torch.log(s), target
        z = _transform(x, tf)
        here = local >= 0
        target = torch.where(here, z.gather(1, local.clamp(min=0)[:, None])[:, 0], 0.0)
        return torch.logsumexp(z, 1), target

    def grad(self, x, local, g, lse) -> None:
        """x <- g * (onehot(local) - softmax(z(x))) * dz/dx in place, per row."""
        tf = self.tf
        if self.backend == "cpu":
            op = torch.ops.dpo_kernels_cpu.linear_dpo_rows_grad
            op(x, local, g, lse, tf.logit_scale, tf.softcap, tf.temperature)
            return
        if self.backend == "triton":
            n, nv = x.shape
            if n == 0:
                return
            block, warps = self._tl.launch_config(nv, x.element_size())
            vec = self._tl.vec_elems(x.element_size())
            with self._tl.device_guard(x):
                self._tl._linear_bwd_kernel[(n, -(-nv // block))](
                    x, local, g.contiguous(), lse.contiguous(), self._params, -(-nv // vec) * vec,
                    x.stride(0), 0, HAS_SOFTCAP=tf.softcap is not None,
                    ACC=self._tl.tl_acc_dtype(x.dtype), BLOCK_V=block, VEC=vec, num_warps=warps,
                )  # fmt: skip
            return
        slope = tf.factor
        if tf.softcap is not None:
            slope = tf.factor * (1 - torch.tanh(x / tf.softcap) ** 2)
        z = _transform(x, tf)
        cols = torch.arange(x.shape[1], device=x.device)
        onehot = (cols == local[:, None]).to(x.dtype)
        x.copy_(g[:, None] * (onehot - torch.exp(z - lse[:, None])) * slope)


def _transform(x: torch.Tensor, tf: LogitTransform) -> torch.Tensor:
    if tf.softcap is not None:
        x = tf.softcap * torch.tanh(x / tf.softcap)
    return x * tf.factor


# --------------------------------------------------------------------------------------------
# The driver


@dataclasses.dataclass
class _Batch:
    """Counted tokens of a [2P, T] batch, grouped by row (row-major), and the pair inputs."""

    hidden: torch.Tensor  # [2P, T, H], any strides (hidden[:, :-1] is not copied)
    labels: torch.Tensor  # [2P * T] int64
    flat: torch.Tensor  # [M] flat indices of the counted tokens
    offsets: list[int]  # [2P + 1] start of each row's tokens in `flat`
    P: int
    rc: torch.Tensor  # [P] reference sums (zeros if absent), accumulation dtype
    rr: torch.Tensor
    nc: torch.Tensor  # [P] counts, accumulation dtype
    nr: torch.Tensor

    def rows_of(self, idx: torch.Tensor) -> torch.Tensor:
        """[n, H] hidden rows of flat token indices (only those rows are copied)."""
        T = self.hidden.shape[1]
        return self.hidden[idx // T, idx % T]

    def tokens(self, k0: int, k1: int) -> torch.Tensor:
        """Flat indices of pairs [k0, k1)'s tokens: chosen rows, then rejected rows."""
        o, P = self.offsets, self.P
        return torch.cat([self.flat[o[k0] : o[k1]], self.flat[o[P + k0] : o[P + k1]]])

    def row_ids(self, k0: int, k1: int, device) -> torch.Tensor:
        """[tokens] row of each token within the chunk: 0..c-1 chosen, c..2c-1 rejected."""
        o, P = self.offsets, self.P
        n = [o[i + 1] - o[i] for i in (*range(k0, k1), *range(P + k0, P + k1))]
        return torch.repeat_interleave(
            torch.arange(len(n), device=device), torch.tensor(n, device=device)
        )


class _Grads:
    """Gradient buffers: dh [2P * T, H] (inputs' dtype, contiguous), dw [V, H] and db [V]
    (accumulation dtype, cast once at the end); None where not wanted."""

    def __init__(self, hidden, weight, bias, acc, wants, zero_fill):
        self.dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device).view(
            -1, hidden.shape[-1]
        ) if wants[0] else None  # fmt: skip
        dw = None
        if wants[1]:  # zero_fill False: the first full pass over the vocabulary writes it
            dw = (torch.zeros if zero_fill else torch.empty)(
                weight.shape, dtype=acc, device=weight.device
            )
        self.dw, self.dw_fresh = dw, not zero_fill
        use_b = wants[2] and bias is not None
        self.db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if use_b else None

    def done_pass(self) -> None:
        """One pass over the whole vocabulary has written dw: add to it from now on."""
        self.dw_fresh = False

    def finish(self) -> None:
        if self.dw is not None and self.dw_fresh:  # no token counted anywhere
            self.dw.zero_()


def _tile_shape(n_tokens: int, vocab: int, budget_logits: int) -> tuple[int, int]:
    """(token tile, vocabulary block) of the recompute route within budget_logits logits."""
    block = min(vocab, _VOCAB_BLOCK, max(1, budget_logits))
    return max(1, min(n_tokens, budget_logits // block)), block


def _row_sums(tok: torch.Tensor, seg: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row sums of the token log-probs, added up in float64 and rounded once: a running
    float32 sum of hundreds of terms near -10 is off by ~1e-4, which beta * (pc - pr) carries
    into the loss."""
    out = torch.zeros(rows, dtype=torch.float64, device=tok.device)
    return out.index_add_(0, seg, tok.double()).to(tok.dtype)


def _chunk_single_pass(rows, batch, grads, weight, bias, k0, k1, buf, grad_fn):
    """Pairs [k0, k1) whose logits fit `buf`: 3 matmuls. Returns the [2c] row sums."""
    idx = batch.tokens(k0, k1)
    seg = batch.row_ids(k0, k1, idx.device)
    y = batch.labels.index_select(0, idx)
    h = rows.rows_in(batch.rows_of(idx))
    n, V = idx.numel(), weight.shape[0]
    x = rows.tile(buf, n, V)
    rows.project(x, h, weight, bias, 0)
    lse, target = rows.lse(x, y)
    sums = _row_sums(target - lse, seg, 2 * (k1 - k0))
    if grad_fn is None:
        return sums
    g = grad_fn(k0, k1, sums)[seg]
    rows.grad(x, y, g, lse)
    dh = None
    if grads.dh is not None:
        dh = torch.zeros(n, h.shape[1], dtype=x.dtype, device=x.device)
    rows.backprop(x, h, weight, 0, dh, grads.dw, grads.db, grads.dw_fresh)
    grads.done_pass()
    if dh is not None:
        grads.dh.index_copy_(0, idx, dh.to(grads.dh.dtype))
    return sums


def _tiles(n, V, tile, block):
    for ts in range(0, n, tile):
        yield ts, min(n, ts + tile), [(vs, min(V, vs + block)) for vs in range(0, V, block)]


def _local(y, vs, ve):
    return torch.where((y >= vs) & (y < ve), y - vs, -1)


def _chunk_recompute(rows, batch, grads, weight, bias, k0, k1, buf, budget_logits, grad_fn):
    """Pairs [k0, k1) in token x vocabulary tiles: log-sum-exps first, then each tile again for
    its gradient (4 matmuls). grad_fn(k0, k1, sums) -> [2c] per-row loss gradients (None: the
    forward only). Returns the [2c] row sums."""
    idx = batch.tokens(k0, k1)
    seg = batch.row_ids(k0, k1, idx.device)
    y = batch.labels.index_select(0, idx)
    hid = batch.rows_of(idx)
    n, V = idx.numel(), weight.shape[0]
    tile, block = _tile_shape(n, V, budget_logits)
    acc = buf.dtype
    lse = torch.empty(n, dtype=acc, device=buf.device)
    target = torch.zeros(n, dtype=acc, device=buf.device)
    for ts, te, blocks in _tiles(n, V, tile, block):
        h = rows.rows_in(hid[ts:te])
        run = torch.full((te - ts,), float("-inf"), dtype=acc, device=buf.device)
        for vs, ve in blocks:
            x = rows.tile(buf, te - ts, ve - vs)
            rows.project(x, h, weight, bias, vs)
            lse_b, t_b = rows.lse(x, _local(y[ts:te], vs, ve))
            run = torch.logaddexp(run, lse_b)
            target[ts:te] += t_b
        lse[ts:te] = run
    sums = _row_sums(target - lse, seg, 2 * (k1 - k0))
    if grad_fn is None:
        return sums
    g = grad_fn(k0, k1, sums)[seg]
    for ts, te, blocks in _tiles(n, V, tile, block):
        h = rows.rows_in(hid[ts:te])
        dh = None
        if grads.dh is not None:
            dh = torch.zeros(te - ts, hid.shape[1], dtype=acc, device=buf.device)
        for vs, ve in blocks:
            x = rows.tile(buf, te - ts, ve - vs)
            rows.project(x, h, weight, bias, vs)
            rows.grad(x, _local(y[ts:te], vs, ve), g[ts:te], lse[ts:te])
            rows.backprop(x, h, weight, vs, dh, grads.dw, grads.db, grads.dw_fresh)
        grads.done_pass()
        if dh is not None:
            grads.dh.index_copy_(0, idx[ts:te], dh.to(grads.dh.dtype))
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


def _split_spec(
    spec: DPOLossSpec, kinds: frozenset
) -> tuple[DPOLossSpec | None, DPOLossSpec | None]:
    """(the loss types not in kinds, those in kinds) as two specs; None where empty."""
    parts = []
    for inside in (False, True):
        tw = [(t, w) for t, w in zip(spec.loss_types, spec.loss_weights, strict=True)
              if (t in kinds) == inside]  # fmt: skip
        parts.append(
            dataclasses.replace(spec, loss_types=tuple(t for t, _ in tw),
                                loss_weights=tuple(w for _, w in tw)) if tw else None
        )  # fmt: skip
    return parts[0], parts[1]


def _run(hidden, weight, bias, labels, counted, rc, rr, spec, tf, budget, backend, wants):
    """(loss, chosen sums [P], rejected sums [P], _Grads): everything the op computes."""
    B, T, _ = hidden.shape
    P, V = B // 2, weight.shape[0]
    acc = reference.acc_dtype(hidden.dtype)
    dev = hidden.device
    counts = counted.sum(-1)
    offsets = [0, *torch.cumsum(counts, 0).tolist()]
    batch = _Batch(
        hidden.detach(),
        labels.reshape(B * T).long(),
        counted.reshape(-1).nonzero().squeeze(1),
        offsets,
        P,
        torch.zeros(P, dtype=acc, device=dev) if rc is None else rc.detach().to(acc),
        torch.zeros(P, dtype=acc, device=dev) if rr is None else rr.detach().to(acc),
        counts[:P].to(acc),
        counts[P:].to(acc),
    )
    kernel = _dpo_loss_kernel(backend)
    rows = _Rows(backend, hidden.dtype, dev, tf)
    grads = _Grads(batch.hidden, weight, bias, acc, wants, zero_fill=rows.reduced and rows.cuda)
    weight = weight.detach()
    bias = None if bias is None else bias.detach().to(acc)
    budget_logits = max(1, budget // rows.bytes_per_logit())
    any_grad = any(wants)
    types = set(spec.loss_types)
    two_pass = any_grad and bool(types & BATCH_COUPLED)

    def loss_grads(k0, k1, pcs, prs, sp):
        c = slice(k0, k1)
        _, _, dpc, dpr = kernel(pcs, prs, batch.rc[c], batch.rr[c], batch.nc[c], batch.nr[c], sp)
        return dpc, dpr

    # Pair-separable part of the loss: its gradient on a chunk is the chunk's mean-loss gradient
    # times (chunk pairs / P). sft: a constant -weight / (chosen tokens of the batch).
    sep_spec, sft_spec = _split_spec(spec, COUNT_COUPLED)
    sft_dpc = None
    if sft_spec is not None:
        zero = torch.zeros(P, dtype=acc, device=dev)
        sft_dpc = loss_grads(0, P, zero, zero, sft_spec)[0]

    def chunk_grad(k0, k1, sums):
        c = k1 - k0
        pcs, prs = sums[:c], sums[c:]
        g = torch.zeros_like(sums)
        if sep_spec is not None:
            dpc, dpr = loss_grads(k0, k1, pcs, prs, sep_spec)
            g[:c] += dpc * (c / P)
            g[c:] += dpr * (c / P)
        if sft_dpc is not None:
            g[:c] += sft_dpc[k0:k1]
        return g

    pair_tokens = [offsets[k + 1] - offsets[k] + offsets[P + k + 1] - offsets[P + k]
                   for k in range(P)]  # fmt: skip
    plan = _chunks(pair_tokens, budget_logits // V)
    if two_pass:  # every pair's sums first (tiles), then the whole batch's loss gradient
        plan = [(0, P, False)]
    # One buffer for every chunk: the largest chunk's logits, or one tile of the recompute route.
    need = [sum(pair_tokens[k0:k1]) * V if fits else min(budget_logits, sum(pair_tokens[k0:k1]) * V)
            for k0, k1, fits in plan]  # fmt: skip
    buf = torch.empty(max(1, *need) + rows.slack(sum(pair_tokens)), dtype=acc, device=dev)
    pc = torch.empty(P, dtype=acc, device=dev)
    pr = torch.empty(P, dtype=acc, device=dev)
    for k0, k1, fits in plan:
        if two_pass:

            def full_grad(k0, k1, sums):
                dpc, dpr = loss_grads(0, P, sums[:P], sums[P:], spec)
                return torch.cat([dpc, dpr])

            fn = full_grad
        else:
            fn = chunk_grad if any_grad else None
        if fits:
            sums = _chunk_single_pass(rows, batch, grads, weight, bias, k0, k1, buf, fn)
        else:
            sums = _chunk_recompute(rows, batch, grads, weight, bias, k0, k1, buf,
                                    budget_logits, fn)  # fmt: skip
        pc[k0:k1], pr[k0:k1] = sums[: k1 - k0], sums[k1 - k0 :]
    del buf
    grads.finish()
    loss = kernel(pc, pr, batch.rc, batch.rr, batch.nc, batch.nr, spec)[0]
    return loss, pc, pr, grads


class _LinearDPOFunction(torch.autograd.Function):
    """Forward: the loss, with the gradients of hidden, weight and bias computed alongside and
    kept; backward: those gradients times the incoming one (in place the first time)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, counted, rc, rr, spec, tf, budget, backend,
                grad_on):  # fmt: skip
        wants = tuple(grad_on and w for w in ctx.needs_input_grad[:3])
        loss, pc, pr, grads = _run(
            hidden, weight, bias, labels, counted, rc, rr, spec, tf, budget, backend, wants
        )
        dw, db = grads.dw, grads.db
        empty = hidden.new_empty(0)
        grads = (
            empty if grads.dh is None else grads.dh.view(hidden.shape),
            empty if dw is None else (dw if dw.dtype == weight.dtype else dw.to(weight.dtype)),
            empty if db is None else db.to(bias.dtype),
        )
        # Saved (not kept as attributes) so that autograd frees them right after the backward
        # call: the gradient handed to AccumulateGrad is then its only reference, and becomes
        # .grad without a copy.
        ctx.save_for_backward(*grads)
        ctx.wanted = tuple(g is not empty for g in grads)
        ctx.scale = None
        ctx.mark_non_differentiable(pc, pr)
        return loss, pc, pr

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = ctx.saved_tensors
        if ctx.scale is None:  # first backward: scale in place (nothing else holds them yet)
            ctx.scale = grad_loss.detach().clone()
            if not bool((grad_loss == 1).all()):
                for g, want in zip(grads, ctx.wanted, strict=True):
                    if want:  # .data: no version bump, a retained graph can unpack them again
                        g.data.mul_(grad_loss.to(g.dtype))
            out = grads
        else:  # retain_graph: a later backward, relative to the scale applied the first time
            if not bool((ctx.scale != 0).all()):
                raise RuntimeError(
                    "linear_dpo_loss: a second backward after a first one with a zero incoming "
                    "gradient cannot be scaled; call linear_dpo_loss again"
                )
            out = [g * (grad_loss / ctx.scale).to(g.dtype) for g in grads]
        return *(g if want else None for g, want in zip(out, ctx.wanted, strict=True)), *(None,) * 9


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    spec: DPOLossSpec | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    backend: str | None = None,
) -> DPOLossOutput:
    """DPO loss of a [chosen (P); rejected (P)] batch from hidden states and the LM head, fused.

    hidden: [2P, T, H] last hidden states (bf16, fp16, fp32 or fp64), aligned with labels (for a
        causal LM: ``hidden[:, :-1]`` with ``labels[:, 1:]``); rows 0..P-1 are the chosen
        completions, rows P..2P-1 the rejected ones of the same pairs.
    weight, bias: the LM head ([V, H], optional [V]), same dtype as hidden.
    labels, mask, ignore_index: [2P, T] token ids; tokens equal to ignore_index or with mask 0
        (the prompt, padding) do not count.
    ref_chosen_logps, ref_rejected_logps: [P] reference sums (no gradient); both None for
        reference-free training.
    beta ... discopop_tau (or a prepared ``spec`` from `make_spec`): the loss, as in `dpo_loss`.
    logit_scale, softcap, temperature: z = logit_scale * softcap(hidden @ weight.T + bias) /
        temperature, as in `linear_sequence_logprobs`.
    memory_budget: bytes of float32 logits (working buffers included) alive at once; default
        `DEFAULT_MEMORY_BUDGET` (64 MiB on CPU, 2 GiB on CUDA). Pairs go in chunks that fit;
        a pair that does not fit alone is done in tiles with recompute.

    Returns `dpo_loss`'s `DPOLossOutput`; ``loss`` carries gradient to hidden, weight and bias,
    which were computed during this call (3 matmuls over the counted tokens; `aot` and
    `aot_unpaired` take a two-pass route with 4, see the module docstring) and are scaled by the
    incoming gradient in the backward. A frozen hidden or weight skips its matmul; under
    ``torch.no_grad`` only the logits are computed.
    """
    if spec is None:
        spec = make_spec(beta, loss_type, loss_weights, label_smoothing, f_divergence_type,
                         f_alpha_divergence_coef, discopop_tau)  # fmt: skip
    tf = LogitTransform(logit_scale, softcap, temperature)
    _check_linear_inputs(hidden, weight, bias, labels, mask, ignore_index, tf)
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(
            "hidden must be [2P, T, H]: P chosen rows then the P rejected rows of the same pairs; "
            f"got shape {tuple(hidden.shape)}"
        )
    if hidden.shape[0] == 0:
        raise ValueError("hidden has no rows: no pairs to compute a loss over")
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET.get(hidden.device.type, DEFAULT_MEMORY_BUDGET["cpu"])
    if not isinstance(memory_budget, int) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
    P = hidden.shape[0] // 2
    for name, t in (
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (P,)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [{P}] tensor (one sum per pair), got {got}")
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    name = resolve_backend(backend, hidden.device)
    _check_values(labels, mask, ignore_index, weight.shape[0])
    counted = reference.counted_tokens(labels, mask, ignore_index)
    transform = LogitTransform(
        float(logit_scale), None if softcap is None else float(softcap), float(temperature)
    )
    loss, pc, pr = _LinearDPOFunction.apply(
        hidden, weight, bias, labels, counted, ref_chosen_logps, ref_rejected_logps, spec,
        transform, memory_budget, name, torch.is_grad_enabled(),
    )  # fmt: skip
    counts = counted.sum(-1)
    out = dpo_loss(
        pc, pr, ref_chosen_logps, ref_rejected_logps, chosen_counts=counts[:P],
        rejected_counts=counts[P:], spec=spec, backend=name,
    )  # fmt: skip
    return out._replace(loss=loss)


def logits_bytes(tokens: int, vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the float32 logits of `tokens` counted tokens: what a memory_budget must hold for
    a chunk of them to go on the 3-matmul route (CPU backend)."""
    return tokens * vocab * torch.empty(0, dtype=reference.acc_dtype(dtype)).element_size()
