// Per-element math shared by the CPU (.cpp) and CUDA (.cu) kernels. Every function here is
// __host__ __device__, so the CPU kernels (and through them the CPU tests) exercise the
// exact code the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RCL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RCL_HOST_DEVICE inline
#endif

namespace rcl_ops {

// Bhattacharyya distance between N(mean_q, var_q) and N(mean_k, var_k) (Eq. 6), with
// a = var_q + eps, b = var_k + eps. 1/4 ln(1/4 (a/b + b/a + 2)) is written as
// 1/4 log1p((a - b)/a (a - b)/b / 4) so that it stays accurate when a ~ b, and each square
// as a product of ratios so that no intermediate overflows where the result does not.
template <typename T>
RCL_HOST_DEVICE T bd_value(T mean_q, T var_q, T mean_k, T var_k, T eps) {
  const T a = var_q + eps, b = var_k + eps, mean_diff = mean_q - mean_k;
  const T var_diff = a - b;
  return T(0.25) * log1p((var_diff / a) * (var_diff / b) * T(0.25)) +
         T(0.25) * (mean_diff / (a + b)) * mean_diff;
}

// Partial derivatives of bd_value. d/d(mean_k) = -d_mean_q.
template <typename T>
struct BdGrad {
  T d_mean_q, d_var_q, d_var_k;
};

template <typename T>
RCL_HOST_DEVICE BdGrad<T> bd_grad(T mean_q, T var_q, T mean_k, T var_k, T eps) {
  const T a = var_q + eps, b = var_k + eps, sum = a + b, mean_diff = mean_q - mean_k;
  const T mean_ratio = mean_diff / sum;
  const T mean_term = T(0.25) * mean_ratio * mean_ratio;
  return {T(0.5) * mean_ratio, T(0.25) * ((a - b) / a) / sum - mean_term,
          T(0.25) * ((b - a) / b) / sum - mean_term};
}

// d(mean, unbiased var)/dx pulled back: grad_mean / M + grad_var * 2 (x - mean) / (M - 1).
template <typename T>
RCL_HOST_DEVICE T moments_input_grad(T x, T mean, T grad_mean, T grad_var, int64_t count) {
  return grad_mean / T(count) + grad_var * T(2) * (x - mean) / T(count - 1);
}

// Mid-level quantile t_k = (k + 0.5) / K of M sorted values: fractional position
// p = t_k M - 0.5 clamped to [0, M - 1], interpolated between lower and lower + 1.
struct QuantilePosition {
  int64_t lower, upper;
  double upper_weight;
};

RCL_HOST_DEVICE QuantilePosition quantile_position(int64_t k, int64_t num_quantiles,
                                                   int64_t num_values) {
  double pos = (double(k) + 0.5) * double(num_values) / double(num_quantiles) - 0.5;
  pos = pos < 0.0 ? 0.0 : (pos > double(num_values - 1) ? double(num_values - 1) : pos);
  const int64_t lower = int64_t(floor(pos));
  const int64_t upper = lower + 1 < num_values ? lower + 1 : num_values - 1;
  return {lower, upper, pos - double(lower)};
}

// sign(a - b) as -1, 0 or +1: the EMD derivative d|a - b|/da.
template <typename T>
RCL_HOST_DEVICE T sign_of_difference(T a, T b) {
  return T(a > b) - T(a < b);
}

// Linear binning onto the grid t_g = lo + g * step, g in [0, G): the lower bin and the
// weight of the upper one. Values outside the grid are clamped to its ends.
struct GridPosition {
  int64_t lower;
  double upper_weight;
};

RCL_HOST_DEVICE GridPosition grid_position(double x, double lo, double inv_step, int64_t num_bins) {
  double u = (x - lo) * inv_step;
  // !(u >= 0) also sends NaN (non-finite input with the finite check off) to the first bin:
  // converting NaN to an integer would be undefined.
  u = !(u >= 0.0) ? 0.0 : (u > double(num_bins - 1) ? double(num_bins - 1) : u);
  int64_t lower = int64_t(floor(u));
  if (lower > num_bins - 2) lower = num_bins - 2;
  return {lower, u - double(lower)};
}

// Fixed-point binning: each value's unit mass is 2^S integer units, split between its two grid
// points as upper = round(upper_weight 2^S) and lower = 2^S - upper, so a row's units add up to
// exactly M 2^S and their integer sums do not depend on the order of the additions (the GPU
// kernels add them with integer atomics). S = min(52, 63 - bit_length(M)) keeps M 2^S < 2^63
// (int64 sums: any bin, any partial sum) and upper_weight 2^S + 0.5 exact below 2^52, so its
// floor rounds correctly. The rounding moves each value's split by at most 2^-(S+1) of its mass:
// 2^-53 up to M = 2^11, 2^-25 at the longest row accepted, kMaxGridValues (S >= 24; longer rows
// are refused where the ops are called).
constexpr int64_t kMaxGridValues = (int64_t(1) << 39) - 1;  // as rcl_ops._checks.MAX_GRID_VALUES

RCL_HOST_DEVICE int fixed_point_bits(int64_t count) {
  int length = 0;
  for (uint64_t c = uint64_t(count); c != 0; c >>= 1) ++length;
  return 63 - length < 52 ? 63 - length : 52;
}

struct FixedPointSplit {
  int64_t lower, upper;  // units of the lower and the upper grid point, lower + upper = 2^S
};

RCL_HOST_DEVICE FixedPointSplit fixed_point_split(double upper_weight, int bits) {
  const int64_t unit = int64_t(1) << bits;
  // upper_weight 2^S is exact and >= 0 (the conversion's truncation is the floor); no ldexp or
  // floor, which can be library calls on the CPU.
  const int64_t upper = int64_t(upper_weight * double(unit) + 0.5);
  return {unit - upper, upper};
}

// A bin's weight from its integer sum: units / (M 2^S), in float64 (M 2^S is exact there).
RCL_HOST_DEVICE double fixed_point_weight(int64_t units, int64_t count, int bits) {
  return double(units) / (double(count) * double(int64_t(1) << bits));
}

// Gaussian kernel sum_h exp(-d^2 / (2 h^2)) and its derivative in d, given
// inv_two_h2[h] = 1 / (2 h^2). The CUDA kernels' (the CPU ones evaluate the same terms with a
// vectorised exp: csrc/cpu/mmd_direct.cpp).
RCL_HOST_DEVICE double gaussian_kernel(double diff, const double* inv_two_h2, int64_t num_h) {
  double total = 0.0;
  for (int64_t h = 0; h < num_h; ++h) total += exp(-diff * diff * inv_two_h2[h]);
  return total;
}

RCL_HOST_DEVICE double gaussian_kernel_derivative(double diff, const double* inv_two_h2,
                                                  int64_t num_h) {
  double total = 0.0;
  for (int64_t h = 0; h < num_h; ++h) {
    total += -2.0 * diff * inv_two_h2[h] * exp(-diff * diff * inv_two_h2[h]);
  }
  return total;
}

}  // namespace rcl_ops
