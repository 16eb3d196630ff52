// Small helpers shared by the CPU ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace dpo_kernels {

// Accumulation dtype: double for double, float for everything else.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernels walk the vocabulary with unit stride; other strides are kept as they are.
inline at::Tensor vocab_contiguous(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

inline std::optional<at::Tensor> bool_mask(const std::optional<at::Tensor>& mask) {
  if (!mask) return std::nullopt;
  return mask->scalar_type() == at::kBool ? *mask : mask->ne(0);
}

// at::empty, with transparent huge pages requested for large buffers before their first touch:
// a fresh multi-GB gradient otherwise costs one page fault per 4 KiB.
at::Tensor empty_hugepage(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace dpo_kernels
