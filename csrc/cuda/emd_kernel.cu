// Earth mover's distance on CUDA. Sketch: each residual sorted (stable, so ties keep their
// index order as in the CPU radix sort and torch.sort) and reduced to K mid-level quantiles
// by one thread per quantile. float32 rows are sorted all at once by one device-wide radix
// sort of (row, value) keys, which keeps every SM busy (at::sort's segmented sort gives a row
// to each block: 64 rows, 64 of 132 SMs), and the sorted values read back from the sorted keys
// (no gather from the input). float64 rows use at::sort. The quantile backward
// gathers the gradients of each sorted position and scatters them through the sort order in
// one kernel. Pair: tiled like a GEMM over (i, j) blocks with K staged through shared memory
// in chunks (split over K when the batch is small); the backward has one kernel per side, so
// no atomics, and for the exact EMD it writes each gradient through the sort order straight
// to the input's position.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include "../checks.h"
#include "common.cuh"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

using cudautil::blocks_for;
using cudautil::check_device;
using cudautil::global_thread_index;
using cudautil::global_thread_stride;
using cudautil::kThreads;

// ---- sort -------------------------------------------------------------------------------

// One thread per (row, k): linear interpolation between order statistics, as on CPU.
template <typename T>
__global__ void quantiles_kernel(const T* __restrict__ sorted, int64_t count, int64_t num_quantiles,
                                 int64_t total, T* __restrict__ quantiles) {
  for (int64_t idx = global_thread_index(); idx < total; idx += global_thread_stride()) {
    const int64_t row = idx / num_quantiles, k = idx - row * num_quantiles;
    const QuantilePosition p = quantile_position(k, num_quantiles, count);
    const T* s = sorted + row * count;
    // Explicit roundings (no FMA contraction): the same result as the CPU expression.
    quantiles[idx] = T(__dadd_rn(__dmul_rn(double(s[p.lower]), 1.0 - p.upper_weight),
                                 __dmul_rn(double(s[p.upper]), p.upper_weight)));
  }
}

// The float32 radix key: float_sort_key (rcl_ops/math.h, as in the CPU sort: signed zeros tie,
// so the stable sort keeps their index order as torch.sort does; NaNs last) in the low 32 bits,
// the row index above them.
__device__ __forceinline__ uint64_t row_value_key(int64_t row, float v) {
  return (uint64_t(row) << 32) | float_sort_key(v);
}

// Keys of two batches at once: elements [0, total_a) are a's rows, the rest b's, whose row
// indices follow a's (b may be empty: total_b == 0). Column: each value's index in its row,
// the payload the sort carries (uint16_t where rows have at most 2^16 values).
template <typename Column>
__global__ void row_value_keys_kernel(const float* __restrict__ a, int64_t total_a,
                                      const float* __restrict__ b, int64_t total_b, int64_t count,
                                      uint64_t* __restrict__ keys, Column* __restrict__ columns) {
  for (int64_t idx = global_thread_index(); idx < total_a + total_b;
       idx += global_thread_stride()) {
    const int64_t row = idx / count;  // a's rows, then b's: one row numbering
    keys[idx] = row_value_key(row, idx < total_a ? a[idx] : b[idx - total_a]);
    columns[idx] = Column(idx - row * count);
  }
}

// After the sort, position idx holds the (idx / count)-th row's rank (idx % count) value:
// every row has exactly count keys and the row index is the key's most significant part.
// Writes each batch's sorted values, decoded from the sorted keys' low 32 bits (a coalesced
// read where a gather from the input would read at random), and int32 order. The decode gives
// the input value bit for bit but for -0.0 (+0.0) and NaN (0x7FFFFFFF): see float_from_sort_key.
template <typename Column>
__global__ void decode_sorted_kernel(const uint64_t* __restrict__ keys, int64_t total_a,
                                     int64_t total_b, const Column* __restrict__ columns,
                                     float* __restrict__ sorted_a, order_t* __restrict__ order_a,
                                     float* __restrict__ sorted_b, order_t* __restrict__ order_b) {
  for (int64_t idx = global_thread_index(); idx < total_a + total_b;
       idx += global_thread_stride()) {
    const float value = float_from_sort_key(uint32_t(keys[idx]));  // the low 32 bits
    const order_t column = order_t(columns[idx]);
    if (idx < total_a) {
      sorted_a[idx] = value;
      order_a[idx] = column;
    } else {
      sorted_b[idx - total_a] = value;
      order_b[idx - total_a] = column;
    }
  }
}

