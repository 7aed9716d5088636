// Exact (direct) MMD on CPU: the kernel sums over all pairs of values (gaussian_kernel_sums and
// its backward, parallel over pairs or rows) and the fused mmd_direct op. mmd_direct runs as one
// single-thread pass (pooled bandwidth, the three sums, the statistic) up to kFusedMaxWork kernel
// evaluations, and with derivatives=True, where it also sums k' for the backward (each
// exp(-(x - y)^2 c) then serves the value and the derivative, and the backward only contracts
// those sums with grad); else the composite of the parallel kernel-sum ops
// (csrc/mmd_direct.cpp), as on CUDA.
//
// Every loop works on float64 copies of the rows and evaluates exp with exp_nonpositive, which
// GCC vectorises (std::exp is a scalar call), kLanes values of x at a time (one vector with
// AVX-512): each lane keeps its value's sum over y in order, then the lanes are added in order,
// so the result does not depend on the vector width.
#include "../mmd_direct.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "cpu_utils.h"
#include "fast_exp.h"
#include "pooled_std.h"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

using Tensor = at::Tensor;

// Kernel evaluations of the forward up to which mmd_direct runs fused on the calling thread
// without derivative sums: 4 tasks' work, where the parallel sums would start to split (not a
// measured crossover: benchmarks/results/design-measurements.md).
constexpr int64_t kFusedMaxWork = 4 * kMinTaskWork;
constexpr int64_t kLanes = 8;

// ---- kLanes values of x against a row y (float64) ----------------------------------------------

struct Kernel {
  const double* inv_two_h2;  // 1 / (2 h^2) per bandwidth
  int64_t num_h;
};

// For the kLanes values x[0..kLanes) (a padded row: every lane holds a value) against y:
// values[l] = sum_t sum_h exp(-d^2 c_h) and derivatives[l] = sum_t sum_h -2 d c_h exp(-d^2 c_h),
// d = x[l] - y[t], each where its flag is set; with kColumns also
// columns[t kLanes + l] += sum_h -2 d c_h exp(-d^2 c_h), times lane_mask[l] with kMasked.
// (__restrict: without it GCC keeps the accumulators in memory and checks for aliasing per t.)
template <bool kValues, bool kDerivatives, bool kColumns, bool kMasked = false>
RCL_INLINE void lane_block(const double* __restrict x, const double* __restrict y, int64_t count_y,
                           Kernel kernel, double* __restrict values, double* __restrict derivatives,
                           double* __restrict columns, const double* __restrict lane_mask) {
  double value_acc[kLanes] = {}, derivative_acc[kLanes] = {};
  for (int64_t h = 0; h < kernel.num_h; ++h) {
    const double c = kernel.inv_two_h2[h], minus_two_c = -2.0 * c;
    for (int64_t t = 0; t < count_y; ++t) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const double d = x[l] - y[t];
        const double e = exp_nonpositive(-d * d * c);
        const double f = d * minus_two_c * e;  // = -2 d c e, bit for bit (a power of 2 apart)
        if (kValues) value_acc[l] += e;
        if (kDerivatives) derivative_acc[l] += f;
        if (kColumns) columns[t * kLanes + l] += kMasked ? lane_mask[l] * f : f;
      }
    }
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    if (kValues) values[l] = value_acc[l];
    if (kDerivatives) derivatives[l] = derivative_acc[l];
  }
}

// Rows of float64 values, each padded to a multiple of kLanes by repeating its last value (the
// padding lanes are computed and left out).
struct Rows {
  std::vector<double> values;
  int64_t rows, count, padded;
  const double* row(int64_t i) const { return values.data() + i * padded; }
};

