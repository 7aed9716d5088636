// Argument checks shared by the CPU and CUDA kernels; messages name the op and argument.
#pragma once

#include <ATen/ATen.h>

namespace rcl_ops {

inline void check_rows(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (B, M), got shape ", x.sizes());
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, op, ": ", name, " must be non-empty, got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
}

inline void check_vector(const at::Tensor& x, int64_t size, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == size, op, ": ", name, " must have shape (", size,
              "), got ", x.sizes());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                       const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " is ", a.scalar_type(),
              " but ", name_b, " is ", b.scalar_type());
}

}  // namespace rcl_ops
