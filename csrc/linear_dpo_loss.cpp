// Row kernels of the fused linear DPO loss on CPU (dpo_kernels/linear_dpo.py).
//
// The Python driver projects one chunk of pairs' counted tokens into a single float32 (float64)
// buffer x [n, V] with ATen matmuls; these two kernels do the per-row work in between:
//   linear_dpo_rows_lse:  one read of x: per-row log-sum-exp of z(x) and the label's z (0 for a
//                         label outside [0, V)), x left intact.
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

std::tuple<at::Tensor, at::Tensor> linear_dpo_rows_lse(const at::Tensor& x,
                                                       const at::Tensor& targets,
                                                       double logit_scale,
                                                       std::optional<double> softcap,
                                                       double temperature) {
  check_rows(x, targets);
  const int64_t n = x.size(0), V = x.size(1);
  at::Tensor lse = at::empty({n}, x.options());
  at::Tensor target = at::empty({n}, x.options());
  const at::Tensor y = targets.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_dpo_rows_lse", [&] {
    using A = scalar_t;
    const LogitTransform<A> tf = transform_of<A>(logit_scale, softcap, temperature);
    const A* xp = x.const_data_ptr<A>();
    const int64_t* yp = y.const_data_ptr<int64_t>();
    A* lp = lse.data_ptr<A>();
    A* tp = target.data_ptr<A>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(tf.identity() ? 0 : std::min<int64_t>(kChunk, V));
      for (int64_t r = begin; r < end; ++r) {
        const A* row = xp + r * V;
        RowFold<A> f;
        if (tf.identity()) {
          fold_row<A, false>(row, V, f);
        } else {  // transform an L1-sized piece at a time into scratch: x stays as it is
          for (int64_t s = 0; s < V; s += kChunk) {
            const int64_t len = std::min(kChunk, V - s);
            std::copy(row + s, row + s + len, scratch.data());
            row_transform(scratch.data(), len, tf);
            fold_row<A, false>(scratch.data(), len, f, s);
          }
        }
        lp[r] = f.m + std::log(f.s);
        const int64_t y = yp[r];  // -1 (or any index outside the row): the label is elsewhere
        A z = (y >= 0 && y < V) ? row[y] : A(0);
        if (y >= 0 && y < V && !tf.identity()) row_transform(&z, 1, tf);
        tp[r] = z;
      }
    });
  });
  return {lse, target};
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
      "linear_dpo_rows_lse(Tensor x, Tensor targets, float logit_scale, float? softcap, "
      "float temperature) -> (Tensor, Tensor)");
  m.def(
      "linear_dpo_rows_grad(Tensor(a!) x, Tensor targets, Tensor grad, Tensor lse, "
      "float logit_scale, float? softcap, float temperature) -> ()");
}

TORCH_LIBRARY_IMPL(dpo_kernels_cpu, CPU, m) {
  m.impl("linear_dpo_rows_lse", &linear_dpo_rows_lse);
  m.impl("linear_dpo_rows_grad", &linear_dpo_rows_grad);
}

}  // namespace dpo_kernels
