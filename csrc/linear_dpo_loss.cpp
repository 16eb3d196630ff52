// Row kernels of the fused linear losses on CPU (dpo_kernels/linear_dpo_chunks.py).
//
// The Python driver projects one chunk of pairs' counted tokens into a single float32 (float64)
// buffer x [n, V] with ATen matmuls; these three kernels do the per-row work in between:
//   linear_dpo_rows_fold: one read of x: folds each row into a running log-sum-exp (and, when
//                         asked, the entropy / mean / argmax / sum p^2 statistics trainers log)
//                         and picks the label's z, x left intact; running state, so a row may
//                         come in vocabulary blocks.
//   linear_dpo_rows_fold_softmax: the fold of whole rows, then (row still in cache) x <- q =
//                         (onehot - softmax(z(x))) * dz/dx: the gradient before the loss's
//                         per-row factor, so the 3-matmul route reads its logits once.
//   linear_dpo_rows_grad: x <- g * (onehot - softmax(z(x))) * dz/dx, in place (one read, one
//                         write), once each pair's loss gradient g is known.
// z(x) is the logit transform of ops/reference.py::LogitTransform. Rows are split over threads,
// one thread per row, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "vec_rows.h"

namespace dpo_kernels {
namespace {

template <typename A>
LogitTransform<A> transform_of(double logit_scale, std::optional<double> softcap,
                               double temperature) {
  return {static_cast<A>(logit_scale / temperature), static_cast<A>(softcap.value_or(0.0))};
}

void check_rows(const at::Tensor& x, const at::Tensor& targets) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [n, V] buffer");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == x.size(0), "targets must be [n]");
}

// The fold kernels' per-row state, read and written in place: m (max), s (sum of exp(z - m)),
// target [n] (the label's z) and, with STATS, stats [3, n] (pz, zsum, sq as in vec_rows.h's
// RowFold) and arg [n] (int64 first argmax, -1 before any block): the statistics trainers log.
template <typename A, bool STATS>
struct RowState {
  A *m, *s, *target, *st;
  int64_t* arg;
  int64_t n;

  RowFold<A> load(int64_t r) const {
    RowFold<A> f;
    f.m = m[r];
    f.s = s[r];
    if constexpr (STATS) {
      f.pz = st[r];
      f.zsum = st[n + r];
      f.sq = st[2 * n + r];
      f.arg = arg[r];
    }
    return f;
  }

  void store(int64_t r, const RowFold<A>& f) const {
    m[r] = f.m;
    s[r] = f.s;
    if constexpr (STATS) {
      st[r] = f.pz;
      st[n + r] = f.zsum;
      st[2 * n + r] = f.sq;
      arg[r] = f.arg;
    }
  }
};

// z of the logit x.
template <typename A>
A transformed(A x, const LogitTransform<A>& tf) {
  if (!tf.identity()) row_transform(&x, 1, tf);
  return x;
}

// Folds z(row) of a row of V logits (the first at index vocab_start) into f, a non-identity
// transform an L1-sized piece at a time through scratch [min(kChunk, V)]: the row stays as it is.
template <typename A, bool STATS>
void fold_any(const A* row, int64_t V, RowFold<A>& f, int64_t vocab_start,
              const LogitTransform<A>& tf, A* scratch) {
  if (tf.identity()) {
    fold_row<A, STATS>(row, V, f, vocab_start);
    return;
  }
  for (int64_t s = 0; s < V; s += kChunk) {
    const int64_t len = std::min(kChunk, V - s);
    std::copy(row + s, row + s + len, scratch);
    row_transform(scratch, len, tf);
    fold_row<A, STATS>(scratch, len, f, vocab_start + s);
  }
}

// Folds x's rows (vocabulary [vocab_start, vocab_start + nv) of each token) into the running
// state; target[r] <- the label's z where targets[r] (a global id) is in x.
template <typename A, bool STATS>
void fold_rows(const at::Tensor& x, const int64_t* yp, const RowState<A, STATS>& state,
               int64_t vocab_start, const LogitTransform<A>& tf) {
  const int64_t V = x.size(1);
  const A* xp = x.const_data_ptr<A>();
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(tf.identity() ? 0 : std::min<int64_t>(kChunk, V));
    for (int64_t r = begin; r < end; ++r) {
      const A* row = xp + r * V;
      RowFold<A> f = state.load(r);
      fold_any<A, STATS>(row, V, f, vocab_start, tf, scratch.data());
      state.store(r, f);
      const int64_t y = yp[r] - vocab_start;
      if (y >= 0 && y < V) state.target[r] = transformed(row[y], tf);
    }
  });
}