// sum_s sum_t k(x[s] - y[t]): one sum per value of x, then those sums added, so the error grows
// with M + N, not M N (the V-statistic of close distributions cancels to 1e-10 of these sums).
// x: a padded row of count_x values.
RCL_MULTIVERSION double pair_kernel_sum(const double* x, int64_t count_x, const double* y,
                                        int64_t count_y, Kernel kernel) {
  double total = 0.0, values[kLanes];
  for (int64_t s = 0; s < count_x; s += kLanes) {
    lane_block<true, false, false>(x + s, y, count_y, kernel, values, nullptr, nullptr, nullptr);
    for (int64_t l = 0; l < std::min(kLanes, count_x - s); ++l) total += values[l];
  }
  return total;
}

// pair_kernel_sum, and rows[s] = sum_t k'(x[s] - y[t]) and, where columns is not null,
// columns[t] = sum_s k'(x[s] - y[t]) (scratch: count_y kLanes values, the lanes' column sums,
// added in a fixed tree at the end; the padding lanes are masked out of them).
RCL_MULTIVERSION double pair_sums_with_derivatives(const double* x, int64_t count_x,
                                                   const double* y, int64_t count_y, Kernel kernel,
                                                   double* rows, double* columns, double* scratch) {
  static_assert(kLanes == 8, "the column sums' tree below adds 8 lanes");
  if (columns != nullptr) std::fill(scratch, scratch + count_y * kLanes, 0.0);
  double total = 0.0, values[kLanes], derivatives[kLanes], mask[kLanes];
  for (int64_t s = 0; s < count_x; s += kLanes) {
    const int64_t lanes = std::min(kLanes, count_x - s);
    if (columns == nullptr) {
      lane_block<true, true, false>(x + s, y, count_y, kernel, values, derivatives, nullptr,
                                    nullptr);
    } else if (lanes == kLanes) {
      lane_block<true, true, true>(x + s, y, count_y, kernel, values, derivatives, scratch,
                                   nullptr);
    } else {
      for (int64_t l = 0; l < kLanes; ++l) mask[l] = l < lanes ? 1.0 : 0.0;
      lane_block<true, true, true, true>(x + s, y, count_y, kernel, values, derivatives, scratch,
                                         mask);
    }
    for (int64_t l = 0; l < lanes; ++l) {
      total += values[l];
      rows[s + l] = derivatives[l];
    }
  }
  for (int64_t t = 0; columns != nullptr && t < count_y; ++t) {
    const double* c = scratch + t * kLanes;
    columns[t] = ((c[0] + c[4]) + (c[2] + c[6])) + ((c[1] + c[5]) + (c[3] + c[7]));
  }
  return total;
}

// grad_x[s] += w sum_t k'(x[s] - y[t]); x: a padded row of count_x values.
RCL_MULTIVERSION void pair_kernel_grad(const double* x, int64_t count_x, const double* y,
                                       int64_t count_y, Kernel kernel, double w, double* grad_x) {
  double derivatives[kLanes];
  for (int64_t s = 0; s < count_x; s += kLanes) {
    lane_block<false, true, false>(x + s, y, count_y, kernel, nullptr, derivatives, nullptr,
                                   nullptr);
    for (int64_t l = 0; l < std::min(kLanes, count_x - s); ++l) grad_x[s + l] += w * derivatives[l];
  }
}

// ---- shared setup ------------------------------------------------------------------------------

Rows padded_rows(const Tensor& x_in) {
  const Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), count = x.size(1);
  const int64_t padded = (count + kLanes - 1) / kLanes * kLanes;
  Rows out{std::vector<double>(static_cast<size_t>(rows * padded)), rows, count, padded};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::padded_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i) {
      double* row = out.values.data() + i * padded;
      for (int64_t s = 0; s < padded; ++s) row[s] = double(xp[i * count + std::min(s, count - 1)]);
    }
  });
  return out;
}

