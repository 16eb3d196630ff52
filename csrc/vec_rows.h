// Vectorized row primitives over one row of logits: log-sum-exp and the log-softmax gradient, and
// for the fused linear op the logit transform and its gradient.
//
// Rows are processed in L1-sized chunks: a max pass and a sum-exp pass over the same chunk, so the
// row is read from memory once and each element costs one exp. Accumulation is in acc_t (float for
// bf16/fp16/fp32, double for fp64). Compiled once per CPU capability (see setup.py); everything here
// lives in that capability's namespace, so variants never share a symbol.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace dpo_kernels {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename S>
constexpr bool kReduced = std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>;

// Elements per L1-resident chunk (16 KiB of fp32).
constexpr int64_t kChunk = 4096;

// NaN-propagating scalar max.
template <typename A>
inline A max_nan(A a, A b) {
  return (b != b || b > a) ? b : a;
}

// Applies f(Vectorized<acc>) to every full vector of p[0, n) and g(acc) to the tail elements.
// Reduced types load 2W elements at once and convert them to two float vectors.
template <typename S, typename FV, typename FS>
inline void for_each_vec(const S* p, int64_t n, FV&& f, FS&& g) {
  using A = acc_t<S>;
  using VA = Vectorized<A>;
  int64_t i = 0;
  if constexpr (kReduced<S>) {
    constexpr int64_t W = Vectorized<S>::size();
    for (; i + W <= n; i += W) {
      auto [lo, hi] = at::vec::convert_to_float<S>(Vectorized<S>::loadu(p + i));
      f(lo);
      f(hi);
    }
  } else {
    constexpr int64_t W = VA::size();
    for (; i + 2 * W <= n; i += 2 * W) {
      f(VA::loadu(p + i));
      f(VA::loadu(p + i + W));
    }
    for (; i + W <= n; i += W) f(VA::loadu(p + i));
  }
  for (; i < n; ++i) g(static_cast<A>(p[i]));
}

// The largest of p[0:n] in the accumulation type, vectorized; NaN if one is NaN (max_nan).
template <typename S>
inline acc_t<S> max_of(const S* p, int64_t n) {
  using A = acc_t<S>;
  using VA = Vectorized<A>;
  VA vmax(-std::numeric_limits<A>::infinity());
  A tail_max = -std::numeric_limits<A>::infinity();
  for_each_vec(
      p, n, [&](const VA& x) { vmax = at::vec::maximum(vmax, x); },
      [&](A x) { tail_max = max_nan(tail_max, x); });
  const A m =
      at::vec::vec_reduce_all<A>([](VA& a, VA& b) { return at::vec::maximum(a, b); }, vmax);
  return max_nan(m, tail_max);
}

// Running statistics of the part of a row folded so far.
template <typename A>
struct RowFold {
  A m = -std::numeric_limits<A>::infinity();  // max so far
  A s = 0;                                     // sum of exp(x - m)
  A pz = 0;                                    // with stats: sum of exp(x - m) * x
  A zsum = 0;                                  // with stats: sum of x
  A sq = 0;                                    // with stats: sum of exp(2 (x - m))
  int64_t arg = -1;                            // with stats: index of the first maximum
};

// Folds p[0, n) (whose first element has index `offset` in the row) into f. Works in L1-sized
// chunks: a max pass and an exp pass over the same chunk, so memory is read once and each element
// costs one exp. With STATS, also the entropy and mean-logit sums, the sum of squared
// exponentials (for log sum_v p_v^2; one multiply, no extra exp) and the first argmax (a third,
// L1-resident pass over chunks whose maximum beats the running one).
template <typename S, bool STATS = false>
inline void fold_row(const S* p, int64_t n, RowFold<acc_t<S>>& f, int64_t offset = 0) {
  using A = acc_t<S>;
  using VA = Vectorized<A>;
  auto add = [](VA& a, VA& b) { return a + b; };
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    const S* c = p + start;
    const A chunk_max = max_of(c, len);
    const A m_new = max_nan(f.m, chunk_max);
    // An infinite max shifts by 0: nothing finite seen yet gives exp(-inf) = 0, and a +inf logit
    // makes the sum +inf (so the log-sum-exp is +inf and log p = -inf) rather than NaN.
    const A shift = std::isinf(m_new) ? A(0) : m_new;
    const A scale = std::exp(f.m - shift);
    const VA vshift(shift);
    VA vsum(A(0));
    A tail_sum = 0;
    if constexpr (STATS) {
      VA vpz(A(0)), vz(A(0)), vsq(A(0));
      const VA zero(A(0));
      A tail_pz = 0, tail_z = 0, tail_sq = 0;
      for_each_vec(
          c, len,
          [&](const VA& x) {
            const VA e = (x - vshift).exp();
            vsum = vsum + e;
            vpz = vpz + VA::blendv(e * x, zero, e == zero);  // 0 * -inf counts as 0
            vz = vz + x;
            vsq = vsq + e * e;
          },
          [&](A x) {
            const A e = std::exp(x - shift);
            tail_sum += e;
            tail_pz += e == 0 ? A(0) : e * x;
            tail_z += x;
            tail_sq += e * e;
          });
      f.pz = f.pz * scale + at::vec::vec_reduce_all<A>(add, vpz) + tail_pz;
      f.sq = f.sq * (scale * scale) + at::vec::vec_reduce_all<A>(add, vsq) + tail_sq;
      f.zsum += at::vec::vec_reduce_all<A>(add, vz) + tail_z;
      // Strictly: an earlier chunk keeps a tie; a row that is all -inf so far takes its first -inf.
      if (chunk_max > f.m || f.arg < 0) {
        for (int64_t i = 0; i < len; ++i) {
          if (static_cast<A>(c[i]) == chunk_max) {
            f.arg = offset + start + i;
            break;
          }
        }
      }
    } else {
      for_each_vec(
          c, len, [&](const VA& x) { vsum = vsum + (x - vshift).exp(); },
          [&](A x) { tail_sum += std::exp(x - shift); });
    }
    f.s = f.s * scale + (at::vec::vec_reduce_all<A>(add, vsum) + tail_sum);
    f.m = m_new;
  }
}

