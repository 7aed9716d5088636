// Helpers shared by the CUDA kernels: launch sizes, a deterministic block reduction and a
// device check. Included only by csrc/cuda/*.cu.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace rcl_ops {
namespace cudautil {

constexpr int kThreads = 256;  // threads per block of the 1-D kernels
constexpr int kWarp = 32;

// Blocks for a grid-stride loop over `count` items; count > 0. Capped: the kernels loop.
inline unsigned int blocks_for(int64_t count, int threads = kThreads) {
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, int64_t(1) << 20));
}

// Grid-stride loop bounds with int64 indices (B * M may exceed 2^31).
__device__ __forceinline__ int64_t global_thread_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t global_thread_stride() {
  return int64_t(blockDim.x) * gridDim.x;
}

// Sum of `value` over a 1-D block of kBlock threads (a multiple of 32, at most 1024); the
// result is valid in thread 0. Every thread of the block must call it. The order of the
// additions is fixed, so the result is deterministic. Safe to call repeatedly.
template <int kBlock>
__device__ __forceinline__ double block_sum(double value) {
  static_assert(kBlock % kWarp == 0 && kBlock <= 1024, "block size");
  __shared__ double warp_sums[kBlock / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kBlock / kWarp ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return value;
}

// Largest `value` over a 1-D block of kBlock threads (as block_sum; NaN where any is NaN); the
// result is valid in thread 0. Every thread of the block must call it.
template <int kBlock>
__device__ __forceinline__ double block_max(double value) {
  static_assert(kBlock % kWarp == 0 && kBlock <= 1024, "block size");
  __shared__ double warp_maxima[kBlock / kWarp];
  const auto larger = [](double a, double b) { return (a > b || a != a) ? a : b; };
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value = larger(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  if (lane == 0) warp_maxima[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kBlock / kWarp ? warp_maxima[lane] : -INFINITY;
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      value = larger(value, __shfl_down_sync(0xffffffffu, value, offset));
    }
  }
  __syncthreads();  // warp_maxima may be reused by the next call
  return value;
}

// The CPU kernels index raw pointers of every tensor argument; here a tensor on another
// device would be read as device memory, so the devices are checked (metadata only).
inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                         const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace cudautil
}  // namespace rcl_ops
