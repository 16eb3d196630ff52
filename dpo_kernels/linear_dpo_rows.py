"""The row work of the fused linear losses' chunk runner (`linear_dpo_chunks.py`), on a float32
(float64) tile of projected logits: `Fold` (running per-row log-sum-exp, label logit and token
statistics over vocabulary blocks) and `Rows` (the projection, the backward matmuls and the row
kernels that fold a tile and turn it into the logits' gradient). The row kernels are each
backend's (`fold_rows`, `fold_softmax_rows`, `grad_rows`, `project_rows`; contracts in
ops/reference.py): C++ in csrc/linear_dpo_loss.cpp, Triton in ops/triton_linear_logprobs.py.
"""

from __future__ import annotations

import torch

from .backend import kernels
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
        no_arg = kernels(backend).FOLD_NO_ARG  # first argmax before any block
        self.arg = torch.full((k,), no_arg, dtype=torch.int64, device=device)
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
        self.k = kernels(backend)
        self.acc = acc_dtype(dtype)
        self.reduced = self.acc != dtype
        # The CUDA route (Triton backend on a CUDA device): bf16/fp16 matmuls with float32
        # results (cuBLAS out_dtype, the Triton module's helpers). The reference backend on CUDA
        # upcasts like the CPU route: it has no Triton module to ask.
        self.cuda = device.type == "cuda" and backend == "triton"
        if backend == "triton":  # the CUDA route's matmuls and tile factor
            from .ops import triton_linear_logprobs as tl_ops

            self._tl = tl_ops

    @property
    def dz_kernel(self) -> bool:
        """CUDA route, bf16: the whole-vocabulary gradient goes from the float32 logits to dz in
        bf16 in one kernel (fold_softmax, backprop)."""
        return self.cuda and self.dtype == torch.bfloat16

    @property
    def f16_tiles(self) -> bool:
        """CUDA route, float16: the gradient tiles are rounded to float16 for the matmuls, lifted
        into its range by the batch's largest loss factor (the two-pass route, `Grads.lift`)."""
        return self.cuda and self.dtype == torch.float16

    @property
    def tile_factor(self) -> float:
        """What `grad` leaves out of the gradient tiles and the results (dh, dW, db) are to be
        multiplied by: the transform's factor on the CUDA route with float16 inputs (see
        `triton_linear_logprobs.tile_factor`), else 1."""
        if self.backend != "triton":
            return 1.0
        return self._tl.tile_factor(self.tf, self.dtype, self.cuda)

    def tile(self, buf: torch.Tensor, n: int, nv: int) -> torch.Tensor:
        """An [n, nv] tile in `buf`, its rows `padded(nv)` apart (`slack` elements of `buf`
        cover the padding)."""
        width = self.padded(nv)
        return buf[: n * width].view(n, width)[:, :nv]

    def padded(self, n_cols: int) -> int:
        """Row stride of an n_cols-wide buffer the row kernels write: a multiple of the backend's
        ROW_ALIGN (Triton: whole 16-byte vectors, which its kernels read and write)."""
        align = self.k.ROW_ALIGN
        return -(-n_cols // align) * align

    def slack(self, n_rows: int) -> int:
        """Extra elements of the tile buffer that padded rows of `n_rows` tokens need."""
        return n_rows * (self.k.ROW_ALIGN - 1)

    def bytes_per_logit(self) -> int:
        """Bytes of working memory per projected logit (the float32 tile, and what rides on it:
        plain PyTorch's temporaries, TILE_COPIES)."""
        size = torch.empty(0, dtype=self.acc).element_size() * self.k.TILE_COPIES
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
            self.k.project_rows(x if w.shape[0] == nv else x[:, s : s + w.shape[0]], h, w)
        if bias is not None:
            x.add_(bias[vs : vs + nv])

    def backprop(self, x, h, weight, vs, dh, dw, db, dw_fresh=False, g=None, fold=None,
                 dz=None) -> None:  # fmt: skip
        """dh (+)= x @ W_blk, dw[blk] (+)= x.T @ h, db[blk] += sum of x (those not None). dh is
        written, not added to, at vs == 0 and dw with dw_fresh: no zero fill. g [n]: the rows of
        x are to be scaled by g (x = the whole vocabulary): applied to h for dw and db, and to
        dh afterwards, not to the [n, V] tile; on CUDA with bf16, x is the tile of logits
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
        if x.shape[0]:
            self.k.fold_rows(x, y, f, vs, self.tf)

    def fold_softmax(self, x: torch.Tensor, y: torch.Tensor, f: Fold) -> None:
        """Folds whole rows x into a fresh f, then x <- (onehot(y) - softmax(z(x))) * dz/dx: the
        logits' gradient before each row's loss factor (the single pass; float16 on CUDA, whose
        tiles leave out `tile_factor`, takes the two-pass route)."""
        if self.dz_kernel:
            # CUDA, bf16: x stays the logits, and backprop (given g) turns them into
            # g * q in the inputs' dtype in one kernel, no float32 q written in between.
            self.fold(x, y, f, 0)
        else:
            self.k.fold_softmax_rows(x, y, f, self.tf)

    def grad(self, x, local, g, lse, out=None) -> None:
        """x <- g * (onehot(local) - softmax(z(x))) * dz/dx / tile_factor in place, per row;
        with `out` (Triton: a buffer of x's shape, in x's dtype or the inputs'), written there
        instead."""
        if self.tile_factor != 1:
            g = g / self.tile_factor
        self.k.grad_rows(x, local, g, lse, self.tf, out)
