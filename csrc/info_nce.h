// The fused InfoNCE loss (rcl_ops::info_nce): argument checks shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace rcl_ops {

// distances (Bq, Bk) float32/float64, Bq >= 1, Bk >= max(2, first_positive + Bq); a positive
// finite temperature; symmetric only for a square matrix with first_positive 0.
inline void check_info_nce_args(const at::Tensor& distances, double temperature, bool symmetric,
                                int64_t first_positive) {
  const char* op = "rcl_ops::info_nce";
  TORCH_CHECK(distances.dim() == 2, op, ": distances must be 2-D (Bq, Bk), got shape ",
              distances.sizes());
  TORCH_CHECK(distances.scalar_type() == at::kFloat || distances.scalar_type() == at::kDouble, op,
              ": distances must be float32 or float64, got ", distances.scalar_type());
  const int64_t rows = distances.size(0), columns = distances.size(1);
  TORCH_CHECK(first_positive >= 0, op, ": first_positive must be >= 0, got ", first_positive);
  TORCH_CHECK(rows >= 1 && columns >= 2 && columns - rows >= first_positive, op,
              ": distances must have Bq >= 1 rows and Bk >= max(2, first_positive + Bq) columns, "
              "got shape ",
              distances.sizes(), " with first_positive ", first_positive);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              ": temperature must be positive and finite, got ", temperature);
  TORCH_CHECK(!symmetric || (rows == columns && first_positive == 0), op,
              ": symmetric needs a square matrix and first_positive 0, got shape ",
              distances.sizes(), " with first_positive ", first_positive);
}

// The shapes of the op's outputs: losses (Bq,), grad_rows (Bq, Bk), grad_columns (Bq, Bk) where
// symmetric, else 0 elements.
inline at::Tensor info_nce_grad_columns(const at::Tensor& distances, bool symmetric) {
  return symmetric ? at::empty_like(distances, at::MemoryFormat::Contiguous)
                   : at::empty({0}, distances.options());
}

}  // namespace rcl_ops