// 1 / (2 h^2) per bandwidth; positive bandwidths only.
std::vector<double> inverse_two_h2(const Tensor& bandwidths, const char* op) {
  const bool ready =
      bandwidths.scalar_type() == at::kDouble && bandwidths.is_cpu() && bandwidths.is_contiguous();
  const Tensor h = ready ? bandwidths : bandwidths.to(at::kDouble).cpu().contiguous();
  std::vector<double> inv_two_h2(static_cast<size_t>(h.numel()));
  for (int64_t b = 0; b < h.numel(); ++b) {
    const double hb = h.data_ptr<double>()[b];
    TORCH_CHECK(hb > 0, op, ": bandwidths must be positive, got ", hb);
    inv_two_h2[b] = 0.5 / (hb * hb);
  }
  return inv_two_h2;
}

// float64 values (rows x count, row-major) into a new tensor of the given shape and options.
Tensor from_float64(const std::vector<double>& values, at::IntArrayRef sizes,
                    at::TensorOptions options) {
  Tensor out = at::empty(sizes, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rcl_ops::from_float64", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) op[i] = scalar_t(values[i]);
  });
  return out;
}

// ---- gaussian_kernel_sums and its backward -----------------------------------------------------

struct KernelSumArgs {
  Rows x, y;
  std::vector<double> inv_two_h2;
  Kernel kernel() const { return {inv_two_h2.data(), int64_t(inv_two_h2.size())}; }
};

KernelSumArgs kernel_sum_args(const Tensor& x, const Tensor& y, const Tensor& bandwidths,
                              bool paired, const char* op) {
  check_kernel_sum_args(x, y, bandwidths, paired, op);
  return {padded_rows(x), padded_rows(y), inverse_two_h2(bandwidths, op)};
}

Tensor gaussian_kernel_sums_cpu(const Tensor& x_in, const Tensor& y_in, const Tensor& bandwidths,
                                bool paired) {
  const KernelSumArgs a =
      kernel_sum_args(x_in, y_in, bandwidths, paired, "rcl_ops::gaussian_kernel_sums");
  const int64_t pairs = paired ? a.x.rows : a.x.rows * a.y.rows;
  // float64 sums: the V/U statistic combines them with cancellation (near-equal
  // distributions), which float32 sums would turn into 1e-3 relative errors.
  const auto out_options = x_in.options().dtype(at::kDouble);
  Tensor out =
      paired ? at::empty({a.x.rows}, out_options) : at::empty({a.x.rows, a.y.rows}, out_options);
  double* outp = out.data_ptr<double>();
  at::parallel_for(0, pairs, grain_for(a.x.count * a.y.count), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i = paired ? p : p / a.y.rows, j = paired ? p : p % a.y.rows;
      outp[p] = pair_kernel_sum(a.x.row(i), a.x.count, a.y.row(j), a.y.count, a.kernel());
    }
  });
  return out;
}

// grad_a[i, s] = sum_j grad(i, j) sum_t k'(a[i, s] - b[j, t]), over j = i when paired. Each
// output row is owned by one task.
template <typename GradAt>
std::vector<double> kernel_sums_side_grad(const Rows& a, const Rows& b, bool paired, Kernel kernel,
                                          GradAt grad_at) {
  std::vector<double> grad_a(static_cast<size_t>(a.rows * a.count), 0.0);
  at::parallel_for(0, a.rows, grain_for(a.count * b.count), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j_begin = paired ? i : 0, j_end = paired ? i + 1 : b.rows;
      for (int64_t j = j_begin; j < j_end; ++j) {
        pair_kernel_grad(a.row(i), a.count, b.row(j), b.count, kernel, grad_at(i, j),
                         grad_a.data() + i * a.count);
      }
    }
  });
  return grad_a;
}

