// Gaussian-kernel MMD on CUDA: the per-value kernels of the binned-grid method (linear
// binning in fixed point by integer atomics, so bit-reproducible; linear interpolation of a
// field; the rest is the shared ATen composite of mmd_grid.cpp) and the exact direct sums.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../mmd_direct.h"
#include "../mmd_grid.h"
#include "common.cuh"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

using cudautil::block_sum;
using cudautil::blocks_for;
using cudautil::check_device;
using cudautil::global_thread_index;
using cudautil::global_thread_stride;
using cudautil::kThreads;

// ---- grid kernels -----------------------------------------------------------------------

// lo and step are read on the device (0-dim float64 tensors): no host synchronisation.
void check_grid_scalars(const at::Tensor& x, const at::Tensor& lo, const at::Tensor& step,
                        const char* op) {
  TORCH_CHECK(lo.numel() == 1 && step.numel() == 1 && lo.scalar_type() == at::kDouble &&
                  step.scalar_type() == at::kDouble,
              op, ": lo and step must be one-element float64 tensors");
  check_device(lo, x, op, "lo", "x");
  check_device(step, x, op, "step", "x");
}

// ---- fixed-point binning (math.h's fixed_point_split) ----
// Each value adds 2^S integer units to its two grid points by integer atomics: integer addition
// is associative, so the sums, and the weights units / (M 2^S), are the same bit for bit
// whatever the order of the additions. The units live in the weights' own buffer (8 bytes
// each; zero bits are zero units) and are converted there in place.
using units_t = unsigned long long;  // atomicAdd's 64-bit integer; every sum is < 2^63

// Up to kSharedBins bins (32 KiB of units) a block bins a chunk of one row into a shared
// histogram first: two shared atomics per value, one global atomic per occupied bin per block.
constexpr int64_t kSharedBins = 4096;

__device__ __forceinline__ void add_value_units(units_t* units, double x, double lo,
                                                double inv_step, int64_t num_bins, int bits) {
  const GridPosition p = grid_position(x, lo, inv_step, num_bins);
  const FixedPointSplit split = fixed_point_split(p.upper_weight, bits);
  atomicAdd(units + p.lower, units_t(split.lower));
  atomicAdd(units + p.lower + 1, units_t(split.upper));
}

__device__ __forceinline__ units_t weight_bits(units_t units, int64_t count, int bits) {
  return units_t(__double_as_longlong(fixed_point_weight(int64_t(units), count, bits)));
}

// One thread per value, global atomics into the (B, G) units (zeroed).
template <typename T>
__global__ void grid_bin_global_kernel(const T* __restrict__ x, const double* __restrict__ lo,
                                       const double* __restrict__ step, int64_t count,
                                       int64_t num_bins, int64_t total, int bits,
                                       units_t* __restrict__ units) {
  const double lo_v = *lo, inv_step = 1.0 / *step;
  for (int64_t idx = global_thread_index(); idx < total; idx += global_thread_stride()) {
    const int64_t row = idx / count;
    add_value_units(units + row * num_bins, double(x[idx]), lo_v, inv_step, num_bins, bits);
  }
}

