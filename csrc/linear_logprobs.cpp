// Fused LM head + token log-probs on CPU: the logits are never materialized.
//
// The counted tokens' hidden rows [M, H] are processed in tiles of token_tile rows; each tile is
// projected one vocabulary block at a time into a single [token_tile, vocab_block] buffer (ATen
// matmul, i.e. BLAS), and the vectorized row primitives of vec_rows.h fold it into a per-token
// online log-sum-exp (forward) or turn it into the logits' gradient in place (backward). The
// backward recomputes each tile and accumulates dh += dx @ W_blk per tile and dW_blk += dx.T @ h
// across tiles, in the accumulation dtype; dW and db are cast to the weight's dtype once, at the
// end. Same contract as dpo_kernels/ops/reference.py::linear_token_logprobs(_backward).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common.h"
#include "vec_rows.h"

namespace dpo_kernels {
namespace {

constexpr int64_t kRowGrain = 8;  // tile rows per parallel task

template <typename A>
LogitTransform<A> make_transform(double logit_scale, std::optional<double> softcap,
                                 double temperature) {
  return {static_cast<A>(logit_scale / temperature), static_cast<A>(softcap.value_or(0.0))};
}

// The projection of one call: x = h @ W_blk.T + b_blk into one preallocated tile buffer, in the
// accumulation dtype. bf16/fp16 rows and weight blocks are copied to float32 first: ATen's CPU
// matmul has no bf16 x bf16 -> float32 form, and a bf16 tile would round the logits.
class Projection {
 public:
  Projection(const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t rows,
             int64_t token_tile, int64_t vocab_block)
      : weight_(weight.contiguous()),
        acc_(acc_dtype(weight.scalar_type())),
        upcast_(acc_ != weight.scalar_type()),
        tile_rows_(std::min(token_tile, rows)),
        block_(std::min(vocab_block, weight.size(0))) {
    const auto opts = weight.options().dtype(acc_);
    tile_ = at::empty({tile_rows_ * block_}, opts);
    if (bias) bias_ = bias->to(acc_);
    if (upcast_) {
      rows_ = at::empty({tile_rows_, weight.size(1)}, opts);
      wblock_ = at::empty({block_, weight.size(1)}, opts);
    }
  }

  int64_t tile_rows() const { return tile_rows_; }
  int64_t block() const { return block_; }
  int64_t vocab() const { return weight_.size(0); }

  // Rows [start, start + n) of hidden, in the accumulation dtype.
  at::Tensor rows(const at::Tensor& hidden, int64_t start, int64_t n) {
    const at::Tensor h = hidden.narrow(0, start, n);
    return upcast_ ? rows_.narrow(0, 0, n).copy_(h) : h;
  }

  // Weight rows [start, start + n), in the accumulation dtype.
  at::Tensor weight_block(int64_t start, int64_t n) {
    const at::Tensor w = weight_.narrow(0, start, n);
    return upcast_ ? wblock_.narrow(0, 0, n).copy_(w) : w;
  }

  // [n, nv] contiguous: h @ w.T (+ bias[start, start + nv)).
  at::Tensor project(const at::Tensor& h, const at::Tensor& w, int64_t start) {
    const int64_t n = h.size(0), nv = w.size(0);
    at::Tensor x = tile_.narrow(0, 0, n * nv).view({n, nv});
    if (bias_.defined()) {
      at::addmm_out(x, bias_.narrow(0, start, nv), h, w.t());
    } else {
      at::mm_out(x, h, w.t());
    }
    return x;
  }

