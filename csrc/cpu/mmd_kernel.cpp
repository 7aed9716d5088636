// Gaussian-kernel MMD on CPU: the per-value kernels of the binned-grid method (linear
// binning, linear interpolation of a field) and the exact direct kernel sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../mmd_grid.h"
#include "cpu_utils.h"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

at::Tensor grid_bin_cpu(const at::Tensor& x_in, const at::Tensor& lo, const at::Tensor& step,
                        int64_t num_bins) {
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), count = x.size(1);
  const double lo_v = lo.item<double>(), inv_step = 1.0 / step.item<double>();
  const double mass = 1.0 / double(count);
  at::Tensor weights = at::zeros({rows, num_bins}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::grid_bin", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    double* wp = weights.data_ptr<double>();
    at::parallel_for(0, rows, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double* w = wp + i * num_bins;
        for (int64_t m = 0; m < count; ++m) {
          const GridPosition p = grid_position(double(xp[i * count + m]), lo_v, inv_step, num_bins);
          w[p.lower] += mass * (1.0 - p.upper_weight);
          w[p.lower + 1] += mass * p.upper_weight;
        }
      }
    });
  });
  return weights;
}

at::Tensor grid_interpolate_cpu(const at::Tensor& field_in, const at::Tensor& x_in,
                                const at::Tensor& lo, const at::Tensor& step) {
  const at::Tensor x = x_in.contiguous(), field = field_in.contiguous();
  const int64_t rows = x.size(0), count = x.size(1), num_bins = field.size(1);
  const double lo_v = lo.item<double>(), inv_step = 1.0 / step.item<double>();
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::grid_interpolate", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const double* fp = field.data_ptr<double>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const double* f = fp + i * num_bins;
        for (int64_t m = 0; m < count; ++m) {
          const GridPosition p = grid_position(double(xp[i * count + m]), lo_v, inv_step, num_bins);
          outp[i * count + m] =
              scalar_t(f[p.lower] * (1.0 - p.upper_weight) + f[p.lower + 1] * p.upper_weight);
        }
      }
    });
  });
  return out;
}

constexpr GridKernels kCpuGridKernels{&grid_bin_cpu, &grid_interpolate_cpu, &grid_aten,
                                      &spectrum_aten};

MmdGridOutputs mmd_grid_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths,
                            int64_t num_bins, bool unbiased) {
  return mmd_grid_forward(kCpuGridKernels, q, k, bandwidths, num_bins, unbiased);
}

std::tuple<at::Tensor, at::Tensor> mmd_grid_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths,
    const at::Tensor& grid, const at::Tensor& w_q, const at::Tensor& w_k, int64_t num_bins,
    bool unbiased, OutputMask output_mask) {
  return mmd_grid_backward(kCpuGridKernels, grad, q, k, bandwidths, grid, w_q, w_k, num_bins,
                           unbiased, output_mask);
}

// ---- exact direct sums ------------------------------------------------------------------

struct KernelSumArgs {
  at::Tensor x, y;
  std::vector<double> inv_two_h2;
  int64_t rows_x, rows_y, count_x, count_y;
};

KernelSumArgs kernel_sum_args(const at::Tensor& x, const at::Tensor& y,
                              const at::Tensor& bandwidths, bool paired, const char* op) {
  check_kernel_sum_args(x, y, bandwidths, paired, op);
  const at::Tensor h = bandwidths.to(at::kDouble).cpu().contiguous();
  std::vector<double> inv_two_h2(h.numel());
  for (int64_t b = 0; b < h.numel(); ++b) {
    const double hb = h.data_ptr<double>()[b];
    TORCH_CHECK(hb > 0, op, ": bandwidths must be positive, got ", hb);
    inv_two_h2[b] = 0.5 / (hb * hb);
  }
  return {x.contiguous(), y.contiguous(), inv_two_h2, x.size(0), y.size(0), x.size(1), y.size(1)};
}