// fold_rows over whole rows (vocab_start 0, fresh state) that then become, in place,
// q = (onehot(label) - softmax(z(x))) * dz/dx: the logits' gradient of log p[label], before the
// loss's per-row factor g (which the caller applies to the matmuls' operands). Identity
// transform: one exp per element and one pass over memory (row_fold_softmax).
template <typename A, bool STATS>
void fold_softmax_rows(at::Tensor& x, const int64_t* yp, const RowState<A, STATS>& state,
                       const LogitTransform<A>& tf) {
  const int64_t V = x.size(1);
  A* xp = x.data_ptr<A>();
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<A> shifts((V + kChunk - 1) / kChunk);
    std::vector<A> scratch(tf.identity() ? 0 : std::min<int64_t>(kChunk, V));
    for (int64_t r = begin; r < end; ++r) {
      A* row = xp + r * V;
      const int64_t y = (yp[r] >= 0 && yp[r] < V) ? yp[r] : -1;
      RowFold<A> f;
      if (y >= 0) state.target[r] = transformed(row[y], tf);
      if (tf.identity()) {
        row_fold_softmax<A, STATS>(row, V, f, y, shifts.data());
      } else {  // fold a transformed copy of each piece, then the gradient (row still cached)
        fold_any<A, STATS>(row, V, f, 0, tf, scratch.data());
        row_linear_logprob_grad(row, V, f.m + std::log(f.s), A(1), y, tf);
      }
      state.store(r, f);
    }
  });
}

// The fold kernels' outputs: m, s, target [n] and, with statistics, stats [3, n] and arg [n].
// Returns whether statistics are asked for (stats not empty).
bool check_fold_outputs(const at::Tensor& x, const at::Tensor& targets, const at::Tensor& m,
                        const at::Tensor& s, const at::Tensor& target, const at::Tensor& stats,
                        const at::Tensor& arg) {
  check_rows(x, targets);
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

// Calls body(state) with the fold kernels' checked outputs as a RowState, its STATS fixed by
// whether stats are asked for, and A the dtype of x.
template <typename A, typename Body>
void with_row_state(at::Tensor& m, at::Tensor& s, at::Tensor& target, at::Tensor& stats,
                    at::Tensor& arg, bool with_stats, Body&& body) {
  const int64_t n = m.numel();
  if (with_stats) {
    body(RowState<A, true>{m.data_ptr<A>(), s.data_ptr<A>(), target.data_ptr<A>(),
                           stats.data_ptr<A>(), arg.data_ptr<int64_t>(), n});
  } else {
    body(RowState<A, false>{m.data_ptr<A>(), s.data_ptr<A>(), target.data_ptr<A>(), nullptr,
                            nullptr, n});
  }
}

void linear_dpo_rows_fold_softmax(at::Tensor& x, const at::Tensor& targets, at::Tensor& m,
                                  at::Tensor& s, at::Tensor& target, at::Tensor& stats,
                                  at::Tensor& arg, double logit_scale,
                                  std::optional<double> softcap, double temperature) {
  const bool with_stats = check_fold_outputs(x, targets, m, s, target, stats, arg);
  const at::Tensor y = targets.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_dpo_rows_fold_softmax", [&] {
    using A = scalar_t;
    const LogitTransform<A> tf = transform_of<A>(logit_scale, softcap, temperature);
    with_row_state<A>(m, s, target, stats, arg, with_stats, [&](const auto& state) {
      fold_softmax_rows(x, y.const_data_ptr<int64_t>(), state, tf);
    });
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
    with_row_state<A>(m, s, target, stats, arg, with_stats, [&](const auto& state) {
      fold_rows(x, y.const_data_ptr<int64_t>(), state, vocab_start, tf);
    });
  });
}

void linear_dpo_rows_grad(at::Tensor& x, const at::Tensor& targets, const at::Tensor& grad,
                          const at::Tensor& lse, double logit_scale, std::optional<double> softcap,
                          double temperature) {
  check_rows(x, targets);
  const int64_t n = x.size(0), V = x.size(1);
  const at::Tensor y = targets.to(at::kLong).contiguous();
  const at::Tensor g = grad.to(x.scalar_type()).contiguous();
  const at::Tensor l = lse.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_dpo_rows_grad", [&] {
    using A = scalar_t;
    const LogitTransform<A> tf = transform_of<A>(logit_scale, softcap, temperature);
    A* xp = x.data_ptr<A>();
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const A* gp = g.const_data_ptr<A>();
    const A* lp = l.const_data_ptr<A>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = (yp[r] >= 0 && yp[r] < V) ? yp[r] : -1;
        row_linear_logprob_grad(xp + r * V, V, lp[r], gp[r], y, tf);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpo_kernels_cpu, m) {
  m.def(
      "linear_dpo_rows_fold_softmax(Tensor(a!) x, Tensor targets, Tensor(b!) m, Tensor(c!) s, "
      "Tensor(d!) target, Tensor(e!) stats, Tensor(f!) arg, float logit_scale, float? softcap, "
      "float temperature) -> ()");
  m.def(
      "linear_dpo_rows_fold(Tensor x, Tensor targets, Tensor(a!) m, Tensor(b!) s, "
      "Tensor(c!) target, Tensor(d!) stats, Tensor(e!) arg, int vocab_start, float logit_scale, "
      "float? softcap, float temperature) -> ()");
  m.def(
      "linear_dpo_rows_grad(Tensor(a!) x, Tensor targets, Tensor grad, Tensor lse, "
      "float logit_scale, float? softcap, float temperature) -> ()");
}

TORCH_LIBRARY_IMPL(dpo_kernels_cpu, CPU, m) {
  m.impl("linear_dpo_rows_fold", &linear_dpo_rows_fold);
  m.impl("linear_dpo_rows_fold_softmax", &linear_dpo_rows_fold_softmax);
  m.impl("linear_dpo_rows_grad", &linear_dpo_rows_grad);
}

}  // namespace dpo_kernels