// Folds p[0, n) into a running log-sum-exp (m: max so far, s: sum of exp(x - m)).
template <typename S>
inline void lse_fold(const S* p, int64_t n, acc_t<S>& m, acc_t<S>& s) {
  RowFold<acc_t<S>> f;
  f.m = m;
  f.s = s;
  fold_row<S, false>(p, n, f);
  m = f.m;
  s = f.s;
}

// What one pass over a row yields: its log-sum-exp and, when asked, the statistics trainers log.
template <typename A>
struct RowStats {
  A lse;
  A entropy = 0;     // lse - sum_v p_v z_v
  A mean = 0;        // sum_v z_v / V
  A log_sum_sq = 0;  // log sum_v p_v^2
  int64_t arg = -1;  // first index of the maximum
};

// log sum_v p_v^2 of a folded row: log(sum exp(2 (z - m))) - 2 log(sum exp(z - m)).
template <typename A>
inline A log_sum_sq(const RowFold<A>& f) {
  return std::log(f.sq) - 2 * std::log(f.s);
}

// Log-sum-exp of the row p[0, V) in acc precision, one pass over memory; with STATS also the
// entropy, the mean logit, log sum_v p_v^2 and the first argmax.
template <typename S, bool STATS = false>
inline RowStats<acc_t<S>> row_stats(const S* p, int64_t V) {
  using A = acc_t<S>;
  RowFold<A> f;
  fold_row<S, STATS>(p, V, f);
  RowStats<A> out{f.m + std::log(f.s)};
  if constexpr (STATS) {
    out.entropy = out.lse - f.pz / f.s;
    out.mean = f.zsum / static_cast<A>(V);
    out.log_sum_sq = log_sum_sq(f);
    out.arg = std::isnan(out.lse) ? -1 : f.arg;  // a row with a NaN has no argmax
  }
  return out;
}

// Log-sum-exp of the row p[0, V), in acc precision. One pass over memory.
template <typename S>
inline acc_t<S> row_logsumexp(const S* p, int64_t V) {
  return row_stats<S, false>(p, V).lse;
}

// out[v] = -g * exp(z[v] - lse) for all v, then out[label] += g: the gradient of g * log p[label].
template <typename S>
inline void row_logsoftmax_grad(const S* z, S* out, int64_t V, acc_t<S> lse, acc_t<S> g,
                                int64_t label) {
  using A = acc_t<S>;
  using VA = Vectorized<A>;
  const VA vlse(lse);
  const VA vneg_g(-g);
  int64_t i = 0;
  if constexpr (kReduced<S>) {
    constexpr int64_t W = Vectorized<S>::size();
    for (; i + W <= V; i += W) {
      auto [lo, hi] = at::vec::convert_to_float<S>(Vectorized<S>::loadu(z + i));
      lo = vneg_g * (lo - vlse).exp();
      hi = vneg_g * (hi - vlse).exp();
      at::vec::convert_from_float<S>(lo, hi).store(out + i);
    }
  } else {
    constexpr int64_t W = VA::size();
    for (; i + W <= V; i += W) (vneg_g * (VA::loadu(z + i) - vlse).exp()).store(out + i);
  }
  for (; i < V; ++i) out[i] = static_cast<S>(-g * std::exp(static_cast<A>(z[i]) - lse));
  out[label] = static_cast<S>(g * (A(1) - std::exp(static_cast<A>(z[label]) - lse)));
}

// The fused linear op's logit transform: z = x * a, or z = (c * tanh(x / c)) * a with a softcap c,
// where a = logit_scale / temperature (the order of operations of ops/reference.py).
template <typename A>
struct LogitTransform {
  A a;
  A c;  // softcap; 0 for none
  bool identity() const { return c == 0 && a == 1; }
};

