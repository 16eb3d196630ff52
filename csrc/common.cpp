#include "common.h"

#include <torch/library.h>

#include <cstdint>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace dpo_kernels {

at::Tensor empty_hugepage(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = start + t.nbytes();
  const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (hi > lo + kHuge) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
#endif
  return t;
}

#define DPO_STR2(x) #x
#define DPO_STR(x) DPO_STR2(x)

std::string build_info() { return DPO_STR(CPU_CAPABILITY); }

TORCH_LIBRARY(dpo_kernels_cpu, m) { m.def("build_info() -> str", &build_info); }

}  // namespace dpo_kernels
