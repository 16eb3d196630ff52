// Column kernels of the fused linear losses on CPU (dpo_kernels/linear_dpo_chunks.py).
//
// The Python driver projects one chunk of counted tokens into a single float32 (float64) tile
// x [n, V] with ATen matmuls, stored vocabulary-major (storage [V, n], x.t().is_contiguous(): the
// layout that matmul writes fastest); these three kernels do the per-token work in between:
//   linear_dpo_rows_fold: one read of x: folds each token's logits into a running log-sum-exp
//                         (and, when asked, the entropy / mean / argmax / sum p^2 statistics
//                         trainers log) and picks the label's z, x left intact; running state, so
//                         a token's vocabulary may come in blocks.
//   linear_dpo_rows_fold_softmax: the fold of whole vocabularies, with x <- q / factor, q =
//                         (onehot - softmax(z(x))) * dz/dx: the gradient before the loss's
//                         per-token factor, so the 3-matmul route reads its logits once; factor
//                         [n] per token (usually -1 / sum exp(z - shift)), which the caller
//                         folds into g, spares a second pass over x (see fold_softmax_cols).
//   linear_dpo_rows_grad: x <- g * (onehot - softmax(z(x))) * dz/dx, in place (one read, one
//                         write), once each pair's loss gradient g is known.
// z(x) is the logit transform of ops/reference.py::LogitTransform. One vector holds W consecutive
// tokens of one vocabulary entry (vec_cols.h); blocks of 4 W tokens are split over threads and each
// lane computes the same numbers wherever its token falls, so results do not depend on the thread
// count. (The op names keep "rows": they are the row work of the chunk runner.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.h"
#include "vec_cols.h"

