// Vectorized column primitives: logits stored vocabulary-major, x[v * ld + t] for token t and
// vocabulary entry v (a [n, V] tensor whose storage is [V, n]), as the matmul that projects them
// writes them fastest on CPU. One Vectorized<A> holds W consecutive tokens of one vocabulary
// entry, so a fold over the vocabulary is W independent lanes and needs no horizontal reduction.
//
// A column block (W tokens) is processed in L1-sized chunks of kColChunk vocabulary entries: a max
// pass and an exp pass over the same chunk, one exp per element, as vec_rows.h's fold_row does per
// row; each lane computes exactly what fold_row computes for its token (same NaN / infinity rules),
// whatever block it is in. A last block of fewer than W tokens loads and stores `count` lanes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vec_rows.h"

namespace dpo_kernels {
inline namespace CPU_CAPABILITY {

// Vocabulary entries per chunk of a column block (256 x 64 bytes with AVX-512 fp32: 16 KiB).
constexpr int64_t kColChunk = 256;

// W tokens (lanes) of one column block: pointer to vocabulary entry 0 of its first token, the
// distance between vocabulary entries (n) and how many lanes are real tokens (1..W).
template <typename A>
struct ColBlock {
  A* p;
  int64_t ld;
  int64_t count;
  static constexpr int64_t W = Vectorized<A>::size();
  Vectorized<A> load(int64_t v) const {
    return count == W ? Vectorized<A>::loadu(p + v * ld) : Vectorized<A>::loadu(p + v * ld, count);
  }
  void store(const Vectorized<A>& x, int64_t v) const {
    if (count == W) {
      x.store(p + v * ld);
    } else {
      x.store(p + v * ld, count);
    }
  }
};

// Running statistics of W tokens' folded vocabulary, one lane each (vec_rows.h's RowFold).
template <typename A>
struct ColFold {
  using VA = Vectorized<A>;
  static constexpr int64_t W = VA::size();
  VA m = VA(-std::numeric_limits<A>::infinity());
  VA s = VA(A(0));
  VA pz = VA(A(0));    // with stats: sum of exp(z - m) * z
  VA zsum = VA(A(0));  // with stats: sum of z
  VA sq = VA(A(0));    // with stats: sum of exp(2 (z - m))
  int64_t arg[W];      // with stats: index of each lane's first maximum, -1 before any
  ColFold() { std::fill(arg, arg + W, int64_t(-1)); }
};

// Folds vocabulary entries [0, len) of block b (entry 0 has index `offset` in the vocabulary)
// into f, as fold_row does for one row: per chunk the lanes' max, then one exp per element. With
// E, b's chunk is overwritten with e = exp(z - shift) and each chunk's shift vector is stored at
// shifts[k * W] (k: chunk index), for col_softmax_finish.
template <typename A, bool STATS, bool E = false>
inline void col_fold(const ColBlock<A>& b, int64_t len, ColFold<A>& f, int64_t offset,
                     A* shifts = nullptr) {
  using VA = Vectorized<A>;
  constexpr int64_t W = VA::size();
  const VA zero(A(0)), inf(std::numeric_limits<A>::infinity());
  int64_t k = 0;
  for (int64_t start = 0; start < len; start += kColChunk, ++k) {
    const int64_t end = std::min(len, start + kColChunk);
    VA cmax(-std::numeric_limits<A>::infinity());
    for (int64_t v = start; v < end; ++v) cmax = at::vec::maximum(cmax, b.load(v));
    if constexpr (STATS) {
      // Strictly: an earlier chunk keeps a tie; a lane that is all -inf so far takes its first
      // -inf (a chunk max of NaN matches nothing). A third, L1-resident pass, rarely taken.
      A cm[W], m_old[W];
      cmax.store(cm);
      f.m.store(m_old);
      for (int64_t l = 0; l < b.count; ++l) {
        if (!(cm[l] > m_old[l] || f.arg[l] < 0)) continue;
        for (int64_t v = start; v < end; ++v) {
          if (b.p[v * b.ld + l] == cm[l]) {
            f.arg[l] = offset + v;
            break;
          }
        }
      }
    }
    const VA m_new = at::vec::maximum(f.m, cmax);
    // An infinite max shifts by 0: nothing finite seen yet gives exp(-inf) = 0, and a +inf logit
    // makes the sum +inf (so the log-sum-exp is +inf and log p = -inf) rather than NaN.
    const VA shift = VA::blendv(m_new, zero, m_new.abs() == inf);
    const VA scale = (f.m - shift).exp();
    VA sum0(A(0)), sum1(A(0)), vpz(A(0)), vz(A(0)), vsq(A(0));
    auto body = [&](int64_t v, VA& sum) {
      const VA x = b.load(v);
      const VA e = (x - shift).exp();
      sum = sum + e;
      if constexpr (STATS) {
        vpz = vpz + VA::blendv(e * x, zero, e == zero);  // 0 * -inf counts as 0
        vz = vz + x;
        vsq = vsq + e * e;
      }
      if constexpr (E) b.store(e, v);
    };
    int64_t v = start;
    for (; v + 2 <= end; v += 2) {  // two sums in flight
      body(v, sum0);
      body(v + 1, sum1);
    }
    if (v < end) body(v, sum0);
    if constexpr (STATS) {
      f.pz = f.pz * scale + vpz;
      f.sq = f.sq * (scale * scale) + vsq;
      f.zsum = f.zsum + vz;
    }
    f.s = f.s * scale + (sum0 + sum1);
    f.m = m_new;
    if constexpr (E) shift.store(shifts + k * W);
  }
}

// After col_fold<A, STATS, true> over a whole column block of V entries: x <- onehot(label) -
// softmax(x), from e = exp(x - shift_k) in place: x <- -e * exp(shift_k - lse) (+1 at the label).
// labels[l] < 0: lane l's label is not in the block.
template <typename A>
inline void col_softmax_finish(const ColBlock<A>& b, int64_t V, const ColFold<A>& f,
                               const A* shifts, const int64_t* labels) {
  using VA = Vectorized<A>;
  constexpr int64_t W = VA::size();
  const VA lse = f.m + f.s.log();
  int64_t k = 0;
  for (int64_t start = 0; start < V; start += kColChunk, ++k) {
    const int64_t end = std::min(V, start + kColChunk);
    const VA factor = (VA::loadu(shifts + k * W) - lse).exp().neg();
    for (int64_t v = start; v < end; ++v) b.store(b.load(v) * factor, v);
  }
  for (int64_t l = 0; l < b.count; ++l) {
    if (labels[l] >= 0) b.p[labels[l] * b.ld + l] += A(1);
  }
}

// Block b's entries [0, len) <- g * (onehot(label) - exp(z(x) - lse)) * dz/dx, in place, per lane
// (vec_rows.h's row_linear_logprob_grad, one lane per token): g, lse per lane; labels[l] < 0: lane
// l's label is not in these entries.
template <typename A>
inline void col_linear_logprob_grad(const ColBlock<A>& b, int64_t len, const Vectorized<A>& lse,
                                    const Vectorized<A>& g, const int64_t* labels,
                                    const LogitTransform<A>& tf) {
  using VA = Vectorized<A>;
  constexpr int64_t W = VA::size();
  const VA va(tf.a), vc(tf.c), neg_g = g.neg(), one(A(1));
  A x_label[W];
  for (int64_t l = 0; l < b.count; ++l) x_label[l] = labels[l] >= 0 ? b.p[labels[l] * b.ld + l] : 0;
  if (tf.c > 0) {
    for (int64_t v = 0; v < len; ++v) {
      const VA t = (b.load(v) / vc).tanh();
      b.store(neg_g * (vc * t * va - lse).exp() * (va * (one - t * t)), v);
    }
  } else {
    for (int64_t v = 0; v < len; ++v) b.store(neg_g * (b.load(v) * va - lse).exp() * va, v);
  }
  A gl[W], ll[W];
  g.store(gl);
  lse.store(ll);
  for (int64_t l = 0; l < b.count; ++l) {
    if (labels[l] < 0) continue;
    A z = x_label[l] * tf.a, dzdx = tf.a;
    if (tf.c > 0) {
      const A t = std::tanh(x_label[l] / tf.c);
      z = tf.c * t * tf.a;
      dzdx = tf.a * (A(1) - t * t);
    }
    b.p[labels[l] * b.ld + l] = gl[l] * (A(1) - std::exp(z - ll[l])) * dzdx;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace dpo_kernels