std::tuple<Tensor, Tensor> gaussian_kernel_sums_backward_cpu(const Tensor& grad_in,
                                                             const Tensor& x_in, const Tensor& y_in,
                                                             const Tensor& bandwidths, bool paired,
                                                             OutputMask output_mask) {
  const char* op = "rcl_ops::gaussian_kernel_sums_backward";
  const KernelSumArgs a = kernel_sum_args(x_in, y_in, bandwidths, paired, op);
  const int64_t rows_y = a.y.rows;
  if (paired) {
    check_vector(grad_in, a.x.rows, op, "grad");
  } else {
    TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == a.x.rows && grad_in.size(1) == rows_y, op,
                ": grad must have shape (", a.x.rows, ", ", rows_y, "), got ", grad_in.sizes());
  }
  const Tensor grad = grad_in.to(at::kDouble).contiguous();
  const double* gp = grad.data_ptr<double>();
  Tensor grad_x = skipped_gradient(x_in), grad_y = skipped_gradient(y_in);
  // d/dx_s sum k(x_s - y_t) = sum_t k'(x_s - y_t); for y the roles swap (k' is odd).
  if (output_mask[0]) {
    const auto g = [&](int64_t i, int64_t j) { return paired ? gp[i] : gp[i * rows_y + j]; };
    grad_x = from_float64(kernel_sums_side_grad(a.x, a.y, paired, a.kernel(), g), x_in.sizes(),
                          x_in.options());
  }
  if (output_mask[1]) {
    const auto g = [&](int64_t j, int64_t i) { return paired ? gp[j] : gp[i * rows_y + j]; };
    grad_y = from_float64(kernel_sums_side_grad(a.y, a.x, paired, a.kernel(), g), y_in.sizes(),
                          y_in.options());
  }
  return {grad_x, grad_y};
}

// ---- mmd_direct, fused -------------------------------------------------------------------------

int64_t forward_work(const Tensor& q, const Tensor& k) {
  const int64_t m = q.size(1), n = k.size(1);
  return q.size(0) * k.size(0) * m * n + q.size(0) * m * m + k.size(0) * n * n;
}

// S_qq[i], S_kk[j] and S_qk[i, j] (row-major), and where derivative_sums is not null, its sums of
// k' in the schema's layout (csrc/rcl_ops.cpp).
struct DirectSums {
  std::vector<double> self_q, self_k, cross;
};

DirectSums fused_kernel_sums(const Rows& q, const Rows& k, Kernel kernel, double* derivative_sums) {
  DirectSums out{std::vector<double>(q.rows), std::vector<double>(k.rows),
                 std::vector<double>(static_cast<size_t>(q.rows * k.rows))};
  const bool derivatives = derivative_sums != nullptr;
  double* rows = derivative_sums;
  double* columns = derivatives ? rows + q.rows * k.rows * q.count : nullptr;
  double* self_rows_q = derivatives ? columns + q.rows * k.rows * k.count : nullptr;
  double* self_rows_k = derivatives ? self_rows_q + q.rows * q.count : nullptr;
  std::vector<double> scratch(static_cast<size_t>(k.count * kLanes));
  const auto sum = [&](const Rows& x, int64_t i, const Rows& y, int64_t j, double* x_rows,
                       double* y_columns) {
    if (!derivatives) return pair_kernel_sum(x.row(i), x.count, y.row(j), y.count, kernel);
    return pair_sums_with_derivatives(x.row(i), x.count, y.row(j), y.count, kernel, x_rows,
                                      y_columns, scratch.data());
  };
  for (int64_t i = 0; i < q.rows; ++i) {
    out.self_q[i] = sum(q, i, q, i, derivatives ? self_rows_q + i * q.count : nullptr, nullptr);
  }
  for (int64_t j = 0; j < k.rows; ++j) {
    out.self_k[j] = sum(k, j, k, j, derivatives ? self_rows_k + j * k.count : nullptr, nullptr);
  }
  for (int64_t i = 0; i < q.rows; ++i) {
    for (int64_t j = 0; j < k.rows; ++j) {
      const int64_t p = i * k.rows + j;
      out.cross[p] = sum(q, i, k, j, derivatives ? rows + p * q.count : nullptr,
                         derivatives ? columns + p * k.count : nullptr);
    }
  }
  return out;
}

