// The fused InfoNCE loss on CPU: per-row (and for the symmetric loss per-column) losses and
// their derivatives in one pass, in float64 (see csrc/rcl_ops.cpp for the op's contract).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../info_nce.h"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

using Tensor = at::Tensor;

// One line of `count` distances at `stride` apart, its target at index `target`: writes
// scale * d loss / d D_j to grad (same stride) and returns the line's loss.
template <typename T>
double info_nce_line(const T* distances, int64_t count, int64_t stride, int64_t target,
                     double inv_temperature, double scale, T* grad) {
  double max_logit = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < count; ++j) {
    const double logit = -double(distances[j * stride]) * inv_temperature;
    max_logit = logit > max_logit ? logit : max_logit;
  }
  double sum = 0.0;
  for (int64_t j = 0; j < count; ++j) {
    sum += std::exp(-double(distances[j * stride]) * inv_temperature - max_logit);
  }
  const double inv_sum = 1.0 / sum;
  for (int64_t j = 0; j < count; ++j) {
    const double logit = -double(distances[j * stride]) * inv_temperature;
    grad[j * stride] =
        T(scale * info_nce_gradient(logit, max_logit, inv_sum, j == target, inv_temperature));
  }
  return info_nce_loss(max_logit, sum, -double(distances[target * stride]) * inv_temperature);
}

std::tuple<Tensor, Tensor, Tensor> info_nce_cpu(const Tensor& distances_in, double temperature,
                                                bool symmetric, int64_t first_positive) {
  check_info_nce_args(distances_in, temperature, symmetric, first_positive);
  const Tensor distances = distances_in.contiguous();
  const int64_t rows = distances.size(0), columns = distances.size(1);
  Tensor losses = at::empty({rows}, distances.options());
  Tensor grad_rows = at::empty_like(distances);
  Tensor grad_columns = info_nce_grad_columns(distances, symmetric);
  const double inv_temperature = 1.0 / temperature, scale = symmetric ? 0.5 : 1.0;
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "rcl_ops::info_nce", [&] {
    const scalar_t* d = distances.data_ptr<scalar_t>();
    scalar_t* loss = losses.data_ptr<scalar_t>();
    scalar_t* g_rows = grad_rows.data_ptr<scalar_t>();
    scalar_t* g_columns = symmetric ? grad_columns.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double value = info_nce_line(d + i * columns, columns, 1, first_positive + i,
                                     inv_temperature, scale, g_rows + i * columns);
        if (symmetric) {
          value += info_nce_line(d + i, rows, columns, i, inv_temperature, scale, g_columns + i);
        }
        loss[i] = scalar_t(scale * value);
      }
    });
  });
  return {losses, grad_rows, grad_columns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CPU, m) { m.impl("info_nce", &info_nce_cpu); }

}  // namespace rcl_ops