namespace dpo_kernels {
namespace {

template <typename A>
LogitTransform<A> transform_of(double logit_scale, std::optional<double> softcap,
                               double temperature) {
  return {static_cast<A>(logit_scale / temperature), static_cast<A>(softcap.value_or(0.0))};
}

void check_cols(const at::Tensor& x, const at::Tensor& targets) {
  TORCH_CHECK(x.dim() == 2 && x.t().is_contiguous(),
              "x must be a vocabulary-major [n, V] tile (storage [V, n]: x.t().is_contiguous()), "
              "as linear_dpo_rows.Rows.tile makes it for the cpu backend; got strides ",
              x.strides());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == x.size(0), "targets must be [n]");
}

// Runs f(block, first token, state) over the column blocks (kColVecs * W tokens, the last one
// possibly partial) of the vocabulary-major x [n, V], blocks split over threads; make() gives
// each thread its scratch state.
template <typename A, typename Make, typename F>
void for_each_block(A* xp, int64_t n, Make&& make, F&& f) {
  constexpr int64_t B = kColVecs * Vectorized<A>::size();
  at::parallel_for(0, (n + B - 1) / B, 1, [&](int64_t begin, int64_t end) {
    auto state = make();
    for (int64_t i = begin; i < end; ++i) {
      f(ColBlock<A>{xp + i * B, n, std::min(B, n - i * B)}, i * B, state);
    }
  });
}

// z(x) of one vector (row_transform's formula).
template <typename A>
inline Vectorized<A> transform_vec(const Vectorized<A>& x, const LogitTransform<A>& tf) {
  using VA = Vectorized<A>;
  return tf.c > 0 ? VA(tf.c) * (x / VA(tf.c)).tanh() * VA(tf.a) : x * VA(tf.a);
}

// Folds the chunk [start, end) of b into f: identity transform in place (E: e stored, the shifts
// to shift_out), else through a copy of z(x) in scratch [kColChunk * kColVecs * W], x left as it
// is.
template <typename A, bool STATS, bool E = false>
void fold_chunk(const ColBlock<A>& b, int64_t start, int64_t end, ColFold<A>& f, int64_t offset,
                const LogitTransform<A>& tf, A* scratch, A* shift_out = nullptr) {
  constexpr int64_t B = kColVecs * Vectorized<A>::size();
  if (tf.identity()) {
    col_fold_chunk<A, STATS, E>(b, start, end, f, offset, shift_out);
    return;
  }
  const ColBlock<A> z{scratch, B, b.count};
  for (int64_t v = start; v < end; ++v) {
    for (int j = 0; j < kColVecs; ++j) z.store(transform_vec(b.load(v, j), tf), v - start, j);
  }
  col_fold_chunk<A, STATS>(z, 0, end - start, f, offset + start);
}

// Per-token state [n] (and stats [3, n], arg [n]) of the tokens of the block at t0, in and out.
template <typename A, bool STATS>
struct FoldIO {
  A *mp, *sp, *st;
  int64_t* ap;
  int64_t n;
  ColFold<A> load(int64_t t0, const ColBlock<A>& b) const {
    using VA = Vectorized<A>;
    constexpr int64_t W = VA::size();
    ColFold<A> f;
    for (int j = 0; j < kColVecs; ++j) {
      const int64_t c = b.lanes(j), t = t0 + j * W;
      if (c == 0) break;
      f.m[j] = VA::loadu(mp + t, c);
      f.s[j] = VA::loadu(sp + t, c);
      if constexpr (STATS) {
        f.pz[j] = VA::loadu(st + t, c);
        f.zsum[j] = VA::loadu(st + n + t, c);
        f.sq[j] = VA::loadu(st + 2 * n + t, c);
      }
    }
    if constexpr (STATS) std::copy(ap + t0, ap + t0 + b.count, f.arg);
    return f;
  }
  void store(const ColFold<A>& f, int64_t t0, const ColBlock<A>& b) const {
    constexpr int64_t W = Vectorized<A>::size();
    for (int j = 0; j < kColVecs; ++j) {
      const int64_t c = b.lanes(j), t = t0 + j * W;
      if (c == 0) break;
      f.m[j].store(mp + t, c);
      f.s[j].store(sp + t, c);
      if constexpr (STATS) {
        f.pz[j].store(st + t, c);
        f.zsum[j].store(st + n + t, c);
        f.sq[j].store(st + 2 * n + t, c);
      }
    }
    if constexpr (STATS) std::copy(f.arg, f.arg + b.count, ap + t0);
  }
};

// The label's z of each lane of b whose label (global id yp[t0 + l]) is in vocabulary
// [vocab_start, vocab_start + V) goes to tp[t0 + l]; local[l] <- the local label, -1 where not.
template <typename A>
void pick_targets(const ColBlock<A>& b, int64_t t0, int64_t V, const int64_t* yp,
                  int64_t vocab_start, const LogitTransform<A>& tf, A* tp, int64_t* local) {
  for (int64_t l = 0; l < b.count; ++l) {
    const int64_t y = yp[t0 + l] - vocab_start;
    local[l] = (y >= 0 && y < V) ? y : -1;
    if (local[l] < 0) continue;
    A z = b.at(y, l);
    if (!tf.identity()) row_transform(&z, 1, tf);
    tp[t0 + l] = z;
  }
}

// Folds x's tokens (vocabulary [vocab_start, vocab_start + V) of each) into running per-token
// statistics, updated in place: m (max), s (sum of exp(z - m)), and with stats ([3, n] pz, zsum,
// sq as in vec_rows.h's RowFold; arg [n] int64 first argmax, -1 before any block) the statistics
// trainers log. target[t] <- the label's z where targets[t] (a global id) is in x.
template <typename A, bool STATS>
void fold_cols(const at::Tensor& x, const int64_t* yp, const FoldIO<A, STATS>& io, A* tp,
               int64_t vocab_start, const LogitTransform<A>& tf) {
  constexpr int64_t B = kColVecs * Vectorized<A>::size();
  const int64_t n = x.size(0), V = x.size(1);
  A* xp = const_cast<A*>(x.const_data_ptr<A>());  // only read
  for_each_block(
      xp, n, [&] { return std::vector<A>(tf.identity() ? 0 : kColChunk * B); },
      [&](const ColBlock<A>& b, int64_t t0, std::vector<A>& scratch) {
        ColFold<A> f = io.load(t0, b);
        for (int64_t start = 0; start < V; start += kColChunk) {
          const int64_t end = std::min(V, start + kColChunk);
          fold_chunk<A, STATS>(b, start, end, f, vocab_start, tf, scratch.data());
        }
        io.store(f, t0, b);
        int64_t local[B];
        pick_targets(b, t0, V, yp, vocab_start, tf, tp, local);
      });
}

// fold_cols over whole vocabularies (vocab_start 0, fresh state) that then become, in place,
// q = (onehot(label) - softmax(z(x))) * dz/dx (the logits' gradient of log p[label], before the
// loss's per-token factor g, which the caller applies to the matmuls' operands) up to a factor
// per token: x <- q / factor[t]. Identity transform: e = exp(x - shift) stored by the fold (one
// exp per element); where a block's tokens kept one shift over the whole vocabulary and have a
// finite log-sum-exp (the rule with real logits), factor = -exp(shift - lse) and x' = e with
// 1 / factor added at the label, so no second pass over the block; else one pass x <- -e *
// exp(shift_k - lse) (+1 at the label), factor 1. Other transforms: the gradient from the raw x
// (tanh again), factor 1.
template <typename A, bool STATS>
void fold_softmax_cols(at::Tensor& x, const int64_t* yp, const FoldIO<A, STATS>& io, A* tp,
                       A* fp, const LogitTransform<A>& tf) {
  using VA = Vectorized<A>;
  constexpr int64_t W = VA::size();
  constexpr int64_t B = kColVecs * W;
  const int64_t n = x.size(0), V = x.size(1);
  const int64_t chunks = (V + kColChunk - 1) / kColChunk;
  for_each_block(
      x.data_ptr<A>(), n,
      [&] { return std::vector<A>(tf.identity() ? chunks * B : kColChunk * B); },
      [&](const ColBlock<A>& b, int64_t t0, std::vector<A>& scratch) {
        int64_t local[B];
        pick_targets(b, t0, V, yp, 0, tf, tp, local);
        ColFold<A> f;
        A* shifts = scratch.data();  // identity: [chunks, B]; else the transformed chunk
        int64_t k = 0;
        for (int64_t start = 0; start < V; start += kColChunk, ++k) {
          const int64_t end = std::min(V, start + kColChunk);
          fold_chunk<A, STATS, true>(b, start, end, f, 0, tf, shifts, shifts + k * B);
        }
        if (tf.identity()) {
          for (int j = 0; j < kColVecs; ++j) f.m[j] = f.ref[j];  // s, pz, sq are relative to it
        }
        VA lse[kColVecs], factor[kColVecs];
        A lse_l[B], ref_l[B];
        bool one_shift = tf.identity() && !f.moved;
        for (int j = 0; j < kColVecs; ++j) {
          lse[j] = f.lse(j);
          factor[j] = one_shift ? (f.m[j] - lse[j]).exp().neg() : VA(A(1));
          lse[j].store(lse_l + j * W);
          f.m[j].store(ref_l + j * W);
        }
        for (int64_t l = 0; l < b.count; ++l) one_shift = one_shift && std::isfinite(lse_l[l]);
        if (one_shift) {
          for (int64_t l = 0; l < b.count; ++l) {  // x' = e + onehot / factor
            if (local[l] >= 0) b.at(local[l], l) -= std::exp(lse_l[l] - ref_l[l]);
          }
        } else {
          for (int j = 0; j < kColVecs; ++j) factor[j] = VA(A(1));
          k = 0;
          for (int64_t start = 0; start < V; start += kColChunk, ++k) {
            const int64_t end = std::min(V, start + kColChunk);
            if (tf.identity()) {
              col_softmax_chunk(b, start, end, shifts + k * B, lse);
            } else {
              col_linear_logprob_grad(b, start, end, lse, factor, local, tf);
            }
          }
          if (tf.identity()) col_add_onehot(b, local);
        }
        for (int j = 0; j < kColVecs; ++j) {
          if (b.lanes(j) > 0) factor[j].store(fp + t0 + j * W, b.lanes(j));
        }
        io.store(f, t0, b);
      });
}

// The fold kernels' outputs: m, s, target [n] and, with statistics, stats [3, n] and arg [n].
// Returns whether statistics are asked for (stats not empty).
bool check_fold_outputs(const at::Tensor& x, const at::Tensor& targets, const at::Tensor& m,
                        const at::Tensor& s, const at::Tensor& target, const at::Tensor& stats,
                        const at::Tensor& arg) {
  check_cols(x, targets);
  const int64_t n = x.size(0);
  const bool with_stats = stats.numel() > 0;
  for (const at::Tensor* t : {&m, &s, &target}) {
    TORCH_CHECK(t->is_contiguous() && t->numel() == n && t->scalar_type() == x.scalar_type(),
                "m, s and target must be contiguous [n] in x's dtype");
  }
  TORCH_CHECK(!with_stats || (stats.is_contiguous() && stats.numel() == 3 * n &&
                              stats.scalar_type() == x.scalar_type() && arg.numel() == n &&
                              arg.is_contiguous() && arg.scalar_type() == at::kLong),
              "stats must be contiguous [3, n] in x's dtype and arg [n] int64 (or both empty)");
  return with_stats;
}

void linear_dpo_rows_fold_softmax(at::Tensor& x, const at::Tensor& targets, at::Tensor& m,
                                  at::Tensor& s, at::Tensor& target, at::Tensor& stats,
                                  at::Tensor& arg, at::Tensor& factor, double logit_scale,
                                  std::optional<double> softcap, double temperature) {
  const bool with_stats = check_fold_outputs(x, targets, m, s, target, stats, arg);
  TORCH_CHECK(factor.is_contiguous() && factor.numel() == x.size(0) &&
                  factor.scalar_type() == x.scalar_type(),
              "factor must be contiguous [n] in x's dtype");
  const at::Tensor y = targets.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_dpo_rows_fold_softmax", [&] {
    using A = scalar_t;
    const LogitTransform<A> tf = transform_of<A>(logit_scale, softcap, temperature);
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const int64_t n = x.size(0);
    A *mp = m.data_ptr<A>(), *sp = s.data_ptr<A>(), *tp = target.data_ptr<A>();
    if (with_stats) {
      const FoldIO<A, true> io{mp, sp, stats.data_ptr<A>(), arg.data_ptr<int64_t>(), n};
      fold_softmax_cols<A, true>(x, yp, io, tp, factor.data_ptr<A>(), tf);
    } else {
      const FoldIO<A, false> io{mp, sp, nullptr, nullptr, n};
      fold_softmax_cols<A, false>(x, yp, io, tp, factor.data_ptr<A>(), tf);
    }
  });
}