// Block task b: chunk b % chunks (chunk_values values) of row b / chunks, binned in shared
// memory (num_bins <= kSharedBins units, dynamic). A row of one chunk is complete in its block,
// which writes the weights' bits; otherwise the block adds its units to out (zeroed).
template <typename T>
__global__ void grid_bin_shared_kernel(const T* __restrict__ x, const double* __restrict__ lo,
                                       const double* __restrict__ step, int64_t count,
                                       int64_t num_bins, int64_t rows, int64_t chunks,
                                       int64_t chunk_values, int bits, units_t* __restrict__ out) {
  extern __shared__ units_t histogram[];
  const double lo_v = *lo, inv_step = 1.0 / *step;
  for (int64_t task = blockIdx.x; task < rows * chunks; task += gridDim.x) {
    const int64_t row = task / chunks, begin = (task % chunks) * chunk_values;
    const int64_t end = begin + chunk_values < count ? begin + chunk_values : count;
    for (int64_t g = threadIdx.x; g < num_bins; g += blockDim.x) histogram[g] = 0;
    __syncthreads();
    for (int64_t m = begin + threadIdx.x; m < end; m += blockDim.x) {
      add_value_units(histogram, double(x[row * count + m]), lo_v, inv_step, num_bins, bits);
    }
    __syncthreads();
    units_t* out_row = out + row * num_bins;
    for (int64_t g = threadIdx.x; g < num_bins; g += blockDim.x) {
      if (chunks == 1) {
        out_row[g] = weight_bits(histogram[g], count, bits);
      } else if (histogram[g] != 0) {
        atomicAdd(out_row + g, histogram[g]);
      }
    }
    __syncthreads();  // the histogram is read before the next task clears it
  }
}

// In place: units -> the bits of the float64 weights units / (M 2^S).
__global__ void units_to_weights_kernel(units_t* __restrict__ buffer, int64_t total, int64_t count,
                                        int bits) {
  for (int64_t idx = global_thread_index(); idx < total; idx += global_thread_stride()) {
    buffer[idx] = weight_bits(buffer[idx], count, bits);
  }
}

// Values per block task of the shared path: at least 8 per thread, and at least twice the bins
// so that clearing and flushing the histogram costs at most about as much as the values.
int64_t chunk_values_for(int64_t num_bins) { return std::max<int64_t>(8 * kThreads, 2 * num_bins); }

at::Tensor grid_bin_cuda(const at::Tensor& x_in, const at::Tensor& lo, const at::Tensor& step,
                         int64_t num_bins) {
  const char* op = "rcl_ops::grid_bin";
  check_grid_scalars(x_in, lo, step, op);
  TORCH_CHECK(num_bins >= 2, op, ": num_bins must be at least 2, got ", num_bins);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), count = x.size(1), total = rows * count;
  const int bits = fixed_point_bits(count);
  const bool shared = num_bins <= kSharedBins;
  const int64_t chunk_values = chunk_values_for(num_bins);
  const int64_t chunks = (count + chunk_values - 1) / chunk_values;
  const bool complete_rows = shared && chunks == 1;  // the binning kernel writes the weights
  const auto options = x.options().dtype(at::kDouble);
  at::Tensor weights =
      complete_rows ? at::empty({rows, num_bins}, options) : at::zeros({rows, num_bins}, options);
  if (total == 0) return weights;
  units_t* units = reinterpret_cast<units_t*>(weights.data_ptr<double>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::grid_bin", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const double *lo_p = lo.data_ptr<double>(), *step_p = step.data_ptr<double>();
    if (shared) {
      const size_t shared_bytes = size_t(num_bins) * sizeof(units_t);
      grid_bin_shared_kernel<scalar_t>
          <<<blocks_for(rows * chunks, 1), kThreads, shared_bytes, stream>>>(
              xp, lo_p, step_p, count, num_bins, rows, chunks, chunk_values, bits, units);
    } else {
      grid_bin_global_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          xp, lo_p, step_p, count, num_bins, total, bits, units);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!complete_rows) {
    units_to_weights_kernel<<<blocks_for(rows * num_bins), kThreads, 0, stream>>>(
        units, rows * num_bins, count, bits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return weights;
}

template <typename T>
__global__ void grid_interpolate_kernel(const double* __restrict__ field, const T* __restrict__ x,
                                        const double* __restrict__ lo,
                                        const double* __restrict__ step, int64_t count,
                                        int64_t num_bins, int64_t total, T* __restrict__ out) {
  const double lo_v = *lo, inv_step = 1.0 / *step;
  for (int64_t idx = global_thread_index(); idx < total; idx += global_thread_stride()) {
    const int64_t row = idx / count;
    const GridPosition p = grid_position(double(x[idx]), lo_v, inv_step, num_bins);
    const double* f = field + row * num_bins + p.lower;
    out[idx] = T(f[0] * (1.0 - p.upper_weight) + f[1] * p.upper_weight);
  }
}

at::Tensor grid_interpolate_cuda(const at::Tensor& field_in, const at::Tensor& x_in,
                                 const at::Tensor& lo, const at::Tensor& step) {
  const char* op = "rcl_ops::grid_interpolate";
  check_grid_scalars(x_in, lo, step, op);
  check_device(field_in, x_in, op, "field", "x");
  TORCH_CHECK(field_in.dim() == 2 && field_in.size(0) == x_in.size(0) && field_in.size(1) >= 2 &&
                  field_in.scalar_type() == at::kDouble,
              op, ": field must be float64 of shape (", x_in.size(0), ", G >= 2), got ",
              field_in.scalar_type(), " ", field_in.sizes());
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), field = field_in.contiguous();
  const int64_t rows = x.size(0), count = x.size(1), num_bins = field.size(1);
  const int64_t total = rows * count;
  at::Tensor out = at::empty_like(x);
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::grid_interpolate", [&] {
    grid_interpolate_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        field.data_ptr<double>(), x.data_ptr<scalar_t>(), lo.data_ptr<double>(),
        step.data_ptr<double>(), count, num_bins, total, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// [lo, step] from the minima and maxima of q and k (aminmax: one launch each) and the
// bandwidths, in one thread: the ATen form of grid_aten takes ~15 launches, which at
// training sizes cost more host time than the whole grid's GPU time.
template <typename T>
__global__ void grid_from_extrema_kernel(const T* __restrict__ min_q, const T* __restrict__ max_q,
                                         const T* __restrict__ min_k, const T* __restrict__ max_k,
                                         const T* __restrict__ bandwidths, int64_t num_h,
                                         int64_t num_bins, double* __restrict__ grid) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const double lo = fmin(double(*min_q), double(*min_k));
  const double hi = fmax(double(*max_q), double(*max_k));
  double min_h = double(bandwidths[0]);
  for (int64_t h = 1; h < num_h; ++h) min_h = fmin(min_h, double(bandwidths[h]));
  grid[0] = lo;
  grid[1] = fmax(hi - lo, 1e-3 * min_h) / double(num_bins - 1);
}