at::Tensor gaussian_kernel_sums_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                    const at::Tensor& bandwidths, bool paired) {
  const char* op = "rcl_ops::gaussian_kernel_sums";
  const KernelSumArgs a = kernel_sum_args(x_in, y_in, bandwidths, paired, op);
  const int64_t pairs = paired ? a.rows_x : a.rows_x * a.rows_y;
  // float64 sums: the V/U statistic combines them with cancellation (near-equal
  // distributions), which float32 sums would turn into 1e-3 relative errors.
  const auto out_options = a.x.options().dtype(at::kDouble);
  at::Tensor out =
      paired ? at::empty({a.rows_x}, out_options) : at::empty({a.rows_x, a.rows_y}, out_options);
  const double* ih = a.inv_two_h2.data();
  const int64_t num_h = int64_t(a.inv_two_h2.size());
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "rcl_ops::gaussian_kernel_sums", [&] {
    const scalar_t *xp = a.x.data_ptr<scalar_t>(), *yp = a.y.data_ptr<scalar_t>();
    double* outp = out.data_ptr<double>();
    at::parallel_for(0, pairs, grain_for(a.count_x * a.count_y), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t i = paired ? p : p / a.rows_y, j = paired ? p : p % a.rows_y;
        const scalar_t *xr = xp + i * a.count_x, *yr = yp + j * a.count_y;
        // One sum per value of x, then those sums added: the error grows with M + N, not
        // M N (the V-statistic of close distributions cancels to 1e-10 of these sums).
        double total = 0.0;
        for (int64_t s = 0; s < a.count_x; ++s) {
          double row = 0.0;
          for (int64_t t = 0; t < a.count_y; ++t) {
            row += gaussian_kernel(double(xr[s]) - double(yr[t]), ih, num_h);
          }
          total += row;
        }
        outp[p] = total;
      }
    });
  });
  return out;
}

// grad_a[i, s] = sum_j grad(i, j) sum_t k'(a[i, s] - b[j, t]), over j = i when paired. Each
// output row is owned by one task.
template <typename T, typename GradAt>
void kernel_sums_side_grad(const T* a, int64_t rows_a, int64_t count_a, const T* b, int64_t rows_b,
                           int64_t count_b, bool paired, const double* ih, int64_t num_h,
                           GradAt grad_at, T* grad_a) {
  at::parallel_for(0, rows_a, grain_for(count_a * count_b), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j_begin = paired ? i : 0, j_end = paired ? i + 1 : rows_b;
      for (int64_t s = 0; s < count_a; ++s) {
        double total = 0.0;
        for (int64_t j = j_begin; j < j_end; ++j) {
          double inner = 0.0;
          for (int64_t t = 0; t < count_b; ++t) {
            inner += gaussian_kernel_derivative(
                double(a[i * count_a + s]) - double(b[j * count_b + t]), ih, num_h);
          }
          total += grad_at(i, j) * inner;
        }
        grad_a[i * count_a + s] = T(total);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gaussian_kernel_sums_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const at::Tensor& bandwidths, bool paired, OutputMask output_mask) {
  const char* op = "rcl_ops::gaussian_kernel_sums_backward";
  const KernelSumArgs a = kernel_sum_args(x_in, y_in, bandwidths, paired, op);
  if (paired) {
    TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == a.rows_x, op, ": grad must have shape (",
                a.rows_x, "), got ", grad_in.sizes());
  } else {
    TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == a.rows_x && grad_in.size(1) == a.rows_y,
                op, ": grad must have shape (", a.rows_x, ", ", a.rows_y, "), got ",
                grad_in.sizes());
  }
  const at::Tensor grad = grad_in.to(at::kDouble).contiguous();
  at::Tensor grad_x = output_mask[0] ? at::empty_like(a.x) : skipped_gradient(a.x);
  at::Tensor grad_y = output_mask[1] ? at::empty_like(a.y) : skipped_gradient(a.y);
  const double* ih = a.inv_two_h2.data();
  const int64_t num_h = int64_t(a.inv_two_h2.size());
  const double* gp = grad.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "rcl_ops::gaussian_kernel_sums_backward", [&] {
    const scalar_t *xp = a.x.data_ptr<scalar_t>(), *yp = a.y.data_ptr<scalar_t>();
    // d/dx_s sum k(x_s - y_t) = sum_t k'(x_s - y_t); for y the roles swap (k' is odd).
    if (output_mask[0]) {
      kernel_sums_side_grad(
          xp, a.rows_x, a.count_x, yp, a.rows_y, a.count_y, paired, ih, num_h,
          [&](int64_t i, int64_t j) { return paired ? gp[i] : gp[i * a.rows_y + j]; },
          grad_x.data_ptr<scalar_t>());
    }
    if (output_mask[1]) {
      kernel_sums_side_grad(
          yp, a.rows_y, a.count_y, xp, a.rows_x, a.count_x, paired, ih, num_h,
          [&](int64_t j, int64_t i) { return paired ? gp[j] : gp[i * a.rows_y + j]; },
          grad_y.data_ptr<scalar_t>());
    }
  });
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CPU, m) {
  m.impl("mmd_grid", &mmd_grid_cpu);
  m.impl("mmd_grid_backward", &mmd_grid_backward_cpu);
  m.impl("gaussian_kernel_sums", &gaussian_kernel_sums_cpu);
  m.impl("gaussian_kernel_sums_backward", &gaussian_kernel_sums_backward_cpu);
}

}  // namespace rcl_ops
