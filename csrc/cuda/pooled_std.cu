// rcl_ops::pooled_std on CUDA in three launches (the composite of torch ops it replaces took ~30):
// per block of each batch its sum and range; per block its squared deviations from the batch mean
// (every block adds the first pass's partial sums in the same order, so all see one mean); one
// block adds the partials and applies pooled_std_of. Block sums in a fixed order: deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

using cudautil::block_max;
using cudautil::block_sum;
using cudautil::kThreads;

constexpr int kMaxBlocks = 512;  // partial sums per batch (blockIdx.x)

struct Batches {
  const void* values[2];
  int64_t count[2];
};

// Partials of the first pass: (2, blocks, 3) [sum, lo, hi]; of the second: (2, blocks).
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_range_kernel(Batches b, double* partials) {
  const int side = blockIdx.y;
  const T* x = static_cast<const T*>(b.values[side]);
  double sum = 0.0, lo = INFINITY, hi = -INFINITY;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < b.count[side];
       i += int64_t(blockDim.x) * gridDim.x) {
    const double v = double(x[i]);
    sum += v;
    lo = nan_min(lo, v);
    hi = nan_max(hi, v);
  }
  sum = block_sum<kThreads>(sum);
  lo = -block_max<kThreads>(-lo);
  hi = block_max<kThreads>(hi);
  if (threadIdx.x == 0) {
    double* out = partials + (int64_t(side) * gridDim.x + blockIdx.x) * 3;
    out[0] = sum;
    out[1] = lo;
    out[2] = hi;
  }
}

// The mean of one batch from the first pass's partials, the same in every block (fixed order);
// valid in every thread.
__device__ double batch_mean(const double* partials, int side, int blocks, int64_t count) {
  __shared__ double mean;
  double sum = 0.0;
  for (int j = threadIdx.x; j < blocks; j += blockDim.x) sum += partials[(side * blocks + j) * 3];
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) mean = sum / double(count);
  __syncthreads();
  const double value = mean;
  __syncthreads();  // mean may be rewritten by the next call
  return value;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    deviations_kernel(Batches b, const double* partials, double* deviations) {
  const int side = blockIdx.y;
  const T* x = static_cast<const T*>(b.values[side]);
  const double mean = batch_mean(partials, side, gridDim.x, b.count[side]);
  double sum = 0.0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < b.count[side];
       i += int64_t(blockDim.x) * gridDim.x) {
    const double deviation = double(x[i]) - mean;
    sum += deviation * deviation;
  }
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) deviations[side * gridDim.x + blockIdx.x] = sum;
}

// One block: each batch's moments from the partials, then the pooled std into out[0].
__global__ void __launch_bounds__(kThreads)
    finish_kernel(Batches b, const double* partials, const double* deviations, int blocks,
                  double* out) {
  ValueMoments moments[2];
  for (int side = 0; side < 2; ++side) {
    const double mean = batch_mean(partials, side, blocks, b.count[side]);
    double lo = INFINITY, hi = -INFINITY, squares = 0.0;
    for (int j = threadIdx.x; j < blocks; j += blockDim.x) {
      lo = nan_min(lo, partials[(side * blocks + j) * 3 + 1]);
      hi = nan_max(hi, partials[(side * blocks + j) * 3 + 2]);
      squares += deviations[side * blocks + j];
    }
    lo = -block_max<kThreads>(-lo);
    hi = block_max<kThreads>(hi);
    squares = block_sum<kThreads>(squares);
    moments[side] = {double(b.count[side]), mean, squares, lo, hi};
  }
  if (threadIdx.x == 0) out[0] = pooled_std_of(moments[0], moments[1]);
}

at::Tensor pooled_std_cuda(const at::Tensor& q_in, const at::Tensor& k_in) {
  const char* op = "rcl_ops::pooled_std";
  check_rows(q_in, op, "q");
  check_rows(k_in, op, "k");
  check_same(q_in, k_in, op, "q", "k");
  c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const int blocks = static_cast<int>(
      std::min<int64_t>(kMaxBlocks, (std::max(q.numel(), k.numel()) + kThreads - 1) / kThreads));
  const auto float64 = q.options().dtype(at::kDouble);
  at::Tensor partials = at::empty({2, blocks, 3}, float64);
  at::Tensor deviations = at::empty({2, blocks}, float64);
  at::Tensor out = at::empty({1}, float64);
  const Batches batches{{q.data_ptr(), k.data_ptr()}, {q.numel(), k.numel()}};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(blocks, 2);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rcl_ops::pooled_std", [&] {
    sum_range_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(batches, partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    deviations_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(batches, partials.data_ptr<double>(),
                                                               deviations.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_kernel<<<1, kThreads, 0, stream>>>(batches, partials.data_ptr<double>(),
                                            deviations.data_ptr<double>(), blocks,
                                            out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CUDA, m) { m.impl("pooled_std", &pooled_std_cuda); }

}  // namespace rcl_ops