 private:
  at::Tensor weight_, bias_, tile_, rows_, wblock_;
  at::ScalarType acc_;
  bool upcast_;
  int64_t tile_rows_, block_;
};

// One token tile through every vocabulary block: per-row statistics folded across blocks.
template <typename A, bool STATS>
void forward_tiles(const at::Tensor& hidden, Projection& proj, const LogitTransform<A>& tf,
                   const int64_t* yp, A* tok_p, A* lse_p, A* ent_p, A* mean_p, bool* top1_p,
                   A* sq_p) {
  const int64_t M = hidden.size(0), V = proj.vocab();
  std::vector<RowFold<A>> fold(proj.tile_rows());
  for (int64_t ts = 0; ts < M; ts += proj.tile_rows()) {
    const int64_t n = std::min(proj.tile_rows(), M - ts);
    const at::Tensor h = proj.rows(hidden, ts, n);
    std::fill(fold.begin(), fold.end(), RowFold<A>{});
    for (int64_t vs = 0; vs < V; vs += proj.block()) {
      const int64_t nv = std::min(proj.block(), V - vs);
      at::Tensor x = proj.project(h, proj.weight_block(vs, nv), vs);
      A* xp = x.data_ptr<A>();
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          A* row = xp + r * nv;
          if (!tf.identity()) row_transform(row, nv, tf);
          const int64_t local = yp[ts + r] - vs;
          if (local >= 0 && local < nv) tok_p[ts + r] = row[local];  // the label's logit
          fold_row<A, STATS>(row, nv, fold[r], vs);
        }
      });
    }
    for (int64_t r = 0; r < n; ++r) {
      const RowFold<A>& f = fold[r];
      const A lse = f.m + std::log(f.s);
      lse_p[ts + r] = lse;
      tok_p[ts + r] -= lse;
      if constexpr (STATS) {
        ent_p[ts + r] = lse - f.pz / f.s;
        mean_p[ts + r] = f.zsum / static_cast<A>(V);
        top1_p[ts + r] = f.arg == yp[ts + r] && !std::isnan(lse);  // NaN: no argmax
        sq_p[ts + r] = log_sum_sq(f);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_logprobs_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double logit_scale, std::optional<double> softcap,
    double temperature, bool stats, int64_t token_tile, int64_t vocab_block) {
  const int64_t M = hidden.size(0);
  const auto opts = hidden.options().dtype(acc_dtype(hidden.scalar_type()));
  // A target of -1 (the label is not in this weight: vocabulary-parallel) leaves tok = -lse.
  at::Tensor tok = at::zeros({M}, opts);
  at::Tensor lse = at::empty({M}, opts);
  const int64_t n_stats = stats ? M : 0;
  at::Tensor ent = at::empty({n_stats}, opts), mean = at::empty({n_stats}, opts);
  at::Tensor top1 = at::empty({n_stats}, opts.dtype(at::kBool));
  at::Tensor sq = at::empty({n_stats}, opts);
  if (M == 0) return {tok, lse, ent, mean, top1, sq};
  const at::Tensor y = targets.to(at::kLong).contiguous();
  Projection proj(weight, bias, M, token_tile, vocab_block);
  AT_DISPATCH_FLOATING_TYPES(tok.scalar_type(), "linear_logprobs_forward", [&] {
    using A = scalar_t;
    const LogitTransform<A> tf = make_transform<A>(logit_scale, softcap, temperature);
    const int64_t* yp = y.const_data_ptr<int64_t>();
    if (stats) {
      forward_tiles<A, true>(hidden, proj, tf, yp, tok.data_ptr<A>(), lse.data_ptr<A>(),
                             ent.data_ptr<A>(), mean.data_ptr<A>(), top1.data_ptr<bool>(),
                             sq.data_ptr<A>());
    } else {
      forward_tiles<A, false>(hidden, proj, tf, yp, tok.data_ptr<A>(), lse.data_ptr<A>(),
                              nullptr, nullptr, nullptr, nullptr);
    }
  });
  return {tok, lse, ent, mean, top1, sq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    double logit_scale, std::optional<double> softcap, double temperature, bool hidden_grad,
    bool weight_grad, bool bias_grad, int64_t token_tile, int64_t vocab_block) {
  const int64_t M = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const at::ScalarType acc = acc_dtype(hidden.scalar_type());
  const auto acc_opts = hidden.options().dtype(acc);
  const at::Tensor empty = at::empty({0}, hidden.options());
  // All three in the accumulation dtype: callers round each once, to its input's own dtype.
  at::Tensor dh = hidden_grad ? at::empty({M, H}, acc_opts) : empty;
  at::Tensor dw = weight_grad ? at::zeros({V, H}, acc_opts) : at::Tensor();
  at::Tensor db = bias_grad && bias ? at::zeros({V}, acc_opts) : at::Tensor();
  if (M > 0) {
    const at::Tensor y = targets.to(at::kLong).contiguous();
    const at::Tensor g = grad.to(acc).contiguous();
    const at::Tensor l = lse.to(acc).contiguous();
    Projection proj(weight, bias, M, token_tile, vocab_block);
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprobs_backward", [&] {
      using A = scalar_t;
      const LogitTransform<A> tf = make_transform<A>(logit_scale, softcap, temperature);
      const int64_t* yp = y.const_data_ptr<int64_t>();
      const A* gp = g.const_data_ptr<A>();
      const A* lp = l.const_data_ptr<A>();
      for (int64_t ts = 0; ts < M; ts += proj.tile_rows()) {
        const int64_t n = std::min(proj.tile_rows(), M - ts);
        const at::Tensor h = proj.rows(hidden, ts, n);
        at::Tensor dht = hidden_grad ? dh.narrow(0, ts, n).zero_() : at::Tensor();
        for (int64_t vs = 0; vs < V; vs += proj.block()) {
          const int64_t nv = std::min(proj.block(), V - vs);
          const at::Tensor w = proj.weight_block(vs, nv);
          at::Tensor x = proj.project(h, w, vs);
          A* xp = x.data_ptr<A>();
          at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end; ++r) {
              const int64_t local = yp[ts + r] - vs;
              const int64_t label = (local >= 0 && local < nv) ? local : -1;
              row_linear_logprob_grad(xp + r * nv, nv, lp[ts + r], gp[ts + r], label, tf);
            }
          });
          if (hidden_grad) dht.addmm_(x, w);
          if (dw.defined()) dw.narrow(0, vs, nv).addmm_(x.t(), h);
          if (db.defined()) db.narrow(0, vs, nv).add_(x.sum(0));
        }
      }
    });
  }
  return {dh, dw.defined() ? dw : empty, db.defined() ? db : empty};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpo_kernels_cpu, m) {
  m.def(
      "linear_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "float logit_scale, float? softcap, float temperature, bool stats, int token_tile, "
      "int vocab_block) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprobs_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor targets, Tensor lse, float logit_scale, float? softcap, float temperature, "
      "bool hidden_grad, bool weight_grad, bool bias_grad, int token_tile, int vocab_block) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dpo_kernels_cpu, CPU, m) {
  m.impl("linear_logprobs_forward", &linear_logprobs_forward);
  m.impl("linear_logprobs_backward", &linear_logprobs_backward);
}

}  // namespace dpo_kernels
