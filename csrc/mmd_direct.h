// The exact (direct) MMD as one op, written once over the kernel-sum ops (rcl_ops::
// gaussian_kernel_sums and its backward) and ATen ops, so it runs on any device that has those
// kernels: the CUDA kernel, and the CPU one above its single-thread fused size
// (csrc/cpu/mmd_direct.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace rcl_ops {

// (distances (Bq, Bk) in q's dtype, bandwidths (H,) float64, statistic (Bq, Bk) float64: the
// V or U statistic before the V-statistic's clamp at 0, derivative_sums float64: see the
// schema in csrc/rcl_ops.cpp).
using MmdDirectOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Argument checks of mmd_direct and mmd_direct_backward (the backward's also check grad and
// the saved bandwidths, statistic and derivative sums: none, or as many as the schema says).
void check_mmd_direct_args(const at::Tensor& q, const at::Tensor& k,
                           const std::optional<at::Tensor>& bandwidths, bool unbiased,
                           const char* op);
void check_mmd_direct_backward_args(const at::Tensor& grad, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& bandwidths,
                                    const at::Tensor& statistic, const at::Tensor& derivative_sums,
                                    bool unbiased, const char* op);

// The bandwidths the Gaussian takes in float64 (1 / (2 h^2) and h^2 finite), as
// rcl_ops._checks.MIN_BANDWIDTH and MAX_BANDWIDTH. A default bandwidth outside them makes every
// distance NaN (no kernel is evaluated), for the Python caller to name (check_default_bandwidth).
constexpr double kMinBandwidth = 1e-154, kMaxBandwidth = 1e154;
inline bool bandwidth_in_range(double h) { return h >= kMinBandwidth && h <= kMaxBandwidth; }

// How the three kernel sums make the statistic, as rcl_ops._formulas.mmd_from_kernel_sums:
// (S_qq[i] - diag_q) / div_q + (S_kk[j] - diag_k) / div_k - S_qk[i, j] * cross, with
// div_q = M^2 and diag_q = 0 (V-statistic) or div_q = M (M - 1) and diag_q = M H (U-statistic:
// the x = x' terms, k(x, x) = H, left out), likewise for k, and cross = 2 / (M N).
struct MmdTerms {
  double diag_q, div_q, diag_k, div_k, cross;
};
MmdTerms mmd_terms(int64_t m, int64_t n, int64_t num_h, bool unbiased);

// The op without derivative sums (derivatives=true is refused: CPU only).
MmdDirectOutputs mmd_direct_composite(const at::Tensor& q, const at::Tensor& k,
                                      const std::optional<at::Tensor>& bandwidths, bool unbiased,
                                      bool derivatives);

// The backward through the kernel-sum ops' backward (no derivative sums).
std::tuple<at::Tensor, at::Tensor> mmd_direct_backward_composite(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths,
    const at::Tensor& statistic, const at::Tensor& derivative_sums, bool unbiased,
    OutputMask output_mask);

// The length of derivative_sums for q (Bq, M) and k (Bk, N).
inline int64_t derivative_sums_size(const at::Tensor& q, const at::Tensor& k) {
  const int64_t rows_q = q.size(0), rows_k = k.size(0), m = q.size(1), n = k.size(1);
  return rows_q * rows_k * (m + n) + rows_q * m + rows_k * n;
}

}  // namespace rcl_ops
