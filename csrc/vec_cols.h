// Vectorized column primitives: logits stored vocabulary-major, x[v * ld + t] for token t and
// vocabulary entry v (a [n, V] tensor whose storage is [V, n]), as the matmul that projects them
// writes them fastest on CPU. One Vectorized<A> holds W consecutive tokens of one vocabulary
// entry, so a fold over the vocabulary is W independent lanes and needs no horizontal reduction.
//
// A column block is kColVecs vectors side by side (kColVecs * W consecutive tokens, 256 bytes of
// each vocabulary entry with fp32 AVX-512), processed in chunks of kColChunk vocabulary entries:
// a max pass and an exp pass over the same chunk, one exp per element, as vec_rows.h's fold_row
// does per row; each lane computes exactly what fold_row computes for its token (same NaN /
// infinity rules), whatever block it is in. The hardware prefetchers do not follow a block's
// stride (n elements) across pages, so each pass prefetches ahead in software (the exp pass: the
// whole next chunk). A last block of fewer tokens loads and stores only its `count` lanes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vec_rows.h"

namespace dpo_kernels {
inline namespace CPU_CAPABILITY {

// Vocabulary entries per chunk of a column block (256 x 256 bytes with fp32 AVX-512: 64 KiB, in
// L2 between the max and the exp pass).
constexpr int64_t kColChunk = 256;
// Vectors per column block.
constexpr int kColVecs = 4;
// Vocabulary entries ahead that the softmax pass prefetches (its block comes back from L3).
constexpr int64_t kPfFinish = 64;

// kColVecs * W tokens (lanes) of one column block: pointer to vocabulary entry 0 of its first
// token, the distance between vocabulary entries (n) and how many lanes are real tokens.
template <typename A>
struct ColBlock {
  using VA = Vectorized<A>;
  static constexpr int64_t W = VA::size();
  static constexpr int G = kColVecs;
  A* p;
  int64_t ld;
  int64_t count;  // 1 .. G * W
  bool full() const { return count == G * W; }
  // Real lanes of vector j (0 .. W).
  int64_t lanes(int j) const { return std::clamp<int64_t>(count - j * W, 0, W); }
  VA load(int64_t v, int j) const {
    const A* q = p + v * ld + j * W;
    if (full()) return VA::loadu(q);
    return lanes(j) > 0 ? VA::loadu(q, lanes(j)) : VA(A(0));
  }
  void store(const VA& x, int64_t v, int j) const {
    A* q = p + v * ld + j * W;
    if (full()) {
      x.store(q);
    } else if (lanes(j) > 0) {
      x.store(q, lanes(j));
    }
  }
  // Asks for entry v's G * W lanes to be brought into cache (no fault past the end of x): the
  // prefetchers do not follow strides across pages, so each pass over a chunk fetches the next.
  template <bool WRITE = true>
  void prefetch(int64_t v) const {
    const A* q = p + v * ld;
    for (int64_t i = 0; i < G * W; i += 64 / int64_t(sizeof(A))) {
      __builtin_prefetch(q + i, WRITE ? 1 : 0, 2);
    }
  }
  // Element of lane l (0 .. count) at vocabulary entry v.
  A& at(int64_t v, int64_t l) const { return p[v * ld + l]; }
};

// Running statistics of a column block's tokens, one lane each (vec_rows.h's RowFold).
template <typename A>
struct ColFold {
  using VA = Vectorized<A>;
  static constexpr int64_t W = VA::size();
  static constexpr int G = kColVecs;
  VA m[G], s[G];
  VA pz[G], zsum[G], sq[G];  // with stats: sums of exp(z - m) * z, of z, of exp(2 (z - m))
  int64_t arg[G * W];        // with stats: index of each lane's first maximum, -1 before any
  // col_fold_chunk<..., E = true> only: the shift that s, pz, sq (and the stored e) are relative
  // to, and whether it changed after the first chunk in some lane of the block.
  VA ref[G];
  bool moved = false;
  ColFold() {
    for (int j = 0; j < G; ++j) {
      m[j] = ref[j] = VA(-std::numeric_limits<A>::infinity());
      s[j] = pz[j] = zsum[j] = sq[j] = VA(A(0));
    }
    std::fill(arg, arg + G * W, int64_t(-1));
  }
  VA lse(int j) const { return m[j] + s[j].log(); }
};

// How far (in logits) a later chunk's max may rise above the shift of col_fold_chunk<..., E =
// true> before the shift moves: e = exp(x - shift) stays below e^20, its sums far from overflow.
constexpr double kColSlack = 20.0;

// Folds vocabulary entries [start, end) of block b (one chunk; entry v has index offset + v in
// the vocabulary) into f, as fold_row does for a chunk of one row: the lanes' max, then one exp
// per element. With E, the chunk is overwritten with e = exp(z - shift) and its shift vectors are
// stored at shift_out[0, G * W), for col_softmax_chunk; the shift is then the lane's reference
// f.ref, which stays as the first chunk set it while later chunks' maxima stay within kColSlack
// above it (so that, when it never moves, all of a lane's e share one shift); s, pz and sq are
// relative to f.ref, the log-sum-exp is f.ref + log(s). f.m stays the running max.
template <typename A, bool STATS, bool E = false>
inline void col_fold_chunk(const ColBlock<A>& b, int64_t start, int64_t end, ColFold<A>& f,
                           int64_t offset, A* shift_out = nullptr) {
  using VA = Vectorized<A>;
  constexpr int64_t W = VA::size();
  constexpr int G = kColVecs;
  const VA zero(A(0)), inf(std::numeric_limits<A>::infinity());
  VA cmax[G];
  for (int j = 0; j < G; ++j) cmax[j] = VA(-inf);
  for (int64_t v = start; v < end; ++v) {
    for (int j = 0; j < G; ++j) cmax[j] = at::vec::maximum(cmax[j], b.load(v, j));
  }
  if constexpr (STATS) {
    // Strictly: an earlier chunk keeps a tie; a lane that is all -inf so far takes its first
    // -inf (a chunk max of NaN matches nothing). A third, cache-resident pass, rarely taken.
    A cm[G * W], m_old[G * W];
    for (int j = 0; j < G; ++j) {
      cmax[j].store(cm + j * W);
      f.m[j].store(m_old + j * W);
    }
    for (int64_t l = 0; l < b.count; ++l) {
      if (!(cm[l] > m_old[l] || f.arg[l] < 0)) continue;
      for (int64_t u = start; u < end; ++u) {
        if (b.at(u, l) == cm[l]) {
          f.arg[l] = offset + u;
          break;
        }
      }
    }
  }
  VA shift[G], sum[G], vpz[G], vz[G], vsq[G];
  for (int j = 0; j < G; ++j) {
    const VA m_new = at::vec::maximum(f.m[j], cmax[j]);
    // An infinite max shifts by 0: nothing finite seen yet gives exp(-inf) = 0, and a +inf
    // logit makes the sum +inf (so the log-sum-exp is +inf and log p = -inf) rather than NaN.
    shift[j] = VA::blendv(m_new, zero, m_new.abs() == inf);
    if constexpr (E) {
      if (start > 0) {
        const VA keep = cmax[j] <= f.ref[j] + VA(A(kColSlack));  // false where either is NaN
        shift[j] = VA::blendv(shift[j], f.ref[j], keep);
        const int real = int((int64_t(1) << b.lanes(j)) - 1);  // this vector's real lanes
        if (keep.zero_mask() & real) f.moved = true;
      }
    }
    sum[j] = vpz[j] = vz[j] = vsq[j] = zero;
  }
  for (int64_t v = start; v < end; ++v) {
    b.template prefetch<E>(v + kColChunk);  // the next chunk, from memory while this one's exps run
    for (int j = 0; j < G; ++j) {
      const VA x = b.load(v, j);
      const VA e = (x - shift[j]).exp();
      sum[j] = sum[j] + e;
      if constexpr (STATS) {
        vpz[j] = vpz[j] + VA::blendv(e * x, zero, e == zero);  // 0 * -inf counts as 0
        vz[j] = vz[j] + x;
        vsq[j] = vsq[j] + e * e;
      }
      if constexpr (E) b.store(e, v, j);
    }
  }
  for (int j = 0; j < G; ++j) {
    const VA scale = ((E ? f.ref[j] : f.m[j]) - shift[j]).exp();
    if constexpr (STATS) {
      f.pz[j] = f.pz[j] * scale + vpz[j];
      f.sq[j] = f.sq[j] * (scale * scale) + vsq[j];
      f.zsum[j] = f.zsum[j] + vz[j];
    }
    f.s[j] = f.s[j] * scale + sum[j];
    f.m[j] = at::vec::maximum(f.m[j], cmax[j]);
    if constexpr (E) {
      f.ref[j] = shift[j];
      shift[j].store(shift_out + j * W);
    }
  }
}

// With e = exp(x - shift) stored by col_fold_chunk<A, STATS, true> (its shifts at shifts[0,
// G * W)) and the lanes' log-sum-exp lse[j] known: entries [start, end) of b <- -e * exp(shift -
// lse) = -softmax(x); the caller then adds 1 at each label (col_add_onehot).
template <typename A>
inline void col_softmax_chunk(const ColBlock<A>& b, int64_t start, int64_t end, const A* shifts,
                              const Vectorized<A>* lse) {
  using VA = Vectorized<A>;
  constexpr int64_t W = VA::size();
  constexpr int G = kColVecs;
  VA factor[G];
  for (int j = 0; j < G; ++j) factor[j] = (VA::loadu(shifts + j * W) - lse[j]).exp().neg();
  for (int64_t v = start; v < end; ++v) {
    b.prefetch(v + kPfFinish);
    for (int j = 0; j < G; ++j) b.store(b.load(v, j) * factor[j], v, j);
  }
}

// x[label, lane] += 1 for the lanes of b whose (local) label is >= 0.
template <typename A>
inline void col_add_onehot(const ColBlock<A>& b, const int64_t* labels) {
  for (int64_t l = 0; l < b.count; ++l) {
    if (labels[l] >= 0) b.at(labels[l], l) += A(1);
  }
}

// Block b's entries [start, end) <- g * (onehot(label) - exp(z(x) - lse)) * dz/dx, in place, per
// lane (vec_rows.h's row_linear_logprob_grad, one lane per token): g[j], lse[j] for vector j;
// labels[l]: lane l's label in the block's local numbering, < 0 (or outside [start, end)): not
// here.
template <typename A>
inline void col_linear_logprob_grad(const ColBlock<A>& b, int64_t start, int64_t end,
                                    const Vectorized<A>* lse, const Vectorized<A>* g,
                                    const int64_t* labels, const LogitTransform<A>& tf) {
  using VA = Vectorized<A>;
  constexpr int64_t W = VA::size();
  constexpr int G = kColVecs;
  const VA va(tf.a), vc(tf.c), one(A(1));
  VA neg_g[G];
  for (int j = 0; j < G; ++j) neg_g[j] = g[j].neg();
  A x_label[G * W];
  bool here[G * W];
  for (int64_t l = 0; l < b.count; ++l) {
    here[l] = labels[l] >= start && labels[l] < end;
    x_label[l] = here[l] ? b.at(labels[l], l) : A(0);
  }
  if (tf.c > 0) {
    for (int64_t v = start; v < end; ++v) {
      b.prefetch(v + 16);
      for (int j = 0; j < G; ++j) {
        const VA t = (b.load(v, j) / vc).tanh();
        b.store(neg_g[j] * (vc * t * va - lse[j]).exp() * (va * (one - t * t)), v, j);
      }
    }
  } else {
    for (int64_t v = start; v < end; ++v) {
      b.prefetch(v + 16);
      for (int j = 0; j < G; ++j) {
        b.store(neg_g[j] * (b.load(v, j) * va - lse[j]).exp() * va, v, j);
      }
    }
  }
  A gl[G * W], ll[G * W];
  for (int j = 0; j < G; ++j) {
    g[j].store(gl + j * W);
    lse[j].store(ll + j * W);
  }
  for (int64_t l = 0; l < b.count; ++l) {
    if (!here[l]) continue;
    A z = x_label[l] * tf.a, dzdx = tf.a;
    if (tf.c > 0) {
      const A t = std::tanh(x_label[l] / tf.c);
      z = tf.c * t * tf.a;
      dzdx = tf.a * (A(1) - t * t);
    }
    b.at(labels[l], l) = gl[l] * (A(1) - std::exp(z - ll[l])) * dzdx;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace dpo_kernels
