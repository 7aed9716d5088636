// Gaussian-kernel MMD on CPU: the per-value kernels of the binned-grid method (linear
// binning, linear interpolation of a field). The exact direct sums: mmd_direct.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../mmd_grid.h"
#include "cpu_utils.h"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

// Each row in fixed point (math.h's fixed_point_split): integer units per bin, then the
// weights, so the CPU exercises the split and conversion the GPU kernels use. (Rows are at
// most kMaxGridValues long: mmd_grid_forward checks.)
at::Tensor grid_bin_cpu(const at::Tensor& x_in, const at::Tensor& lo, const at::Tensor& step,
                        int64_t num_bins) {
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), count = x.size(1);
  const double lo_v = lo.item<double>(), inv_step = 1.0 / step.item<double>();
  const int bits = fixed_point_bits(count);
  at::Tensor weights = at::empty({rows, num_bins}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::grid_bin", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    double* wp = weights.data_ptr<double>();
    at::parallel_for(0, rows, grain_for(count), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> units(static_cast<size_t>(num_bins));
      for (int64_t i = begin; i < end; ++i) {
        std::fill(units.begin(), units.end(), int64_t(0));
        for (int64_t m = 0; m < count; ++m) {
          const GridPosition p = grid_position(double(xp[i * count + m]), lo_v, inv_step, num_bins);
          const FixedPointSplit split = fixed_point_split(p.upper_weight, bits);
          units[size_t(p.lower)] += split.lower;
          units[size_t(p.lower + 1)] += split.upper;
        }
        double* w = wp + i * num_bins;
        for (int64_t g = 0; g < num_bins; ++g) {  // most bins are empty where M << G: no division
          w[g] = units[size_t(g)] == 0 ? 0.0 : fixed_point_weight(units[size_t(g)], count, bits);
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

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CPU, m) {
  m.impl("mmd_grid", &mmd_grid_cpu);
  m.impl("mmd_grid_backward", &mmd_grid_backward_cpu);
}

}  // namespace rcl_ops
