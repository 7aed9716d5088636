// The binned-grid MMD, written once over ATen ops (FFT convolution, float64 GEMMs) and
// parameterised by the two per-device kernels that touch every value: the binning and the
// interpolation. csrc/cpu and csrc/cuda register it with their own kernels.
#pragma once

#include <ATen/ATen.h>

namespace rcl_ops {

struct GridKernels {
  // (B, M) values -> (B, G) float64 weights: each value adds mass 1/M to the two nearest
  // grid points t_g = lo + g * step, split linearly. lo and step are 0-dim float64 tensors
  // on the values' device.
  at::Tensor (*bin)(const at::Tensor& x, const at::Tensor& lo, const at::Tensor& step,
                    int64_t num_bins);
  // (B, G) float64 field, (B, M) values -> (B, M) in x's dtype: the field at each value,
  // interpolated linearly between grid points.
  at::Tensor (*interpolate)(const at::Tensor& field, const at::Tensor& x, const at::Tensor& lo,
                            const at::Tensor& step);
};

// (distances (Bq, Bk) in q's dtype, grid (2,) float64 [lo, step], w_q, w_k (B, G) float64).
using MmdGridOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

MmdGridOutputs mmd_grid_forward(const GridKernels& kernels, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& bandwidths, int64_t num_bins,
                                bool unbiased);

// Gradients of sum(grad * distances) for q and k, from the forward's grid and weights.
std::tuple<at::Tensor, at::Tensor> mmd_grid_backward(
    const GridKernels& kernels, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& bandwidths, const at::Tensor& grid, const at::Tensor& w_q,
    const at::Tensor& w_k, int64_t num_bins, bool unbiased);

}  // namespace rcl_ops