void linear_dpo_rows_fold(const at::Tensor& x, const at::Tensor& targets, at::Tensor& m,
                          at::Tensor& s, at::Tensor& target, at::Tensor& stats, at::Tensor& arg,
                          int64_t vocab_start, double logit_scale, std::optional<double> softcap,
                          double temperature) {
  const bool with_stats = check_fold_outputs(x, targets, m, s, target, stats, arg);
  const at::Tensor y = targets.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_dpo_rows_fold", [&] {
    using A = scalar_t;
    const LogitTransform<A> tf = transform_of<A>(logit_scale, softcap, temperature);
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const int64_t n = x.size(0);
    A *mp = m.data_ptr<A>(), *sp = s.data_ptr<A>(), *tp = target.data_ptr<A>();
    if (with_stats) {
      const FoldIO<A, true> io{mp, sp, stats.data_ptr<A>(), arg.data_ptr<int64_t>(), n};
      fold_cols<A, true>(x, yp, io, tp, vocab_start, tf);
    } else {
      fold_cols<A, false>(x, yp, FoldIO<A, false>{mp, sp, nullptr, nullptr, n}, tp, vocab_start,
                          tf);
    }
  });
}

void linear_dpo_rows_grad(at::Tensor& x, const at::Tensor& targets, const at::Tensor& grad,
                          const at::Tensor& lse, double logit_scale, std::optional<double> softcap,
                          double temperature) {
  check_cols(x, targets);
  const int64_t n = x.size(0), V = x.size(1);
  TORCH_CHECK(grad.numel() == n && lse.numel() == n, "grad and lse must be [n]");
  const at::Tensor y = targets.to(at::kLong).contiguous();
  const at::Tensor g = grad.to(x.scalar_type()).contiguous();
  const at::Tensor l = lse.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_dpo_rows_grad", [&] {
    using A = scalar_t;
    using VA = Vectorized<A>;
    constexpr int64_t W = VA::size();
    const LogitTransform<A> tf = transform_of<A>(logit_scale, softcap, temperature);
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const A* gp = g.const_data_ptr<A>();
    const A* lp = l.const_data_ptr<A>();
    for_each_block(x.data_ptr<A>(), n, [] { return 0; }, [&](const ColBlock<A>& b, int64_t t0, int) {
      int64_t local[kColVecs * W];
      for (int64_t i = 0; i < b.count; ++i) {
        local[i] = (yp[t0 + i] >= 0 && yp[t0 + i] < V) ? yp[t0 + i] : -1;
      }
      VA lse[kColVecs], gv[kColVecs];
      for (int j = 0; j < kColVecs; ++j) {
        const int64_t c = b.lanes(j), t = t0 + j * W;
        lse[j] = c > 0 ? VA::loadu(lp + t, c) : VA(A(0));
        gv[j] = c > 0 ? VA::loadu(gp + t, c) : VA(A(0));
      }
      for (int64_t start = 0; start < V; start += kColChunk) {
        col_linear_logprob_grad(b, start, std::min(V, start + kColChunk), lse, gv, local, tf);
      }
    });
  });
}

