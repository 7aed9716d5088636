// The binned-grid MMD, written once over ATen ops (FFT convolution, float64 GEMMs) and
// parameterised by the two per-device kernels that touch every value: the binning and the
// interpolation. csrc/cpu and csrc/cuda register it with their own kernels.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace rcl_ops {

struct GridKernels {
  // (B, M) values -> (B, G) float64 weights: each value adds mass 1/M to the two nearest
  // grid points t_g = lo + g * step, split linearly in fixed point (math.h's fixed_point_split:
  // the same bits whatever the order of the additions). lo and step are 0-dim float64 tensors
  // on the values' device.
  at::Tensor (*bin)(const at::Tensor& x, const at::Tensor& lo, const at::Tensor& step,
                    int64_t num_bins);
  // (B, G) float64 field, (B, M) values -> (B, M) in x's dtype: the field at each value,
  // interpolated linearly between grid points.
  at::Tensor (*interpolate)(const at::Tensor& field, const at::Tensor& x, const at::Tensor& lo,
                            const at::Tensor& step);
  // The grid over all values of q and k: a (2,) float64 tensor [lo, step] with lo the smallest
  // value and step = max(max - lo, 1e-3 min(bandwidths)) / (num_bins - 1).
  at::Tensor (*grid)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths,
                     int64_t num_bins);
  // rfft over fft_size points of the kernel sum_h exp(-d^2 / (2 h^2)) (or its derivative in
  // d) sampled at the signed offsets d = n * step, laid out circularly; (2,) grid as above.
  at::Tensor (*spectrum)(const at::Tensor& grid, const at::Tensor& bandwidths, int64_t fft_size,
                         bool derivative);
};

// The grid and spectrum written with ATen ops (any device; the CPU kernels use them, the
// CUDA ones compute the same in one or two launches).
at::Tensor grid_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths,
                     int64_t num_bins);
at::Tensor spectrum_aten(const at::Tensor& grid, const at::Tensor& bandwidths, int64_t fft_size,
                         bool derivative);

// (distances (Bq, Bk) in q's dtype, grid (2,) float64 [lo, step], w_q, w_k (B, G) float64).
using MmdGridOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

MmdGridOutputs mmd_grid_forward(const GridKernels& kernels, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& bandwidths, int64_t num_bins,
                                bool unbiased);

// Gradients of sum(grad * distances) for q and k (each side only where output_mask asks),
// from the forward's grid and weights.
std::tuple<at::Tensor, at::Tensor> mmd_grid_backward(
    const GridKernels& kernels, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& bandwidths, const at::Tensor& grid, const at::Tensor& w_q,
    const at::Tensor& w_k, int64_t num_bins, bool unbiased, OutputMask output_mask);

}  // namespace rcl_ops
