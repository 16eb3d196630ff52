// The LM head's projection of one chunk of token rows on CPU: out = h @ w.T, split over the
// threads by vocabulary rows of w rather than left to one multi-threaded BLAS call.
//
// At a few hundred token rows and a wide vocabulary ([n ~ 400, H] x [H, V ~ 32000]), one
// multi-threaded BLAS call is markedly slower per flop than the other two matmuls of the fused
// loss. Cut into blocks of about 1 MiB of w (a core's L2 on the machine of BENCHMARKS.md), each
// thread taking its share of the blocks with one single-threaded BLAS call per block, it is not:
// the fused loss's 12 matmuls at one DPO pair per chunk take about 4% less time (BENCHMARKS.md,
// "The projection split by vocabulary"). Reference: torch.mm(h, w.T, out=out).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace dpo_kernels {
namespace {

constexpr int64_t kBlockBytes = int64_t(1) << 20;  // of w per block

void vocab_blocked_mm(at::Tensor& out, const at::Tensor& h, const at::Tensor& w) {
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && out.dim() == 2,
              "vocab_blocked_mm: h [n, H], w [V, H] and out [n, V] must be matrices");
  TORCH_CHECK(h.size(1) == w.size(1) && out.size(0) == h.size(0) && out.size(1) == w.size(0),
              "vocab_blocked_mm: shapes do not match: h ", h.sizes(), ", w ", w.sizes(), ", out ",
              out.sizes());
  TORCH_CHECK(h.scalar_type() == w.scalar_type() && out.scalar_type() == w.scalar_type() &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble),
              "vocab_blocked_mm: h, w and out must share one dtype, float32 or float64");
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1,
              "vocab_blocked_mm: out must have unit stride along the vocabulary");
  const int64_t V = w.size(0);
  const int64_t row_bytes = std::max<int64_t>(1, w.size(1) * w.element_size());
  const int64_t block = std::max<int64_t>(16, kBlockBytes / row_bytes / 16 * 16);
  const int64_t blocks = (V + block - 1) / block;
  // Inside the parallel region each BLAS call runs on its own thread.
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, nv = std::min(block, V - start);
      at::Tensor o = out.narrow(1, start, nv);
      at::mm_out(o, h, w.narrow(0, start, nv).t());
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpo_kernels_cpu, m) {
  m.def("vocab_blocked_mm(Tensor(a!) out, Tensor h, Tensor w) -> ()");
}

TORCH_LIBRARY_IMPL(dpo_kernels_cpu, CPU, m) { m.impl("vocab_blocked_mm", &vocab_blocked_mm); }

}  // namespace dpo_kernels