// Asks Linux to back t's storage with transparent huge pages where whole 2 MiB pages fit
// (madvise MADV_HUGEPAGE; best effort, a no-op elsewhere), before its first write: a fresh
// buffer of tens of MiB then takes a few dozen page faults instead of one per 4 KiB (~10 ms for
// the 49 MiB tile of a 384-token chunk at V = 32000), and the kernels' strided passes fewer TLB
// misses.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto a = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t start = (a + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (a + t.storage().nbytes()) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpo_kernels_cpu, m) {
  m.def(
      "linear_dpo_rows_fold_softmax(Tensor(a!) x, Tensor targets, Tensor(b!) m, Tensor(c!) s, "
      "Tensor(d!) target, Tensor(e!) stats, Tensor(f!) arg, Tensor(g!) factor, float logit_scale, "
      "float? softcap, float temperature) -> ()");
  m.def(
      "linear_dpo_rows_fold(Tensor x, Tensor targets, Tensor(a!) m, Tensor(b!) s, "
      "Tensor(c!) target, Tensor(d!) stats, Tensor(e!) arg, int vocab_start, float logit_scale, "
      "float? softcap, float temperature) -> ()");
  m.def(
      "linear_dpo_rows_grad(Tensor(a!) x, Tensor targets, Tensor grad, Tensor lse, "
      "float logit_scale, float? softcap, float temperature) -> ()");
  m.def("advise_huge_pages(Tensor t) -> ()");
}

TORCH_LIBRARY_IMPL(dpo_kernels_cpu, CPU, m) {
  m.impl("linear_dpo_rows_fold", &linear_dpo_rows_fold);
  m.impl("linear_dpo_rows_fold_softmax", &linear_dpo_rows_fold_softmax);
  m.impl("linear_dpo_rows_grad", &linear_dpo_rows_grad);
  m.impl("advise_huge_pages", &advise_huge_pages);
}

}  // namespace dpo_kernels
