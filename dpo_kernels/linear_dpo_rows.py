"""The row work of the fused linear losses' chunk runner (`linear_dpo_chunks.py`), one backend
each, on a float32 (float64) tile of projected logits: `Fold` (running per-row log-sum-exp, label
logit and token statistics over vocabulary blocks) and `Rows` (the projection, the backward
matmuls and the row kernels that fold a tile and turn it into the logits' gradient).
Backends: "cpu" (C++ row kernels, csrc/linear_dpo_loss.cpp), "triton" (the fused head's Triton
row kernels), "reference" (plain PyTorch).
"""

from __future__ import annotations

import torch

from .common import LogitTransform, acc_dtype

# Vocabulary block of the recompute route's tiles, and of upcast weight blocks (bf16 on CPU).
VOCAB_BLOCK = 4096


class Fold:
    """Running per-row statistics of rows that come in vocabulary blocks: max, sum of exp, the
    label's logit and, with stats, what the token statistics need (see vec_rows.h's RowFold)."""

    def __init__(self, n: int, acc: torch.dtype, device, stats: bool, backend: str):
        self.m = torch.full((n,), float("-inf"), dtype=acc, device=device)
        self.s = torch.zeros(n, dtype=acc, device=device)
        self.target = torch.zeros(n, dtype=acc, device=device)
        k = n if stats else 0
        self.st = torch.zeros(3, k, dtype=acc, device=device)  # pz, zsum, sq
        # First argmax: -1 before any block (C++), 2**31 - 1 (Triton, see fold_block).
        first = -1 if backend == "cpu" else 2**31 - 1
        self.arg = torch.full((k,), first, dtype=torch.int64, device=device)
        self.stats = stats

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)

    def token_stats(self, vocab: int, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(entropy, mean logit, label is the first argmax, log sum_v p_v^2), one per row."""
        lse, log_s = self.lse(), torch.log(self.s)
        pz, zsum, sq = self.st.unbind(0)
        top1 = (self.arg == labels) & ~lse.isnan()  # a row with a NaN has no argmax
        return lse - pz / self.s, zsum / vocab, top1, torch.log(sq) - 2 * log_s


class Rows:
    """The row kernels and the three matmuls of one backend, for one dtype and transform."""

    def __init__(self, backend: str, dtype: torch.dtype, device: torch.device, tf: LogitTransform):
        self.backend, self.dtype, self.tf = backend, dtype, tf
        self.acc = acc_dtype(dtype)
        self.reduced = self.acc != dtype
        # The CUDA route (Triton backend on a CUDA device): bf16/fp16 matmuls with float32
        # results (cuBLAS out_dtype, the Triton module's helpers). The reference backend on CUDA
        # upcasts like the CPU route: it has no Triton module to ask.
        self.cuda = device.type == "cuda" and backend == "triton"
        # CUDA route, bf16/fp16: the whole-vocabulary gradient goes from the float32 logits to
        # dz in the inputs' dtype in one kernel (fold_softmax, backprop).
        self.dz_kernel = self.reduced and self.cuda
        if backend == "triton":
            from .ops import triton_linear_logprobs as tl_ops

            self._tl = tl_ops
            self._params = tl_ops.transform_params(tf, torch.empty(0, dtype=dtype, device=device))

    @property
    def tile_factor(self) -> float:
        """What `grad` leaves out of the gradient tiles and the results (dh, dW, db) are to be
        multiplied by: the transform's factor on the CUDA route with float16 inputs (see
        `triton_linear_logprobs.tile_factor`), else 1."""
        if self.backend != "triton":
            return 1.0
        return self._tl.tile_factor(self.tf, self.dtype, self.cuda)

    def tile(self, buf: torch.Tensor, n: int, nv: int) -> torch.Tensor:
        """An [n, nv] tile in `buf`; for the Triton kernels its rows are padded to whole 16-byte
        vectors, which they read and write (`slack` elements of `buf` cover the padding)."""
        if self.backend != "triton":
            return buf[: n * nv].view(n, nv)
        width = self.padded(nv)
        return buf[: n * width].view(n, width)[:, :nv]

    def padded(self, n_cols: int) -> int:
        """Row stride of an n_cols-wide buffer the Triton kernels write (whole 16-byte vectors)."""
        return self._tl.padded(n_cols) if self.backend == "triton" else n_cols

    def slack(self, n_rows: int) -> int:
        """Extra elements of the tile buffer that padded rows of `n_rows` tokens need."""
        return n_rows * self._tl.ROW_ALIGN if self.backend == "triton" else 0

    def bytes_per_logit(self) -> int:
        """Bytes of working memory per projected logit (the float32 tile, and what rides on it)."""
        size = torch.empty(0, dtype=self.acc).element_size()
        if self.backend == "reference":
            size *= 3  # plain PyTorch: the transformed logits and the softmax are temporaries
        if self.dz_kernel:  # dz in the inputs' dtype, kept for two chunks (`DeferredDW`)
            size += 2 * torch.empty(0, dtype=self.dtype).element_size()
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
        for s in range(0, nv, VOCAB_BLOCK):
            yield s, weight[vs + s : vs + min(nv, s + VOCAB_BLOCK)].to(self.acc)

    def project(self, x, h, weight, bias, vs) -> None:
        """x [n, nv] <- h @ weight[vs:vs + nv].T + bias, in the accumulation dtype."""
        nv = x.shape[1]
        for s, w in self._blocks(weight, vs, nv):
            out = x if w.shape[0] == nv else x[:, s : s + w.shape[0]]
            if self.reduced and self.cuda:  # float32 result, the out-dtype matmul version-gated
                self._tl.project(h, w, None, out)
            elif self.backend == "cpu":  # split by vocabulary over the threads (csrc/)
                torch.ops.dpo_kernels_cpu.vocab_blocked_mm(out, h, w)
            elif out is x:
                torch.mm(h, w.T, out=out)
            else:
                out.copy_(h @ w.T)
        if bias is not None:
            x.add_(bias[vs : vs + nv])

    def backprop(self, x, h, weight, vs, dh, dw, db, dw_fresh=False, g=None, fold=None,
                 dz=None) -> None:  # fmt: skip
        """dh (+)= x @ W_blk, dw[blk] (+)= x.T @ h, db[blk] += sum of x (those not None). dh is
        written, not added to, at vs == 0 and dw with dw_fresh: no zero fill. g [n]: the rows of
        x are to be scaled by g (x = the whole vocabulary): applied to h for dw and db, and to
        dh afterwards, not to the [n, V] tile; on CUDA with bf16/fp16, x is the tile of logits
        fold_softmax left, turned into g * q by the gradient kernel on its way to the inputs'
        dtype, which needs fold = (the rows' labels, their `Fold`), and is written to `dz` (an
        [n, nv] buffer in the inputs' dtype; a new one if None)."""
        nv = x.shape[1]
        if g is not None and self.dz_kernel:
            # x still holds the logits (see fold_softmax): one kernel reads them and writes
            # dz = g * q in the inputs' dtype, rounded once, as the dh and dw matmuls take it.
            # g goes into dz rather than onto h: g * h rounded to bf16 would be a second rounding.
            y, lse = fold[0], fold[1].lse()
            if dz is None:
                dz = torch.empty(x.shape[0], self.padded(nv), dtype=self.dtype,
                                 device=x.device)[:, :nv]  # fmt: skip
            if db is None:
                self.grad(x, y, g, lse, out=dz)
            else:  # db sums the float32 dz: written in place, rounded into dz
                self.grad(x, y, g, lse)
                dz.copy_(x)
            g = None
        if g is not None:
            assert vs == 0 and nv == weight.shape[0]
            hg = h * g[:, None].to(h.dtype)
            self.backprop(x, hg, weight, 0, dh, dw, None, dw_fresh)
            if dh is not None:
                dh.mul_(g[:, None])
            if db is not None:
                db.addmv_(x.T, g)
            return
        if self.reduced and self.cuda:
            xd = x.to(self.dtype) if dz is None else dz
            w = weight[vs : vs + nv]
            if dh is not None:
                self._tl.addmm_acc(dh, xd, w, fresh=vs == 0)
            if dw is not None:
                self._tl.addmm_acc(dw[vs : vs + nv], xd.T, h, fresh=dw_fresh)
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

    def fold(self, x: torch.Tensor, y: torch.Tensor, f: Fold, vs: int) -> None:
        """Folds x = logits of vocabulary [vs, vs + nv) into f; y: the rows' labels (global)."""
        tf = self.tf
        n, nv = x.shape
        if n == 0:
            return
        if self.backend == "cpu":
            torch.ops.dpo_kernels_cpu.linear_dpo_rows_fold(
                x, y, f.m, f.s, f.target, f.st, f.arg, vs, tf.logit_scale, tf.softcap,
                tf.temperature,
            )  # fmt: skip
            return
        if self.backend == "triton":
            pz, zsum, sq = f.st.unbind(0) if f.stats else (f.s,) * 3
            with self._tl.device_guard(x):
                self._tl.fold_tile(
                    x, y, f.m, f.s, pz, zsum, sq, f.arg if f.stats else y, f.target,
                    self._params, vs, tf.softcap is not None, f.stats,
                )  # fmt: skip
            return
        z = _transform(x, tf)
        local = y - vs
        here = (local >= 0) & (local < nv)
        f.target += torch.where(here, z.gather(1, local.clamp(0, nv - 1)[:, None])[:, 0], 0.0)
        m_blk = z.max(1).values
        m_new = torch.maximum(f.m, m_blk)
        shift = torch.where(m_new.isinf(), 0.0, m_new)
        scale = torch.exp(f.m - shift)
        e = torch.exp(z - shift[:, None])
        f.s.mul_(scale).add_(e.sum(1))
        if f.stats:
            pz, zsum, sq = f.st.unbind(0)
            pz.mul_(scale).add_(torch.where(e == 0, 0.0, e * z).sum(1))
            sq.mul_(scale * scale).add_((e * e).sum(1))
            zsum.add_(z.sum(1))
            arg_blk = vs + (z == m_blk[:, None]).to(torch.int8).argmax(1)
            tie = torch.where(m_blk == f.m, torch.minimum(f.arg, arg_blk), f.arg)
            f.arg.copy_(torch.where(m_blk > f.m, arg_blk, tie))
        f.m.copy_(m_new)

    def fold_softmax(self, x: torch.Tensor, y: torch.Tensor, f: Fold) -> None:
        """Folds whole rows x into a fresh f, then x <- (onehot(y) - softmax(z(x))) * dz/dx: the
        logits' gradient before each row's loss factor (C++: one read of x, one exp each)."""
        if self.backend == "cpu" and x.shape[0]:
            tf = self.tf
            torch.ops.dpo_kernels_cpu.linear_dpo_rows_fold_softmax(
                x, y, f.m, f.s, f.target, f.st, f.arg, tf.logit_scale, tf.softcap, tf.temperature
            )
            return
        self.fold(x, y, f, 0)
        if self.dz_kernel:
            # CUDA, bf16/fp16: x stays the logits, and backprop (given g) turns them into
            # g * q in the inputs' dtype in one kernel, no float32 q written in between.
            return
        self.grad(x, y, torch.ones_like(f.m), f.lse())

    def grad(self, x, local, g, lse, out=None) -> None:
        """x <- g * (onehot(local) - softmax(z(x))) * dz/dx / tile_factor in place, per row;
        with `out` (Triton: a buffer of x's shape, in x's dtype or the inputs'), written there
        instead."""
        tf = self.tf
        if self.tile_factor != 1:
            g = g / self.tile_factor
        if self.backend == "cpu":
            op = torch.ops.dpo_kernels_cpu.linear_dpo_rows_grad
            op(x, local, g, lse, tf.logit_scale, tf.softcap, tf.temperature)
            return
        if self.backend == "triton":
            if x.shape[0] == 0:
                return
            with self._tl.device_guard(x):
                self._tl.grad_tile(
                    x, x if out is None else out, local, g.contiguous(), lse.contiguous(),
                    self._params, 0, tf.softcap is not None,
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