at::Tensor grid_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths_in,
                     int64_t num_bins) {
  c10::cuda::CUDAGuard device_guard(q.device());
  auto [min_q, max_q] = at::aminmax(q);
  auto [min_k, max_k] = at::aminmax(k);
  const at::Tensor bandwidths = bandwidths_in.to(q.scalar_type()).contiguous();
  at::Tensor grid = at::empty({2}, q.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rcl_ops::mmd_grid", [&] {
    grid_from_extrema_kernel<scalar_t><<<1, 1, 0, stream>>>(
        min_q.data_ptr<scalar_t>(), max_q.data_ptr<scalar_t>(), min_k.data_ptr<scalar_t>(),
        max_k.data_ptr<scalar_t>(), bandwidths.data_ptr<scalar_t>(), bandwidths.numel(), num_bins,
        grid.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grid;
}

// The fft_size kernel samples at d = n * step, n taken circularly in [-L/2, L/2), summed over
// the bandwidths (or the derivative in d); then one rfft. spectrum_aten's ~14 launches in 2.
__global__ void kernel_samples_kernel(const double* __restrict__ grid,
                                      const double* __restrict__ bandwidths, int64_t num_h,
                                      int64_t fft_size, bool derivative,
                                      double* __restrict__ samples) {
  const double step = grid[1];
  for (int64_t n = global_thread_index(); n < fft_size; n += global_thread_stride()) {
    const double d = double(n < fft_size / 2 ? n : n - fft_size) * step;
    double value = 0.0;
    for (int64_t h = 0; h < num_h; ++h) {
      const double inv_two_h2 = 0.5 / (bandwidths[h] * bandwidths[h]);
      const double e = exp(-d * d * inv_two_h2);
      value += derivative ? e * (-2.0 * d * inv_two_h2) : e;
    }
    samples[n] = value;
  }
}

at::Tensor spectrum_cuda(const at::Tensor& grid, const at::Tensor& bandwidths_in, int64_t fft_size,
                         bool derivative) {
  c10::cuda::CUDAGuard device_guard(grid.device());
  const at::Tensor bandwidths = bandwidths_in.to(at::kDouble).contiguous();
  at::Tensor samples = at::empty({fft_size}, grid.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernel_samples_kernel<<<blocks_for(fft_size), kThreads, 0, stream>>>(
      grid.data_ptr<double>(), bandwidths.data_ptr<double>(), bandwidths.numel(), fft_size,
      derivative, samples.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return at::fft_rfft(samples, fft_size);
}

constexpr GridKernels kCudaGridKernels{&grid_bin_cuda, &grid_interpolate_cuda, &grid_cuda,
                                       &spectrum_cuda};

MmdGridOutputs mmd_grid_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths,
                             int64_t num_bins, bool unbiased) {
  return mmd_grid_forward(kCudaGridKernels, q, k, bandwidths, num_bins, unbiased);
}

std::tuple<at::Tensor, at::Tensor> mmd_grid_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths,
    const at::Tensor& grid, const at::Tensor& w_q, const at::Tensor& w_k, int64_t num_bins,
    bool unbiased, OutputMask output_mask) {
  return mmd_grid_backward(kCudaGridKernels, grad, q, k, bandwidths, grid, w_q, w_k, num_bins,
                           unbiased, output_mask);
}

// ---- exact direct sums ------------------------------------------------------------------

struct KernelSumArgs {
  at::Tensor x, y;
  at::Tensor inv_two_h2;  // (H,) float64 on the device of x
  int64_t rows_x, rows_y, count_x, count_y;
};

KernelSumArgs kernel_sum_args(const at::Tensor& x, const at::Tensor& y,
                              const at::Tensor& bandwidths, bool paired, const char* op) {
  check_kernel_sum_args(x, y, bandwidths, paired, op);
  // Bandwidths may live on any device, so CUDA bandwidths can route CPU x and y here.
  TORCH_CHECK(x.is_cuda(), op, ": x and y are on ", x.device(),
              "; this is the CUDA kernel (picked for the bandwidths on ", bandwidths.device(),
              "): put x, y and the bandwidths on one device");
  // Unlike the CPU kernel, positivity of the bandwidths is not checked here: that would
  // need a host synchronisation. The Python layer (rcl_ops.ops) validates them, and the
  // default bandwidth is positive by construction. 1 / (2 h^2) is computed on the device
  // in float64, rounded once as on CPU (0.5 / (h * h); 2 h^2 is exact, and scalar / tensor
  // would round twice: reciprocal, then product). Bandwidths may come from any device.
  const at::Tensor inv_two_h2 =
      (bandwidths.to(x.device(), at::kDouble).square() * 2.0).reciprocal().contiguous();
  return {x.contiguous(), y.contiguous(), inv_two_h2, x.size(0), y.size(0), x.size(1), y.size(1)};
}

// Blocks (p, z) for the output pairs p (grid-stride over x): i = p, j = p if paired, else
// (p / Bk, p % Bk). The longer of the two rows is split over the threads of the z splits
// (several blocks per pair when there are few pairs); each thread loops over all of the
// other row (read in step across the warp, so served by broadcast), the block sums in
// double, and the splits' partial sums are added in a fixed order. The differences are
// x - y whichever row is outer, as on CPU.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kernel_sums_kernel(const T* __restrict__ x, const T* __restrict__ y,
                       const double* __restrict__ inv_two_h2, int64_t num_h, int64_t rows_y,
                       int64_t count_x, int64_t count_y, bool paired, int64_t pairs,
                       double* __restrict__ out, double* __restrict__ partial) {
  const bool outer_is_x = count_x >= count_y;
  const int64_t count_outer = outer_is_x ? count_x : count_y;
  const int64_t count_inner = outer_is_x ? count_y : count_x;
  const int64_t first = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(gridDim.y) * kThreads;
  for (int64_t p = blockIdx.x; p < pairs; p += gridDim.x) {
    const int64_t i = paired ? p : p / rows_y, j = paired ? p : p - (p / rows_y) * rows_y;
    const T* xr = x + i * count_x;
    const T* yr = y + j * count_y;
    const T* outer = outer_is_x ? xr : yr;
    const T* inner = outer_is_x ? yr : xr;
    double total = 0.0;
    for (int64_t s = first; s < count_outer; s += stride) {
      const double v = double(outer[s]);
      double row = 0.0;  // one sum per outer value, as on CPU: error ~ M + N, not M N
      for (int64_t t = 0; t < count_inner; ++t) {
        const double diff = outer_is_x ? v - double(inner[t]) : double(inner[t]) - v;
        row += gaussian_kernel(diff, inv_two_h2, num_h);
      }
      total += row;
    }
    total = block_sum<kThreads>(total);  // p is uniform over the block
    if (threadIdx.x == 0) {
      if (partial != nullptr) {
        partial[int64_t(blockIdx.y) * pairs + p] = total;
      } else {
        out[p] = total;
      }
    }
  }
}

__global__ void kernel_sums_reduce_kernel(const double* __restrict__ partial, int64_t splits,
                                          int64_t pairs, double* __restrict__ out) {
  for (int64_t idx = global_thread_index(); idx < pairs; idx += global_thread_stride()) {
    double total = 0.0;
    for (int64_t s = 0; s < splits; ++s) total += partial[s * pairs + idx];
    out[idx] = total;
  }
}

at::Tensor gaussian_kernel_sums_cuda(const at::Tensor& x_in, const at::Tensor& y_in,
                                     const at::Tensor& bandwidths, bool paired) {
  const char* op = "rcl_ops::gaussian_kernel_sums";
  const KernelSumArgs a = kernel_sum_args(x_in, y_in, bandwidths, paired, op);
  c10::cuda::CUDAGuard device_guard(a.x.device());
  const int64_t pairs = paired ? a.rows_x : a.rows_x * a.rows_y;
  // float64 sums: the V/U statistic combines them with cancellation (see gaussian_kernel_sums).
  const auto out_options = a.x.options().dtype(at::kDouble);
  at::Tensor out =
      paired ? at::empty({a.rows_x}, out_options) : at::empty({a.rows_x, a.rows_y}, out_options);
  // Split each pair over several blocks when there are fewer pairs than about two blocks
  // per multiprocessor, as far as the longer row has values for the threads.
  const int64_t count_outer = std::max(a.count_x, a.count_y);
  const int64_t target_blocks = 2 * int64_t(cudautil::multiprocessor_count(a.x.get_device()));
  const int64_t splits = std::max<int64_t>(
      1, std::min(target_blocks / pairs, (count_outer + kThreads - 1) / kThreads));
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, pairs}, a.x.options().dtype(at::kDouble));
  const dim3 grid(static_cast<unsigned int>(std::min<int64_t>(pairs, int64_t(1) << 20)),
                  static_cast<unsigned int>(splits));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "rcl_ops::gaussian_kernel_sums", [&] {
    double* partial_ptr = splits > 1 ? partial.data_ptr<double>() : nullptr;
    kernel_sums_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        a.x.data_ptr<scalar_t>(), a.y.data_ptr<scalar_t>(), a.inv_two_h2.data_ptr<double>(),
        a.inv_two_h2.numel(), a.rows_y, a.count_x, a.count_y, paired, pairs, out.data_ptr<double>(),
        partial_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      kernel_sums_reduce_kernel<<<blocks_for(pairs), kThreads, 0, stream>>>(
          partial_ptr, splits, pairs, out.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// One thread per value of one side (self): the derivative of every kernel sum it enters,
// weighted by grad. With kSelfIsX the value is x[i, s] and the sum runs over j (all rows of
// y, or j = i if paired) and t; otherwise it is y[j, t], over i and s, with the sign
// flipped. The differences are always x - y and the loops nest as on CPU.
template <typename T, bool kSelfIsX>
__global__ void kernel_sums_grad_kernel(const T* __restrict__ self, const T* __restrict__ other,
                                        const double* __restrict__ grad,
                                        const double* __restrict__ inv_two_h2, int64_t num_h,
                                        int64_t rows_self, int64_t count_self, int64_t rows_other,
                                        int64_t count_other, int64_t rows_y, bool paired,
                                        T* __restrict__ out) {
  const int64_t total = rows_self * count_self;
  for (int64_t idx = global_thread_index(); idx < total; idx += global_thread_stride()) {
    const int64_t row = idx / count_self;
    const double v = double(self[idx]);
    const int64_t o_begin = paired ? row : 0, o_end = paired ? row + 1 : rows_other;
    double total_grad = 0.0;
    for (int64_t o = o_begin; o < o_end; ++o) {
      const double g =
          paired ? grad[row] : (kSelfIsX ? grad[row * rows_y + o] : grad[o * rows_y + row]);
      const T* other_row = other + o * count_other;
      double inner = 0.0;
      for (int64_t t = 0; t < count_other; ++t) {
        const double diff = kSelfIsX ? v - double(other_row[t]) : double(other_row[t]) - v;
        inner += gaussian_kernel_derivative(diff, inv_two_h2, num_h);
      }
      if (kSelfIsX) {
        total_grad += g * inner;
      } else {
        total_grad -= g * inner;
      }
    }
    out[idx] = T(total_grad);
  }
}

std::tuple<at::Tensor, at::Tensor> gaussian_kernel_sums_backward_cuda(
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
  check_device(grad_in, x_in, op, "grad", "x");
  c10::cuda::CUDAGuard device_guard(a.x.device());
  const at::Tensor grad = grad_in.to(at::kDouble).contiguous();
  at::Tensor grad_x = output_mask[0] ? at::empty_like(a.x) : skipped_gradient(a.x);
  at::Tensor grad_y = output_mask[1] ? at::empty_like(a.y) : skipped_gradient(a.y);
  const double* gp = grad.data_ptr<double>();
  const double* ih = a.inv_two_h2.data_ptr<double>();
  const int64_t num_h = a.inv_two_h2.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "rcl_ops::gaussian_kernel_sums_backward", [&] {
    const scalar_t *xp = a.x.data_ptr<scalar_t>(), *yp = a.y.data_ptr<scalar_t>();
    if (output_mask[0]) {
      kernel_sums_grad_kernel<scalar_t, true>
          <<<blocks_for(a.rows_x * a.count_x), kThreads, 0, stream>>>(
              xp, yp, gp, ih, num_h, a.rows_x, a.count_x, a.rows_y, a.count_y, a.rows_y, paired,
              grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (output_mask[1]) {
      kernel_sums_grad_kernel<scalar_t, false>
          <<<blocks_for(a.rows_y * a.count_y), kThreads, 0, stream>>>(
              yp, xp, gp, ih, num_h, a.rows_y, a.count_y, a.rows_x, a.count_x, a.rows_y, paired,
              grad_y.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CUDA, m) {
  m.impl("mmd_grid", &mmd_grid_cuda);
  m.impl("mmd_grid_backward", &mmd_grid_backward_cuda);
  m.impl("gaussian_kernel_sums", &gaussian_kernel_sums_cuda);
  m.impl("gaussian_kernel_sums_backward", &gaussian_kernel_sums_backward_cuda);
  // The exact MMD as one node over the kernels above (csrc/mmd_direct.cpp).
  m.impl("mmd_direct", &mmd_direct_composite);
  m.impl("mmd_direct_backward", &mmd_direct_backward_composite);
}

}  // namespace rcl_ops