MmdDirectOutputs mmd_direct_cpu(const Tensor& q_in, const Tensor& k_in,
                                const std::optional<Tensor>& bandwidths, bool unbiased,
                                bool derivatives) {
  const char* op = "rcl_ops::mmd_direct";
  check_mmd_direct_args(q_in, k_in, bandwidths, unbiased, op);
  if (!derivatives && forward_work(q_in, k_in) > kFusedMaxWork) {
    return mmd_direct_composite(q_in, k_in, bandwidths, unbiased, false);
  }
  const Rows q = padded_rows(q_in), k = padded_rows(k_in);
  // A copy also where the bandwidths are float64 already: an op's output may not alias its input.
  const Tensor h = bandwidths.has_value()
                       ? bandwidths->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true)
                       : pooled_std_cpu(q_in, k_in);
  const auto float64 = q_in.options().dtype(at::kDouble);
  Tensor derivative_sums = at::empty({derivatives ? derivative_sums_size(q_in, k_in) : 0}, float64);
  if (!bandwidths.has_value() && !bandwidth_in_range(h.item<double>())) {
    // NaN distances, no kernel evaluated: the caller names the bandwidth (mmd_direct.h).
    const Tensor nan = at::full({q.rows, k.rows}, NAN, float64);
    return {nan.to(q_in.scalar_type()), h, nan, derivative_sums.fill_(NAN)};
  }
  const std::vector<double> inv_two_h2 = inverse_two_h2(h, op);
  const DirectSums sums =
      fused_kernel_sums(q, k, {inv_two_h2.data(), int64_t(inv_two_h2.size())},
                        derivatives ? derivative_sums.data_ptr<double>() : nullptr);
  const MmdTerms terms = mmd_terms(q.count, k.count, h.numel(), unbiased);
  std::vector<double> statistic(sums.cross.size()), distances(sums.cross.size());
  for (int64_t i = 0; i < q.rows; ++i) {
    for (int64_t j = 0; j < k.rows; ++j) {
      const int64_t p = i * k.rows + j;
      const double value = (sums.self_q[i] - terms.diag_q) / terms.div_q +
                           (sums.self_k[j] - terms.diag_k) / terms.div_k -
                           sums.cross[p] * terms.cross;
      statistic[p] = value;
      distances[p] = unbiased || !(value < 0.0) ? value : 0.0;  // clamp_min(0)
    }
  }
  const std::array<int64_t, 2> shape{q.rows, k.rows};
  return {from_float64(distances, shape, q_in.options()), h,
          from_float64(statistic, shape, float64), derivative_sums};
}

// d/dS of the statistic, as the composite's backward: w_self_q[i] = 2 sum_j grad'[i, j] / div_q
// (S_qq's derivative in q is twice its x-side one), likewise for k, and the cross weights
// -cross grad'[i, j], with grad' = grad where the V-statistic was not clamped (statistic >= 0,
// clamp_min's derivative; not where it is NaN).
struct BackwardWeights {
  std::vector<double> cross, self_q, self_k;
};

// grad is read through its strides (autograd hands over expanded and transposed ones).
BackwardWeights backward_weights(const Tensor& grad_in, const Tensor& statistic_in,
                                 const MmdTerms& terms, bool unbiased) {
  const bool floating = grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kDouble;
  const Tensor grad = floating ? grad_in : grad_in.to(at::kDouble);
  const Tensor statistic_t = statistic_in.contiguous();
  const double* statistic = statistic_t.data_ptr<double>();
  const int64_t rows_q = grad.size(0), rows_k = grad.size(1);
  BackwardWeights w{std::vector<double>(static_cast<size_t>(rows_q * rows_k)),
                    std::vector<double>(rows_q, 0.0), std::vector<double>(rows_k, 0.0)};
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "rcl_ops::mmd_direct_backward", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows_q; ++i) {
      for (int64_t j = 0; j < rows_k; ++j) {
        const int64_t p = i * rows_k + j;
        const double g_ij = double(gp[i * grad.stride(0) + j * grad.stride(1)]);
        const double g = unbiased || statistic[p] >= 0.0 ? g_ij : 0.0;
        w.self_q[i] += g;
        w.self_k[j] += g;
        w.cross[p] = g * (-terms.cross);
      }
    }
  });
  for (double& v : w.self_q) v = 2.0 * (v / terms.div_q);
  for (double& v : w.self_k) v = 2.0 * (v / terms.div_k);
  return w;
}

