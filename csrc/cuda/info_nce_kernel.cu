// The fused InfoNCE loss on CUDA: one block per query row i, which also takes column i for the
// symmetric loss; float64 reductions in a fixed order (deterministic). See csrc/rcl_ops.cpp for
// the op's contract and csrc/cpu/info_nce_kernel.cpp for the same computation on CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../info_nce.h"
#include "common.cuh"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

using cudautil::block_max;
using cudautil::block_sum;
using cudautil::kThreads;

// One line of `count` distances at `stride` apart, its target at index `target`: writes
// scale * d loss / d D_j to grad (same stride) and returns the line's loss (in every thread).
template <typename T>
__device__ double info_nce_line(const T* __restrict__ distances, int64_t count, int64_t stride,
                                int64_t target, double inv_temperature, double scale,
                                T* __restrict__ grad) {
  __shared__ double broadcast[2];
  double local_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    local_max = fmax(local_max, -double(distances[j * stride]) * inv_temperature);
  }
  const double max_total = block_max<kThreads>(local_max);
  if (threadIdx.x == 0) broadcast[0] = max_total;
  __syncthreads();
  const double max_logit = broadcast[0];
  double local_sum = 0.0;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    local_sum += exp(-double(distances[j * stride]) * inv_temperature - max_logit);
  }
  const double sum_total = block_sum<kThreads>(local_sum);
  if (threadIdx.x == 0) broadcast[1] = sum_total;
  __syncthreads();
  const double sum = broadcast[1], inv_sum = 1.0 / sum;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    const double logit = -double(distances[j * stride]) * inv_temperature;
    grad[j * stride] =
        T(scale * info_nce_gradient(logit, max_logit, inv_sum, j == target, inv_temperature));
  }
  const double loss =
      info_nce_loss(max_logit, sum, -double(distances[target * stride]) * inv_temperature);
  __syncthreads();  // broadcast is reused by the next line
  return loss;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    info_nce_kernel(const T* __restrict__ distances, int64_t rows, int64_t columns,
                    int64_t first_positive, double inv_temperature, bool symmetric,
                    T* __restrict__ losses, T* __restrict__ grad_rows,
                    T* __restrict__ grad_columns) {
  const int64_t i = blockIdx.x;
  const double scale = symmetric ? 0.5 : 1.0;
  double value = info_nce_line(distances + i * columns, columns, 1, first_positive + i,
                               inv_temperature, scale, grad_rows + i * columns);
  if (symmetric) {
    value +=
        info_nce_line(distances + i, rows, columns, i, inv_temperature, scale, grad_columns + i);
  }
  if (threadIdx.x == 0) losses[i] = T(scale * value);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_cuda(const at::Tensor& distances_in,
                                                             double temperature, bool symmetric,
                                                             int64_t first_positive) {
  check_info_nce_args(distances_in, temperature, symmetric, first_positive);
  c10::cuda::CUDAGuard device_guard(distances_in.device());
  const at::Tensor distances = distances_in.contiguous();
  const int64_t rows = distances.size(0), columns = distances.size(1);
  TORCH_CHECK(rows <= int64_t(1) << 31, "rcl_ops::info_nce: at most 2^31 rows, got ", rows);
  at::Tensor losses = at::empty({rows}, distances.options());
  at::Tensor grad_rows = at::empty_like(distances);
  at::Tensor grad_columns = info_nce_grad_columns(distances, symmetric);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "rcl_ops::info_nce", [&] {
    info_nce_kernel<scalar_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        distances.data_ptr<scalar_t>(), rows, columns, first_positive, 1.0 / temperature, symmetric,
        losses.data_ptr<scalar_t>(), grad_rows.data_ptr<scalar_t>(),
        symmetric ? grad_columns.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {losses, grad_rows, grad_columns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CUDA, m) { m.impl("info_nce", &info_nce_cuda); }

}  // namespace rcl_ops
