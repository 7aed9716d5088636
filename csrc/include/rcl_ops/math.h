// Per-element math shared by the CPU (.cpp) and CUDA (.cu) kernels. Every function here is
// __host__ __device__, so the CPU kernels (and through them the CPU tests) exercise the
// exact code the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

// The moments backward dL/dx = grad_mean / M + grad_var * 2 (x - mean) / (M - 1) as per-row
// coefficients in the compute type C (float for float32, double for double):
// dL/dx = offset + slope (x - shift), with shift = mean rounded to C, slope = 2 grad_var / (M - 1)
// and offset = grad_mean / M - slope (mean - shift), computed in double and then rounded. Near
// the mean x - shift is exact (Sterbenz), and the rounding of the mean is folded into offset, so
// float32 keeps its accuracy when |mean| >> std, where the uncentred offset' + slope x cancels
// (values 1e4 + N(0, 1), M = 49152: 2e-7 of the gradient's scale here, 4e-4 uncentred).
template <typename C>
struct MomentsGradRow {
  C shift, offset, slope;
};

template <typename C>
RCL_HOST_DEVICE MomentsGradRow<C> moments_grad_row(double mean, double grad_mean, double grad_var,
                                                   int64_t count) {
  const C shift = C(mean);
  const double slope = 2.0 * grad_var / double(count - 1);
  const double offset = grad_mean / double(count) - slope * (mean - double(shift));
  return {shift, C(offset), C(slope)};
}

template <typename C>
RCL_HOST_DEVICE C moments_input_grad(C x, const MomentsGradRow<C>& row) {
  return row.offset + row.slope * (x - row.shift);
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

// The bits of one type read as another of the same size (std::bit_cast, which CUDA device
// code lacks; memcpy of a register compiles to a move on host and device).
template <typename To, typename From>
RCL_HOST_DEVICE To bit_cast_value(From value) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To out;
  memcpy(&out, &value, sizeof(out));
  return out;
}

// The radix sorts' float32 key: unsigned order of keys is numeric order of values.
// Non-negative values map to bits | 2^31, negative ones to 2^32 - bits (larger magnitude,
// smaller key). -0.0 (bits 2^31) thus takes +0.0's key 2^31 without a branch: signed zeros
// tie, so a stable sort keeps their index order, as torch.sort does. Every NaN takes the
// largest key, 2^32 - 1 (last in its row, as torch.sort puts NaNs).
RCL_HOST_DEVICE uint32_t float_sort_key(float value) {
  const uint32_t bits = bit_cast_value<uint32_t>(value);
  const uint32_t key = (bits & 0x80000000u) ? 0u - bits : (bits | 0x80000000u);
  return value != value ? 0xFFFFFFFFu : key;
}

// The inverse of float_sort_key: the sorted values read back from the sorted keys. Exact for
// every value but two classes: the zeros' key gives +0.0 (for -0.0 too; no distance or
// gradient tells them apart: |a - b| and sign(a - b) are equal for both) and the NaN key
// gives the NaN 0x7FFFFFFF (sign and payload of the input NaN are lost; it stays a NaN).
RCL_HOST_DEVICE float float_from_sort_key(uint32_t key) {
  return bit_cast_value<float>((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : 0u - key);
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

// InfoNCE of one line (a row, or for the symmetric loss a column) of the distance matrix, with
// logits l_j = -D_j / T and target j = p: the loss is logsumexp_j l_j - l_p and its derivative
// d loss / d D_j = (1[j = p] - softmax_j) / T, softmax_j = exp(l_j - max_l) / sum_j exp(l_j -
// max_l). inv_sum = 1 / sum_j exp(l_j - max_l).
RCL_HOST_DEVICE double info_nce_gradient(double logit, double max_logit, double inv_sum,
                                         bool target, double inv_temperature) {
  return ((target ? 1.0 : 0.0) - exp(logit - max_logit) * inv_sum) * inv_temperature;
}

// The line's loss from its largest logit, its sum of exp(l_j - max_l) and the target's logit.
RCL_HOST_DEVICE double info_nce_loss(double max_logit, double sum, double target_logit) {
  return max_logit + log(sum) - target_logit;
}

// The pooled standard deviation of two sets of values (rcl_ops.ops.default_bandwidth) from each
// set's count, mean, sum of squared deviations from its own mean, smallest and largest value
// (Chan's combination): 1 where every value of both sets is equal; a std that underflows float64
// stays 0 and NaN stays NaN (lo/hi carry NaN), for the caller's range check to see.
struct ValueMoments {
  double count, mean, deviations, lo, hi;
};

RCL_HOST_DEVICE double pooled_std_of(const ValueMoments& a, const ValueMoments& b) {
  const double total = a.count + b.count;
  const double mean = (a.mean * a.count + b.mean * b.count) / total;
  const double between =
      (a.mean - mean) * (a.mean - mean) * a.count + (b.mean - mean) * (b.mean - mean) * b.count;
  const bool constant = a.lo == a.hi && b.lo == b.hi && a.lo == b.lo;
  return constant ? 1.0 : sqrt((a.deviations + b.deviations + between) / total);
}

// The smaller/larger of two values, NaN if either is (so that NaN reaches pooled_std_of).
RCL_HOST_DEVICE double nan_min(double a, double b) { return (a < b || a != a) ? a : b; }
RCL_HOST_DEVICE double nan_max(double a, double b) { return (a > b || a != a) ? a : b; }

}  // namespace rcl_ops
