// rcl_ops::pooled_std's CPU kernel, also called directly by the fused exact MMD on CPU
// (csrc/cpu/mmd_direct.cpp), which needs no dispatch for it.
#pragma once

#include <ATen/ATen.h>

namespace rcl_ops {

// The standard deviation of all values of q (Bq, M) and k (Bk, N) pooled, float64 (1,): see the
// op's schema in csrc/rcl_ops.cpp and math.h's pooled_std_of.
at::Tensor pooled_std_cpu(const at::Tensor& q, const at::Tensor& k);

}  // namespace rcl_ops