// x[0, n) <- z(x), in place.
template <typename A>
inline void row_transform(A* x, int64_t n, const LogitTransform<A>& tf) {
  using VA = Vectorized<A>;
  const VA va(tf.a), vc(tf.c);
  if (tf.c > 0) {
    at::vec::map([&](VA v) { return vc * (v / vc).tanh() * va; }, x, x, n);
  } else {
    at::vec::map([&](VA v) { return v * va; }, x, x, n);
  }
}

// x[0, n) <- g * (onehot(label) - exp(z(x) - lse)) * dz/dx, in place: the gradient of
// g * log softmax(z)[label] with respect to the logits before the transform. label < 0: the label
// is not in this row segment.
template <typename A>
inline void row_linear_logprob_grad(A* x, int64_t n, A lse, A g, int64_t label,
                                    const LogitTransform<A>& tf) {
  using VA = Vectorized<A>;
  const VA va(tf.a), vc(tf.c), vlse(lse), vneg_g(-g), one(A(1));
  const A x_label = label >= 0 ? x[label] : A(0);
  if (tf.c > 0) {
    at::vec::map(
        [&](VA v) {
          const VA t = (v / vc).tanh();
          return vneg_g * (vc * t * va - vlse).exp() * (va * (one - t * t));
        },
        x, x, n);
  } else {
    at::vec::map([&](VA v) { return vneg_g * (v * va - vlse).exp() * va; }, x, x, n);
  }
  if (label < 0) return;
  A z = x_label * tf.a, dzdx = tf.a;
  if (tf.c > 0) {
    const A t = std::tanh(x_label / tf.c);
    z = tf.c * t * tf.a;
    dzdx = tf.a * (A(1) - t * t);
  }
  x[label] = g * (A(1) - std::exp(z - lse)) * dzdx;
}

// One row's fold and its softmax in one read of memory: folds x[0, V) (logits, identity
// transform) into f as fold_row does, writing exp(x - shift) in place chunk by chunk (one exp per
// element; each L1-sized chunk's shift kept in `shifts`), then, with the row's log-sum-exp known
// and the row still in cache, x <- onehot(label) - softmax(x): the gradient of log p[label] with
// respect to the logits. label < 0: not in this row.
template <typename A, bool STATS>
inline void row_fold_softmax(A* x, int64_t V, RowFold<A>& f, int64_t label, A* shifts) {
  using VA = Vectorized<A>;
  auto add = [](VA& a, VA& b) { return a + b; };
  int64_t k = 0;
  for (int64_t start = 0; start < V; start += kChunk, ++k) {
    const int64_t len = std::min(kChunk, V - start);
    A* c = x + start;
    const A chunk_max = max_of(c, len);
    const A m_new = max_nan(f.m, chunk_max);
    const A shift = std::isinf(m_new) ? A(0) : m_new;
    const A scale = std::exp(f.m - shift);
    if constexpr (STATS) {
      if (chunk_max > f.m || f.arg < 0) {
        for (int64_t i = 0; i < len; ++i) {
          if (c[i] == chunk_max) {
            f.arg = start + i;
            break;
          }
        }
      }
    }
    const VA vshift(shift), zero(A(0));
    VA vsum(A(0)), vpz(A(0)), vz(A(0)), vsq(A(0));
    int64_t i = 0;
    for (; i + VA::size() <= len; i += VA::size()) {
      const VA v = VA::loadu(c + i);
      const VA e = (v - vshift).exp();
      vsum = vsum + e;
      if constexpr (STATS) {
        vpz = vpz + VA::blendv(e * v, zero, e == zero);  // 0 * -inf counts as 0
        vz = vz + v;
        vsq = vsq + e * e;
      }
      e.store(c + i);
    }
    A tail_sum = 0, tail_pz = 0, tail_z = 0, tail_sq = 0;
    for (; i < len; ++i) {
      const A v = c[i];
      const A e = std::exp(v - shift);
      tail_sum += e;
      if constexpr (STATS) {
        tail_pz += e == 0 ? A(0) : e * v;
        tail_z += v;
        tail_sq += e * e;
      }
      c[i] = e;
    }
    if constexpr (STATS) {
      f.pz = f.pz * scale + at::vec::vec_reduce_all<A>(add, vpz) + tail_pz;
      f.sq = f.sq * (scale * scale) + at::vec::vec_reduce_all<A>(add, vsq) + tail_sq;
      f.zsum += at::vec::vec_reduce_all<A>(add, vz) + tail_z;
    }
    f.s = f.s * scale + (at::vec::vec_reduce_all<A>(add, vsum) + tail_sum);
    f.m = m_new;
    shifts[k] = shift;
  }
  const A lse = f.m + std::log(f.s);
  k = 0;
  for (int64_t start = 0; start < V; start += kChunk, ++k) {
    const int64_t len = std::min(kChunk, V - start);
    const VA factor(-std::exp(shifts[k] - lse));
    at::vec::map([&](VA e) { return e * factor; }, x + start, x + start, len);
  }
  if (label >= 0) x[label] += A(1);
}

// Fills p[0, n) with zeros.
template <typename S>
inline void row_zero(S* p, int64_t n) {
  std::fill(p, p + n, S(0));
}

}  // namespace CPU_CAPABILITY
}  // namespace dpo_kernels
