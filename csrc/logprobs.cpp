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

// Per-row outputs of the forward; null pointers are not written. Rows that do not count get 0s.
template <typename A>
struct RowOutputs {
  A* tok;  // z[label] - lse
  A* lse;
  A* entropy;  // with stats
  A* mean;
  bool* top1;
  A* log_sum_sq;
};

template <typename scalar_t, bool STATS>
void forward_rows_impl(const at::Tensor& z, const TokenIndex& idx, RowOutputs<acc_t<scalar_t>> o) {
  using A = acc_t<scalar_t>;
  const int64_t T = z.size(1), V = z.size(2), N = z.size(0) * T;
  const int64_t s_b = z.stride(0), s_t = z.stride(1);
  const scalar_t* base = z.const_data_ptr<scalar_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = idx.label(r);
      RowStats<A> st{0};
      A lp = 0;
      if (y >= 0) {
        const scalar_t* row = base + (r / T) * s_b + (r % T) * s_t;
        st = row_stats<scalar_t, STATS>(row, V);
        lp = static_cast<A>(row[y]) - st.lse;
      }
      o.tok[r] = lp;
      if (o.lse) o.lse[r] = st.lse;
      if constexpr (STATS) {
        o.entropy[r] = st.entropy;
        o.mean[r] = st.mean;
        o.top1[r] = y >= 0 && st.arg == y;
        o.log_sum_sq[r] = st.log_sum_sq;
      }
    }
  });
}

// Fills `tok` (and `lse`, and with `stats` the three statistics) for every row of z.
void forward_rows(const at::Tensor& z, const TokenIndex& idx, at::Tensor& tok, at::Tensor* lse,
                  at::Tensor* stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "logprobs_forward", [&] {
    using A = acc_t<scalar_t>;
    RowOutputs<A> o{tok.data_ptr<A>(), lse ? lse->data_ptr<A>() : nullptr, nullptr, nullptr,
                    nullptr, nullptr};
    if (stats) {
      o.entropy = stats[0].data_ptr<A>();
      o.mean = stats[1].data_ptr<A>();
      o.top1 = stats[2].data_ptr<bool>();
      o.log_sum_sq = stats[3].data_ptr<A>();
      forward_rows_impl<scalar_t, true>(z, idx, o);
    } else {
      forward_rows_impl<scalar_t, false>(z, idx, o);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
logprobs_forward(const at::Tensor& logits, const at::Tensor& labels,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref_logits,
                 int64_t ignore_index, bool stats) {
  const at::Tensor z = vocab_contiguous(logits);
  const at::Tensor y = labels.to(at::kLong);
  const std::optional<at::Tensor> m = bool_mask(mask);
  const TokenIndex idx(y, m ? &*m : nullptr, ignore_index);
  const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
  const int64_t B = z.size(0), T = z.size(1);
  at::Tensor tok = at::empty({B, T}, opts);
  at::Tensor lse = at::empty({B, T}, opts);
  at::Tensor st[4] = {at::empty({0}, opts), at::empty({0}, opts),
                      at::empty({0}, opts.dtype(at::kBool)), at::empty({0}, opts)};
  if (stats) {
    st[0] = at::empty({B, T}, opts);
    st[1] = at::empty({B, T}, opts);
    st[2] = at::empty({B, T}, opts.dtype(at::kBool));
    st[3] = at::empty({B, T}, opts);
  }
  forward_rows(z, idx, tok, &lse, stats ? st : nullptr);
  at::Tensor ref_tok = at::empty({0}, opts);
  if (ref_logits) {
    const at::Tensor rz = vocab_contiguous(*ref_logits);
    ref_tok = at::empty({B, T}, rz.options().dtype(acc_dtype(rz.scalar_type())));
    forward_rows(rz, idx, ref_tok, nullptr, nullptr);
  }
  return {tok, lse, ref_tok, st[0], st[1], st[2], st[3]};
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
      "int ignore_index, bool stats) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_backward(Tensor grad_tok, Tensor logits, Tensor labels, Tensor? mask, Tensor lse, "
      "int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpo_kernels_cpu, CPU, m) {
  m.impl("logprobs_forward", &logprobs_forward);
  m.impl("logprobs_backward", &logprobs_backward);
}

}  // namespace dpo_kernels