// The gradients from the forward's derivative sums R (rows), C (columns), S'_q, S'_k:
// grad_q[i, s] = w_self_q[i] S'_q[i, s] + sum_j w[i, j] R[i, j, s],
// grad_k[j, t] = w_self_k[j] S'_k[j, t] - sum_i w[i, j] C[i, j, t].
std::tuple<Tensor, Tensor> contract_derivative_sums(const BackwardWeights& w, const double* sums,
                                                    const Tensor& q, const Tensor& k,
                                                    OutputMask output_mask) {
  const int64_t rows_q = q.size(0), rows_k = k.size(0), m = q.size(1), n = k.size(1);
  const double* rows = sums;
  const double* columns = rows + rows_q * rows_k * m;
  const double* self_rows_q = columns + rows_q * rows_k * n;
  const double* self_rows_k = self_rows_q + rows_q * m;
  std::vector<double> grad_q(output_mask[0] ? rows_q * m : 0);
  std::vector<double> grad_k(output_mask[1] ? rows_k * n : 0);
  for (int64_t i = 0; output_mask[0] && i < rows_q; ++i) {
    for (int64_t s = 0; s < m; ++s) grad_q[i * m + s] = w.self_q[i] * self_rows_q[i * m + s];
    for (int64_t j = 0; j < rows_k; ++j) {
      const double* r = rows + (i * rows_k + j) * m;
      for (int64_t s = 0; s < m; ++s) grad_q[i * m + s] += w.cross[i * rows_k + j] * r[s];
    }
  }
  for (int64_t j = 0; output_mask[1] && j < rows_k; ++j) {
    for (int64_t t = 0; t < n; ++t) grad_k[j * n + t] = w.self_k[j] * self_rows_k[j * n + t];
    for (int64_t i = 0; i < rows_q; ++i) {
      const double* c = columns + (i * rows_k + j) * n;
      for (int64_t t = 0; t < n; ++t) grad_k[j * n + t] -= w.cross[i * rows_k + j] * c[t];
    }
  }
  return {output_mask[0] ? from_float64(grad_q, q.sizes(), q.options()) : skipped_gradient(q),
          output_mask[1] ? from_float64(grad_k, k.sizes(), k.options()) : skipped_gradient(k)};
}

std::tuple<Tensor, Tensor> mmd_direct_backward_cpu(const Tensor& grad, const Tensor& q,
                                                   const Tensor& k, const Tensor& bandwidths,
                                                   const Tensor& statistic,
                                                   const Tensor& derivative_sums, bool unbiased,
                                                   OutputMask output_mask) {
  const char* op = "rcl_ops::mmd_direct_backward";
  check_mmd_direct_backward_args(grad, q, k, bandwidths, statistic, derivative_sums, unbiased, op);
  if (derivative_sums.numel() == 0) {
    return mmd_direct_backward_composite(grad, q, k, bandwidths, statistic, derivative_sums,
                                         unbiased, output_mask);
  }
  const MmdTerms terms = mmd_terms(q.size(1), k.size(1), bandwidths.numel(), unbiased);
  const Tensor sums = derivative_sums.contiguous();
  return contract_derivative_sums(backward_weights(grad, statistic, terms, unbiased),
                                  sums.data_ptr<double>(), q, k, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CPU, m) {
  m.impl("gaussian_kernel_sums", &gaussian_kernel_sums_cpu);
  m.impl("gaussian_kernel_sums_backward", &gaussian_kernel_sums_backward_cpu);
  m.impl("mmd_direct", &mmd_direct_cpu);
  m.impl("mmd_direct_backward", &mmd_direct_backward_cpu);
}

}  // namespace rcl_ops
