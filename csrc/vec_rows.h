// Vectorized row primitives over one row of logits: log-sum-exp and the log-softmax gradient.
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

// What one pass over a row yields: its log-sum-exp and, when asked, the statistics trainers log.
template <typename A>
struct RowStats {
  A lse;
  A entropy = 0;    // lse - sum_v p_v z_v
  A mean = 0;       // sum_v z_v / V
  int64_t arg = -1;  // first index of the maximum
};

// Log-sum-exp of the row p[0, V) in acc precision, one pass over memory; with STATS also the
// entropy, the mean logit and the first argmax (a third, L1-resident pass over chunks whose
// maximum beats the running one).
template <typename S, bool STATS = false>
inline RowStats<acc_t<S>> row_stats(const S* p, int64_t V) {
  using A = acc_t<S>;
  using VA = Vectorized<A>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  A m = kNegInf;
  A s = 0, pz = 0, zsum = 0;
  int64_t arg = -1;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const S* c = p + start;
    VA vmax(kNegInf);
    A tail_max = kNegInf;
    for_each_vec(
        c, n, [&](const VA& x) { vmax = at::vec::maximum(vmax, x); },
        [&](A x) { tail_max = max_nan(tail_max, x); });
    A chunk_max = at::vec::vec_reduce_all<A>(
        [](VA& a, VA& b) { return at::vec::maximum(a, b); }, vmax);
    chunk_max = max_nan(chunk_max, tail_max);
    const A m_new = max_nan(m, chunk_max);
    // Nothing finite seen yet: shift by 0 so that exp(-inf - shift) = 0 rather than NaN.
    const A shift = (m_new == kNegInf) ? A(0) : m_new;
    const A scale = std::exp(m - shift);
    const VA vshift(shift);
    VA vsum(A(0));
    A tail_sum = 0;
    if constexpr (STATS) {
      VA vpz(A(0)), vz(A(0));
      const VA zero(A(0));
      A tail_pz = 0, tail_z = 0;
      for_each_vec(
          c, n,
          [&](const VA& x) {
            const VA e = (x - vshift).exp();
            vsum = vsum + e;
            vpz = vpz + VA::blendv(e * x, zero, e == zero);  // 0 * -inf counts as 0
            vz = vz + x;
          },
          [&](A x) {
            const A e = std::exp(x - shift);
            tail_sum += e;
            tail_pz += e == 0 ? A(0) : e * x;
            tail_z += x;
          });
      auto add = [](VA& a, VA& b) { return a + b; };
      pz = pz * scale + at::vec::vec_reduce_all<A>(add, vpz) + tail_pz;
      zsum += at::vec::vec_reduce_all<A>(add, vz) + tail_z;
      if (chunk_max > m) {  // strictly: an earlier chunk keeps a tie
        for (int64_t i = 0; i < n; ++i) {
          if (static_cast<A>(c[i]) == chunk_max) {
            arg = start + i;
            break;
          }
        }
      }
    } else {
      for_each_vec(
          c, n, [&](const VA& x) { vsum = vsum + (x - vshift).exp(); },
          [&](A x) { tail_sum += std::exp(x - shift); });
    }
    const A chunk_sum = at::vec::vec_reduce_all<A>([](VA& a, VA& b) { return a + b; }, vsum);
    s = s * scale + (chunk_sum + tail_sum);
    m = m_new;
  }
  RowStats<A> out{m + std::log(s)};
  if constexpr (STATS) {
    out.entropy = out.lse - pz / s;
    out.mean = zsum / static_cast<A>(V);
    out.arg = arg;
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

// Fills p[0, n) with zeros.
template <typename S>
inline void row_zero(S* p, int64_t n) {
  std::fill(p, p + n, S(0));
}

}  // namespace CPU_CAPABILITY
}  // namespace dpo_kernels
