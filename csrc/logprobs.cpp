// Fused token log-probs on CPU: forward (log-sum-exp + label gather, one read of the logits) and
// backward (g * (onehot - softmax), one read and one write), parallel over token rows.
//
// Same contract as dpo_kernels/ops/reference.py::token_logprobs / token_logprobs_backward.
// Each row is handled by one thread from start to end, so results do not depend on the thread count
// and are bitwise identical across runs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "vec_rows.h"

namespace dpo_kernels {
namespace {

// Where the counted tokens are: label != ignore_index and mask != 0, read through any strides.
struct TokenIndex {
  const int64_t* labels;
  const bool* mask;  // may be null
  int64_t T, s_yb, s_yt, s_mb, s_mt;
  int64_t ignore_index;

  TokenIndex(const at::Tensor& labels_l, const at::Tensor* mask_b, int64_t ignore)
      : labels(labels_l.data_ptr<int64_t>()),
        mask(mask_b ? mask_b->data_ptr<bool>() : nullptr),
        T(labels_l.size(1)),
        s_yb(labels_l.stride(0)),
        s_yt(labels_l.stride(1)),
        s_mb(mask_b ? mask_b->stride(0) : 0),
        s_mt(mask_b ? mask_b->stride(1) : 0),
        ignore_index(ignore) {}

  // The label of row r = b * T + t, or -1 when the token does not count.
  int64_t label(int64_t r) const {
    const int64_t b = r / T, t = r % T;
    const int64_t y = labels[b * s_yb + t * s_yt];
    if (y == ignore_index) return -1;
    if (mask && !mask[b * s_mb + t * s_mt]) return -1;
    return y;
  }
};

// tok[r] = z[label] - lse, lse_out[r] = lse for counted rows; both 0 for the rest.
void forward_rows(const at::Tensor& z, const TokenIndex& idx, at::Tensor& tok, at::Tensor* lse_out) {
  const int64_t T = z.size(1), V = z.size(2), N = z.size(0) * T;
  const int64_t s_b = z.stride(0), s_t = z.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "logprobs_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* base = z.const_data_ptr<scalar_t>();
    A* tok_p = tok.data_ptr<A>();
    A* lse_p = lse_out ? lse_out->data_ptr<A>() : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = idx.label(r);
        A lp = 0, lse = 0;
        if (y >= 0) {
          const scalar_t* row = base + (r / T) * s_b + (r % T) * s_t;
          lse = row_logsumexp(row, V);
          lp = static_cast<A>(row[y]) - lse;
        }
        tok_p[r] = lp;
        if (lse_p) lse_p[r] = lse;
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& ref_logits, int64_t ignore_index) {
  const at::Tensor z = vocab_contiguous(logits);
  const at::Tensor y = labels.to(at::kLong);
  const std::optional<at::Tensor> m = bool_mask(mask);
  const TokenIndex idx(y, m ? &*m : nullptr, ignore_index);
  const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
  at::Tensor tok = at::empty({z.size(0), z.size(1)}, opts);
  at::Tensor lse = at::empty({z.size(0), z.size(1)}, opts);
  forward_rows(z, idx, tok, &lse);
  at::Tensor ref_tok;
  if (ref_logits) {
    const at::Tensor rz = vocab_contiguous(*ref_logits);
    ref_tok = at::empty({z.size(0), z.size(1)}, rz.options().dtype(acc_dtype(rz.scalar_type())));
    forward_rows(rz, idx, ref_tok, nullptr);
  } else {
    ref_tok = at::empty({0}, opts);
  }
  return {tok, lse, ref_tok};
}

at::Tensor logprobs_backward(const at::Tensor& grad_tok, const at::Tensor& logits,
                             const at::Tensor& labels, const std::optional<at::Tensor>& mask,
                             const at::Tensor& lse, int64_t ignore_index) {
  const at::Tensor z = vocab_contiguous(logits);
  const at::Tensor y = labels.to(at::kLong);
  const std::optional<at::Tensor> m = bool_mask(mask);
  const TokenIndex idx(y, m ? &*m : nullptr, ignore_index);
  const int64_t T = z.size(1), V = z.size(2), N = z.size(0) * T;
  const int64_t s_b = z.stride(0), s_t = z.stride(1);
  at::Tensor dz = empty_hugepage({z.size(0), T, V}, z.options());
  const at::ScalarType acc = acc_dtype(z.scalar_type());
  const at::Tensor g = grad_tok.to(acc);
  const at::Tensor l = lse.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "logprobs_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* out = dz.data_ptr<scalar_t>();
    const A* gp = g.const_data_ptr<A>();
    const int64_t s_gb = g.stride(0), s_gt = g.stride(1);
    const A* lp = l.const_data_ptr<A>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t label = idx.label(r);
        scalar_t* o = out + r * V;
        if (label < 0) {
          row_zero(o, V);
          continue;
        }
        const int64_t b = r / T, t = r % T;
        row_logsoftmax_grad(zp + b * s_b + t * s_t, o, V, lp[r], gp[b * s_gb + t * s_gt], label);
      }
    });
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpo_kernels_cpu, m) {
  m.def(
      "logprobs_forward(Tensor logits, Tensor labels, Tensor? mask, Tensor? ref_logits, "
      "int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_backward(Tensor grad_tok, Tensor logits, Tensor labels, Tensor? mask, Tensor lse, "
      "int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpo_kernels_cpu, CPU, m) {
  m.impl("logprobs_forward", &logprobs_forward);
  m.impl("logprobs_backward", &logprobs_backward);
}

}  // namespace dpo_kernels