struct SortedRows {
  at::Tensor sorted, order;
};

// One cub radix sort of the (row, value) keys of a's and then b's rows (b may be undefined)
// over 32 + ceil(log2(rows)) key bits, carrying each value's column; then the sorted values
// and orders decoded into out_a and out_b. Column buffers of `column_type` (Column's size).
template <typename Column>
void radix_sort_rows(const at::Tensor& a, const at::Tensor& b, at::ScalarType column_type,
                     SortedRows& out_a, SortedRows& out_b) {
  const int64_t count = a.size(1), total_a = a.numel(), total_b = b.defined() ? b.numel() : 0;
  const int64_t rows = a.size(0) + (b.defined() ? b.size(0) : 0), total = total_a + total_b;
  const auto u64 = a.options().dtype(at::kLong), columns_type = a.options().dtype(column_type);
  at::Tensor keys_in = at::empty({total}, u64), keys_out = at::empty({total}, u64);
  at::Tensor columns_in = at::empty({total}, columns_type);
  at::Tensor columns_out = at::empty({total}, columns_type);
  int row_bits = 0;
  while ((int64_t(1) << row_bits) < rows) ++row_bits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* keys_in_p = reinterpret_cast<uint64_t*>(keys_in.data_ptr());
  auto* keys_out_p = reinterpret_cast<uint64_t*>(keys_out.data_ptr());
  auto* columns_in_p = reinterpret_cast<Column*>(columns_in.data_ptr());
  auto* columns_out_p = reinterpret_cast<Column*>(columns_out.data_ptr());
  row_value_keys_kernel<Column><<<blocks_for(total), kThreads, 0, stream>>>(
      a.data_ptr<float>(), total_a, b.defined() ? b.data_ptr<float>() : nullptr, total_b, count,
      keys_in_p, columns_in_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Double buffers: cub alternates between the two of each pair, and its temporary storage
  // is then small (the plain SortPairs would allocate another copy of keys and values).
  cub::DoubleBuffer<uint64_t> keys(keys_in_p, keys_out_p);
  cub::DoubleBuffer<Column> columns(columns_in_p, columns_out_p);
  size_t temp_bytes = 0;
  const int num_items = int(total), end_bit = 32 + row_bits;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys, columns, num_items, 0,
                                                 end_bit, stream));
  at::Tensor temp = at::empty({int64_t(temp_bytes)}, a.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), temp_bytes, keys, columns,
                                                 num_items, 0, end_bit, stream));
  decode_sorted_kernel<Column><<<blocks_for(total), kThreads, 0, stream>>>(
      keys.Current(), total_a, total_b, columns.Current(), out_a.sorted.data_ptr<float>(),
      out_a.order.data_ptr<order_t>(), b.defined() ? out_b.sorted.data_ptr<float>() : nullptr,
      b.defined() ? out_b.order.data_ptr<order_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Stable ascending sort of each row of one or two contiguous float32 (rows, count) batches
// of the same count, with one device-wide radix sort: (sorted values, int32 column order) per
// batch. b may be undefined. The total number of values is below 2^31 (cub's item count is an
// int). Rows of at most 2^16 values carry 16-bit columns through the sort: each of its passes
// then moves 10 bytes per value instead of 12.
std::pair<SortedRows, SortedRows> sort_rows_float32(const at::Tensor& a, const at::Tensor& b) {
  const auto int32 = a.options().dtype(kOrderType);
  SortedRows out_a{at::empty_like(a), at::empty(a.sizes(), int32)}, out_b;
  if (b.defined()) out_b = {at::empty_like(b), at::empty(b.sizes(), int32)};
  if (a.size(1) <= (int64_t(1) << 16)) {
    radix_sort_rows<uint16_t>(a, b, at::kShort, out_a, out_b);
  } else {
    radix_sort_rows<order_t>(a, b, kOrderType, out_a, out_b);
  }
  return {out_a, out_b};
}

bool radix_sortable(const at::Tensor& x, int64_t total) {
  return x.scalar_type() == at::kFloat && total < (int64_t(1) << 31);
}

std::tuple<at::Tensor, at::Tensor> sorted_quantiles_cuda(const at::Tensor& x_in,
                                                         int64_t num_quantiles) {
  const char* op = "rcl_ops::sorted_quantiles";
  check_rows(x_in, op, "x");
  TORCH_CHECK(num_quantiles >= 1, op, ": num_quantiles must be positive, got ", num_quantiles);
  TORCH_CHECK(x_in.size(1) < (int64_t(1) << 31), op, ": at most 2^31 - 1 values per row");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), count = x.size(1);
  // Stable: equal values keep their index order, as in the CPU (float32) radix sort.
  at::Tensor sorted, order;
  if (radix_sortable(x, rows * count)) {
    const SortedRows result = sort_rows_float32(x, at::Tensor()).first;
    sorted = result.sorted;
    order = result.order;
  } else {
    auto sorted_and_order = at::sort(x, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    sorted = std::get<0>(sorted_and_order).contiguous();
    order = std::get<1>(sorted_and_order).to(kOrderType).contiguous();
  }
  if (num_quantiles == count) return {sorted, order};
  at::Tensor quantiles = at::empty({rows, num_quantiles}, x.options());
  const int64_t total = rows * num_quantiles;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::sorted_quantiles", [&] {
    quantiles_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        sorted.data_ptr<scalar_t>(), count, num_quantiles, total, quantiles.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {quantiles, order};
}

// One thread per sorted position (row, m): its gradient is gathered from the quantiles k
// that interpolate from m, then written to grad_x[row, order[row, m]]. lower(k) is
// non-decreasing in k and every k touching m has lower(k) in {m - 1, m}, so a binary search
// finds the first and a short scan the rest. The terms are added in increasing k, lower
// before upper, in T: the same sums, in the same order, as the CPU loop.
template <typename T>
__global__ void sorted_quantiles_backward_kernel(const T* __restrict__ grad,
                                                 const order_t* __restrict__ order,
                                                 int64_t num_quantiles, int64_t count,
                                                 int64_t total, T* __restrict__ grad_x) {
  for (int64_t idx = global_thread_index(); idx < total; idx += global_thread_stride()) {
    const int64_t row = idx / count, m = idx - row * count;
    const T* g = grad + row * num_quantiles;
    T value;
    if (num_quantiles == count) {
      value = g[m];
    } else {
      const int64_t target = m > 0 ? m - 1 : 0;
      int64_t lo = 0, hi = num_quantiles;  // first k with lower(k) >= target
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (quantile_position(mid, num_quantiles, count).lower < target) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      value = T(0);
      for (int64_t k = lo; k < num_quantiles; ++k) {
        const QuantilePosition p = quantile_position(k, num_quantiles, count);
        if (p.lower > m) break;
        // __dmul_rn: no FMA contraction into the sum, as in the CPU loop.
        if (p.lower == m) value += T(__dmul_rn(double(g[k]), 1.0 - p.upper_weight));
        if (p.upper == m) value += T(__dmul_rn(double(g[k]), p.upper_weight));
      }
    }
    const int64_t dst = order[idx];  // int32 -> int64 before the row offset
    CUDA_KERNEL_ASSERT(dst >= 0 && dst < count);
    grad_x[row * count + dst] = value;
  }
}

at::Tensor sorted_quantiles_backward_cuda(const at::Tensor& grad_in, const at::Tensor& order_in) {
  const char* op = "rcl_ops::sorted_quantiles_backward";
  check_rows(grad_in, op, "grad_quantiles");
  check_quantile_order(order_in, grad_in, op);
  check_device(order_in, grad_in, op, "order", "grad_quantiles");
  c10::cuda::CUDAGuard device_guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const int64_t rows = grad.size(0), num_quantiles = grad.size(1), count = order.size(1);
  at::Tensor grad_x = at::empty({rows, count}, grad.options());
  const int64_t total = rows * count;
  if (total == 0) return grad_x;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "rcl_ops::sorted_quantiles_backward", [&] {
    sorted_quantiles_backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), order.data_ptr<order_t>(), num_quantiles, count, total,
        grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

// ---- pair -------------------------------------------------------------------------------

// Forward tiling: a block of 16 x 16 threads owns a 64 x 64 tile of (i, j) pairs, 4 x 4 per
// thread (rows ty + 16 r, columns tx + 16 c). K is walked in chunks of 32 staged in shared
// memory (transposed, padded against bank conflicts); each chunk's |a - b| are summed in T
// registers and added to double accumulators. blockIdx.z splits K when there are too few
// tiles to fill the GPU; the splits' double partial sums are then added in a fixed order.
constexpr int kPairTile = 64;
constexpr int kPairThreadsX = 16, kPairThreadsY = 16;
constexpr int kPairMicro = kPairTile / kPairThreadsX;  // 4
constexpr int kPairChunk = 32;
constexpr int kPairThreads = kPairThreadsX * kPairThreadsY;
static_assert(kPairTile == kPairThreadsY * kPairMicro, "square tile");

template <typename T>
__global__ void __launch_bounds__(kPairThreads)
    emd_pair_kernel(const T* __restrict__ sq, const T* __restrict__ sk, int64_t bq, int64_t bk,
                    int64_t n, int64_t chunks_per_split, T* __restrict__ out,
                    double* __restrict__ partial) {
  __shared__ T tile_q[kPairChunk][kPairTile + 1];
  __shared__ T tile_k[kPairChunk][kPairTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kPairThreadsX + tx;
  const int64_t i0 = int64_t(blockIdx.y) * kPairTile, j0 = int64_t(blockIdx.x) * kPairTile;
  const int64_t c_begin = int64_t(blockIdx.z) * chunks_per_split * kPairChunk;
  const int64_t c_end = min(n, c_begin + chunks_per_split * kPairChunk);
  double acc[kPairMicro][kPairMicro];
#pragma unroll
  for (int r = 0; r < kPairMicro; ++r) {
#pragma unroll
    for (int c = 0; c < kPairMicro; ++c) acc[r][c] = 0.0;
  }
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kPairChunk) {
    // Stage: consecutive threads read consecutive k of one row (coalesced). Rows past the
    // batch and k past the chunk's end are zero on both sides: |0 - 0| adds nothing.
    for (int e = tid; e < kPairTile * kPairChunk; e += kPairThreads) {
      const int r = e / kPairChunk, kk = e % kPairChunk;
      const int64_t kidx = c0 + kk;
      const bool k_ok = kidx < c_end;
      tile_q[kk][r] = (k_ok && i0 + r < bq) ? sq[(i0 + r) * n + kidx] : T(0);
      tile_k[kk][r] = (k_ok && j0 + r < bk) ? sk[(j0 + r) * n + kidx] : T(0);
    }
    __syncthreads();
    T part[kPairMicro][kPairMicro];
#pragma unroll
    for (int r = 0; r < kPairMicro; ++r) {
#pragma unroll
      for (int c = 0; c < kPairMicro; ++c) part[r][c] = T(0);
    }
#pragma unroll 8
    for (int kk = 0; kk < kPairChunk; ++kk) {
      T a[kPairMicro], b[kPairMicro];
#pragma unroll
      for (int r = 0; r < kPairMicro; ++r) {
        a[r] = tile_q[kk][ty + kPairThreadsY * r];
        b[r] = tile_k[kk][tx + kPairThreadsX * r];
      }
#pragma unroll
      for (int r = 0; r < kPairMicro; ++r) {
#pragma unroll
        for (int c = 0; c < kPairMicro; ++c) part[r][c] += fabs(a[r] - b[c]);
      }
    }
#pragma unroll
    for (int r = 0; r < kPairMicro; ++r) {
#pragma unroll
      for (int c = 0; c < kPairMicro; ++c) acc[r][c] += double(part[r][c]);
    }
    __syncthreads();  // the tiles are overwritten by the next chunk
  }
#pragma unroll
  for (int r = 0; r < kPairMicro; ++r) {
    const int64_t i = i0 + ty + kPairThreadsY * r;
    if (i >= bq) continue;
#pragma unroll
    for (int c = 0; c < kPairMicro; ++c) {
      const int64_t j = j0 + tx + kPairThreadsX * c;
      if (j >= bk) continue;
      if (partial != nullptr) {
        partial[int64_t(blockIdx.z) * bq * bk + i * bk + j] = acc[r][c];
      } else {
        out[i * bk + j] = T(acc[r][c] / double(n));
      }
    }
  }
}

template <typename T>
__global__ void emd_pair_reduce_kernel(const double* __restrict__ partial, int64_t splits,
                                       int64_t pairs, int64_t n, T* __restrict__ out) {
  for (int64_t idx = global_thread_index(); idx < pairs; idx += global_thread_stride()) {
    double total = 0.0;
    for (int64_t s = 0; s < splits; ++s) total += partial[s * pairs + idx];
    out[idx] = T(total / double(n));
  }
}

at::Tensor emd_pair_cuda(const at::Tensor& sq_in, const at::Tensor& sk_in) {
  const char* op = "rcl_ops::emd_pair";
  check_pair(sq_in, sk_in, op);
  c10::cuda::CUDAGuard device_guard(sq_in.device());
  const at::Tensor sq = sq_in.contiguous(), sk = sk_in.contiguous();
  const int64_t bq = sq.size(0), bk = sk.size(0), n = sq.size(1);
  const int64_t tiles_q = (bq + kPairTile - 1) / kPairTile;
  const int64_t tiles_k = (bk + kPairTile - 1) / kPairTile;
  TORCH_CHECK(tiles_q <= 65535, op, ": at most ", 65535 * kPairTile, " rows of sorted_q");
  at::Tensor out = at::empty({bq, bk}, sq.options());
  // Split K so that about two blocks per multiprocessor run; each split gets whole chunks.
  const int64_t chunks = (n + kPairChunk - 1) / kPairChunk;
  const int64_t target_blocks = 2 * int64_t(cudautil::multiprocessor_count(sq.get_device()));
  int64_t splits = std::max<int64_t>(1, std::min(chunks, target_blocks / (tiles_q * tiles_k)));
  const int64_t chunks_per_split = (chunks + splits - 1) / splits;
  splits = (chunks + chunks_per_split - 1) / chunks_per_split;  // no empty split
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, bq, bk}, sq.options().dtype(at::kDouble));
  const dim3 grid(static_cast<unsigned int>(tiles_k), static_cast<unsigned int>(tiles_q),
                  static_cast<unsigned int>(splits));
  const dim3 block(kPairThreadsX, kPairThreadsY);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(sq.scalar_type(), "rcl_ops::emd_pair", [&] {
    double* partial_ptr = splits > 1 ? partial.data_ptr<double>() : nullptr;
    emd_pair_kernel<scalar_t>
        <<<grid, block, 0, stream>>>(sq.data_ptr<scalar_t>(), sk.data_ptr<scalar_t>(), bq, bk, n,
                                     chunks_per_split, out.data_ptr<scalar_t>(), partial_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      emd_pair_reduce_kernel<scalar_t><<<blocks_for(bq * bk), kThreads, 0, stream>>>(
          partial_ptr, splits, bq * bk, n, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// Backward, one side: out[s, k] = sum_o grad[s, o] sign(self[s, k] - other[o, k]) / K.
// grad_q is (self, other) = (sorted_q, sorted_k) with grad; grad_k is (sorted_k, sorted_q)
// with grad^T, since -sign(a - b) = sign(b - a). A block of 32 x 8 threads owns 32 values of
// k and 32 rows of self (4 per thread); the other side is staged 32 rows at a time, with
// the matching 32 x 32 block of grad. Each output is summed by one thread, in a fixed order:
// each stage's (at most kGradOther) terms in T, each stage's sum then added in double.
constexpr int kGradK = 32;                          // k per block (threadIdx.x)
constexpr int kGradRowsY = 8;                       // threadIdx.y
constexpr int kGradMicro = 4;                       // self rows per thread
constexpr int kGradRows = kGradRowsY * kGradMicro;  // self rows per block
constexpr int kGradOther = 32;                      // other rows per stage
constexpr int kGradThreads = kGradK * kGradRowsY;
static_assert(kGradOther % kGradRowsY == 0 && kGradOther == kGradK, "staging layout");

template <typename T>
__global__ void __launch_bounds__(kGradThreads)
    emd_pair_grad_kernel(const T* __restrict__ self, const T* __restrict__ other,
                         const T* __restrict__ grad, int64_t rows_self, int64_t rows_other,
                         int64_t n, const order_t* __restrict__ order, T* __restrict__ out) {
  __shared__ T other_tile[kGradOther][kGradK];
  __shared__ T grad_tile[kGradRows][kGradOther + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t k = int64_t(blockIdx.x) * kGradK + tx;
  const int64_t s0 = int64_t(blockIdx.y) * kGradRows;
  const bool k_ok = k < n;
  T a[kGradMicro];
  double acc[kGradMicro];  // sums over the stages done
#pragma unroll
  for (int r = 0; r < kGradMicro; ++r) {
    const int64_t s = s0 + ty + kGradRowsY * r;
    a[r] = (k_ok && s < rows_self) ? self[s * n + k] : T(0);
    acc[r] = 0.0;
  }
  for (int64_t o0 = 0; o0 < rows_other; o0 += kGradOther) {
#pragma unroll
    for (int q = 0; q < kGradOther / kGradRowsY; ++q) {
      const int oo = ty + kGradRowsY * q;
      const int64_t o = o0 + oo;
      other_tile[oo][tx] = (k_ok && o < rows_other) ? other[o * n + k] : T(0);
    }
#pragma unroll
    for (int q = 0; q < kGradRows / kGradRowsY; ++q) {
      const int r = ty + kGradRowsY * q;
      const int64_t s = s0 + r, o = o0 + tx;
      grad_tile[r][tx] = (s < rows_self && o < rows_other) ? grad[s * rows_other + o] : T(0);
    }
    __syncthreads();
    const int limit = int(min(int64_t(kGradOther), rows_other - o0));
    // Each term g sign(a - b) is +-g or 0, exact in T, so FMA contraction cannot change it.
    // In float32 the stage's sum of at most 32 such terms errs by at most 31 u sum |g| (u =
    // 2^-24), and adding the stages in double adds next to nothing: below the CPU backward's
    // error (float32 over all rows of other) and well inside the float32 tolerance against
    // the float64 reference. It saves the two float -> double conversions and the double
    // multiply-add per term, which cost most of this kernel's time in float64 arithmetic.
    T stage[kGradMicro];
#pragma unroll
    for (int r = 0; r < kGradMicro; ++r) stage[r] = T(0);
    for (int oo = 0; oo < limit; ++oo) {
      const T b = other_tile[oo][tx];
#pragma unroll
      for (int r = 0; r < kGradMicro; ++r) {
        stage[r] += grad_tile[ty + kGradRowsY * r][oo] * sign_of_difference(a[r], b);
      }
    }
#pragma unroll
    for (int r = 0; r < kGradMicro; ++r) acc[r] += double(stage[r]);  // once per 32 terms
    __syncthreads();  // the tiles are overwritten by the next stage
  }
  if (!k_ok) return;
#pragma unroll
  for (int r = 0; r < kGradMicro; ++r) {
    const int64_t s = s0 + ty + kGradRowsY * r;
    // With the sort order, the sorted position's gradient goes straight to its input
    // position (the exact EMD's backward: no (B, M) gradient of the sorted values, no scatter).
    if (s < rows_self) out[s * n + (order ? int64_t(order[s * n + k]) : k)] = T(acc[r] / double(n));
  }
}

// The pair backward, one launch per side that the mask asks for; with orders (the exact EMD),
// each gradient is written through its row's sort order into the input's positions.
std::tuple<at::Tensor, at::Tensor> pair_backward(const at::Tensor& grad_in, const at::Tensor& sq_in,
                                                 const at::Tensor& sk_in, const at::Tensor& order_q,
                                                 const at::Tensor& order_k, OutputMask mask,
                                                 const char* op) {
  const int64_t bq = sq_in.size(0), bk = sk_in.size(0), n = sq_in.size(1);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == bq && grad_in.size(1) == bk, op,
              ": grad must have shape (", bq, ", ", bk, "), got ", grad_in.sizes());
  check_device(grad_in, sq_in, op, "grad", "sorted_q");
  TORCH_CHECK((std::max(bq, bk) + kGradRows - 1) / kGradRows <= 65535, op, ": at most ",
              65535 * kGradRows, " rows per side");
  c10::cuda::CUDAGuard device_guard(sq_in.device());
  const at::Tensor sq = sq_in.contiguous(), sk = sk_in.contiguous();
  // grad in the inputs' dtype (as on CPU); the division by K happens in the kernel.
  const at::Tensor grad = grad_in.to(sq.scalar_type()).contiguous();
  const at::Tensor grad_t = mask[1] ? grad.t().contiguous() : at::Tensor();
  const bool through_order = order_q.defined();
  const at::Tensor oq = through_order ? order_q.contiguous() : at::Tensor();
  const at::Tensor ok = through_order ? order_k.contiguous() : at::Tensor();
  at::Tensor grad_q = mask[0] ? at::empty_like(sq) : skipped_gradient(sq);
  at::Tensor grad_k = mask[1] ? at::empty_like(sk) : skipped_gradient(sk);
  const unsigned int k_blocks = static_cast<unsigned int>((n + kGradK - 1) / kGradK);
  const dim3 block(kGradK, kGradRowsY);
  const dim3 grid_q(k_blocks, static_cast<unsigned int>((bq + kGradRows - 1) / kGradRows));
  const dim3 grid_k(k_blocks, static_cast<unsigned int>((bk + kGradRows - 1) / kGradRows));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(sq.scalar_type(), "rcl_ops::emd_pair_backward", [&] {
    if (mask[0]) {
      emd_pair_grad_kernel<scalar_t><<<grid_q, block, 0, stream>>>(
          sq.data_ptr<scalar_t>(), sk.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), bq, bk, n,
          through_order ? oq.data_ptr<order_t>() : nullptr, grad_q.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (mask[1]) {
      emd_pair_grad_kernel<scalar_t><<<grid_k, block, 0, stream>>>(
          sk.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>(), grad_t.data_ptr<scalar_t>(), bk, bq, n,
          through_order ? ok.data_ptr<order_t>() : nullptr, grad_k.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_q, grad_k};
}

std::tuple<at::Tensor, at::Tensor> emd_pair_backward_cuda(const at::Tensor& grad_in,
                                                          const at::Tensor& sq_in,
                                                          const at::Tensor& sk_in,
                                                          OutputMask output_mask) {
  const char* op = "rcl_ops::emd_pair_backward";
  check_pair(sq_in, sk_in, op);
  return pair_backward(grad_in, sq_in, sk_in, at::Tensor(), at::Tensor(), output_mask, op);
}

// Exact EMD backward: the pair backward written through the sort orders (two launches, no
// separate scatter and no (B, M) gradient of the sorted values).
std::tuple<at::Tensor, at::Tensor> emd_exact_backward_cuda(
    const at::Tensor& grad, const at::Tensor& sorted_q, const at::Tensor& order_q,
    const at::Tensor& sorted_k, const at::Tensor& order_k, OutputMask output_mask) {
  const char* op = "rcl_ops::emd_exact_backward";
  check_sorted_pair_and_orders(sorted_q, order_q, sorted_k, order_k, op);
  return pair_backward(grad, sorted_q, sorted_k, order_q, order_k, output_mask, op);
}

// Exact EMD: q's and k's rows sorted by one radix sort (float32), then paired. Other dtypes
// (and batches past 2^31 values) sort each batch with sorted_quantiles.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emd_exact_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in) {
  const char* op = "rcl_ops::emd_exact";
  check_rows(q_in, op, "q");
  check_rows(k_in, op, "k");
  check_same_rows(q_in, k_in, op);
  c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  at::Tensor sorted_q, order_q, sorted_k, order_k;
  if (radix_sortable(q, q.numel() + k.numel())) {
    auto [a, b] = sort_rows_float32(q, k);
    sorted_q = a.sorted, order_q = a.order, sorted_k = b.sorted, order_k = b.order;
  } else {
    std::tie(sorted_q, order_q) = sorted_quantiles_cuda(q, q.size(1));
    std::tie(sorted_k, order_k) = sorted_quantiles_cuda(k, k.size(1));
  }
  return {emd_pair_cuda(sorted_q, sorted_k), sorted_q, order_q, sorted_k, order_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CUDA, m) {
  m.impl("emd_exact", &emd_exact_cuda);
  m.impl("emd_exact_backward", &emd_exact_backward_cuda);
  m.impl("sorted_quantiles", &sorted_quantiles_cuda);
  m.impl("sorted_quantiles_backward", &sorted_quantiles_backward_cuda);
  m.impl("emd_pair", &emd_pair_cuda);
  m.impl("emd_pair_backward", &emd_pair_backward_cuda);
}

}  // namespace rcl_ops
