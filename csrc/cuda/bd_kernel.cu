// Bhattacharyya distance on CUDA: one block per residual for the shifted one-pass moments,
// elementwise kernels for the (Bq, Bk) pair term and the moment gradient, and one block per
// output value for the pair backward (a reduction over the other batch). The fused op
// (bd, bd_backward) takes both batches in each launch: two launches forward (moments of
// q and k, pair), two backward (pair reduction, input gradients of q and k). At training
// sizes the step is bound by launches and host time, not by bytes.
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

using cudautil::block_sum;
using cudautil::blocks_for;
using cudautil::check_device;
using cudautil::global_thread_index;
using cudautil::global_thread_stride;
using cudautil::kThreads;

// ---- moments ----------------------------------------------------------------------------

constexpr int kMomentThreads = 512;

// Shifted sums S1 = sum (x - c), S2 = sum (x - c)^2 with c = x[row, 0], in double, then
// var = (S2 - S1^2 / M) / (M - 1) as on CPU, stored in double for every T. One block per row
// (grid-stride over rows); rows [0, bq) are q's, rows [bq, bq + bk) k's (bk may be 0).
template <typename T>
__global__ void __launch_bounds__(kMomentThreads)
    two_batch_moments_kernel(const T* __restrict__ q, int64_t bq, int64_t count_q,
                             const T* __restrict__ k, int64_t bk, int64_t count_k,
                             double* __restrict__ mean_q, double* __restrict__ var_q,
                             double* __restrict__ mean_k, double* __restrict__ var_k) {
  for (int64_t task = blockIdx.x; task < bq + bk; task += gridDim.x) {
    const bool is_q = task < bq;
    const int64_t row = is_q ? task : task - bq, count = is_q ? count_q : count_k;
    const T* xr = (is_q ? q : k) + row * count;
    const double shift = double(xr[0]);
    double s1 = 0.0, s2 = 0.0;
    for (int64_t m = threadIdx.x; m < count; m += kMomentThreads) {
      const double d = double(xr[m]) - shift;
      s1 += d;
      s2 += d * d;
    }
    s1 = block_sum<kMomentThreads>(s1);  // task is uniform over the block
    s2 = block_sum<kMomentThreads>(s2);
    if (threadIdx.x == 0) {
      double* mean = is_q ? mean_q : mean_k;
      double* var = is_q ? var_q : var_k;
      mean[row] = shift + s1 / double(count);
      var[row] = count > 1 ? (s2 - s1 * s1 / double(count)) / double(count - 1) : NAN;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> moments_cuda(const at::Tensor& x_in) {
  check_rows(x_in, "rcl_ops::moments", "x");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), count = x.size(1);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kDouble));
  at::Tensor var = at::empty({rows}, x.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(rows, int64_t(1) << 20));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::moments", [&] {
    two_batch_moments_kernel<scalar_t><<<blocks, kMomentThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), rows, count, nullptr, 0, 1, mean.data_ptr<double>(),
        var.data_ptr<double>(), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// ---- moments backward ------------------------------------------------------------------------

// One batch of the moments backward: `rows` rows of `count` values, their float64 means and
// moment gradients, and the input gradient to write.
template <typename T>
struct MomentsGradBatch {
  const T* x;
  const double* mean;
  const double* grad_mean;
  const double* grad_var;
  T* grad_x;
  int64_t rows, count;
};

// kVec values moved by one load or store (16 bytes: float4, double2).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) ValuePack {
  T v[kVec];
};

// Rows [0, q.rows) are q's, the next k.rows k's (k.rows may be 0). blockIdx.y picks the row
// (grid-stride over rows), blockIdx.x strides over the row's packs: no per-element division.
// Each thread forms the row's coefficients from three doubles (math.h, moments_grad_row), then
// writes offset + slope (x - shift) in T's precision. kVec > 1 only where every row of both
// batches starts 16-byte aligned (the launcher checks), so packs never straddle rows.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    moments_backward_kernel(MomentsGradBatch<T> q, MomentsGradBatch<T> k) {
  using Pack = ValuePack<T, kVec>;
  for (int64_t task = blockIdx.y; task < q.rows + k.rows; task += gridDim.y) {
    const bool is_q = task < q.rows;
    const MomentsGradBatch<T> side = is_q ? q : k;
    const int64_t row = is_q ? task : task - q.rows;
    const MomentsGradRow<T> coefficients =
        moments_grad_row<T>(side.mean[row], side.grad_mean[row], side.grad_var[row], side.count);
    const Pack* in = reinterpret_cast<const Pack*>(side.x + row * side.count);
    Pack* out = reinterpret_cast<Pack*>(side.grad_x + row * side.count);
    const int64_t packs = side.count / kVec;
    for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < packs;
         p += int64_t(gridDim.x) * kThreads) {
      const Pack values = in[p];
      Pack grads;
#pragma unroll
      for (int i = 0; i < kVec; ++i) grads.v[i] = moments_input_grad(values.v[i], coefficients);
      out[p] = grads;
    }
  }
}

// Whether a batch's rows can be read and written as packs of `vec` values.
template <typename T>
bool rows_fit_packs(const MomentsGradBatch<T>& batch, int vec) {
  const auto aligned = [&](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * vec) == 0;
  };
  return batch.rows == 0 || (batch.count % vec == 0 && aligned(batch.x) && aligned(batch.grad_x));
}

// One launch for both batches: grid (chunks of the longest row, rows), 16-byte packs where
// rows_fit_packs allows, single values otherwise.
template <typename T>
void launch_moments_backward(const MomentsGradBatch<T>& q, const MomentsGradBatch<T>& k,
                             cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool packed = rows_fit_packs(q, kVec) && rows_fit_packs(k, kVec);
  const int64_t rows = q.rows + k.rows;
  const int64_t longest = std::max(q.rows > 0 ? q.count : 0, k.rows > 0 ? k.count : 0);
  if (rows == 0 || longest == 0) return;
  const int64_t packs = longest / (packed ? kVec : 1);
  const int64_t grid_y = std::min<int64_t>(rows, 65535);
  const int64_t grid_x = std::min<int64_t>((packs + kThreads - 1) / kThreads,
                                           std::max<int64_t>(1, (int64_t(1) << 20) / grid_y));
  const dim3 grid(static_cast<unsigned int>(grid_x), static_cast<unsigned int>(grid_y));
  if (packed) {
    moments_backward_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(q, k);
  } else {
    moments_backward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(q, k);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A (B, M) input, its float64 moment tensors and its gradient as a batch of the launch (all
// contiguous); an excluded batch has no rows.
template <typename T>
MomentsGradBatch<T> batch_of(const at::Tensor& x, const at::Tensor& mean,
                             const at::Tensor& grad_mean, const at::Tensor& grad_var,
                             at::Tensor& grad_x, bool included) {
  return {x.data_ptr<T>(),
          mean.data_ptr<double>(),
          grad_mean.data_ptr<double>(),
          grad_var.data_ptr<double>(),
          grad_x.data_ptr<T>(),
          included ? x.size(0) : 0,
          x.size(1)};
}

at::Tensor moments_backward_cuda(const at::Tensor& grad_mean_in, const at::Tensor& grad_var_in,
                                 const at::Tensor& x_in, const at::Tensor& mean_in) {
  const char* op = "rcl_ops::moments_backward";
  check_rows(x_in, op, "x");
  const int64_t rows = x_in.size(0);
  check_vector(grad_mean_in, rows, op, "grad_mean");
  check_vector(grad_var_in, rows, op, "grad_var");
  check_vector(mean_in, rows, op, "mean");
  check_device(grad_mean_in, x_in, op, "grad_mean", "x");
  check_device(grad_var_in, x_in, op, "grad_var", "x");
  check_device(mean_in, x_in, op, "mean", "x");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_mean = grad_mean_in.to(at::kDouble).contiguous();
  const at::Tensor grad_var = grad_var_in.to(at::kDouble).contiguous();
  const at::Tensor mean = mean_in.to(at::kDouble).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::moments_backward", [&] {
    launch_moments_backward(
        batch_of<scalar_t>(x, mean, grad_mean, grad_var, grad_x, true),
        MomentsGradBatch<scalar_t>{nullptr, nullptr, nullptr, nullptr, nullptr, 0, 1}, stream);
  });
  return grad_x;
}

// ---- fused: both batches per launch --------------------------------------------------------

at::Tensor bd_pair_cuda_as(const at::Tensor& mean_q, const at::Tensor& var_q,
                           const at::Tensor& mean_k, const at::Tensor& var_k, double eps,
                           at::ScalarType out_type);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, double eps) {
  check_bd_inputs(q_in, k_in, "rcl_ops::bd");
  c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const int64_t bq = q.size(0), bk = k.size(0);
  const auto moment_options = q.options().dtype(at::kDouble);
  at::Tensor mean_q = at::empty({bq}, moment_options), var_q = at::empty({bq}, moment_options);
  at::Tensor mean_k = at::empty({bk}, moment_options), var_k = at::empty({bk}, moment_options);
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(bq + bk, 1 << 20));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rcl_ops::bd", [&] {
    two_batch_moments_kernel<scalar_t><<<blocks, kMomentThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), bq, q.size(1), k.data_ptr<scalar_t>(), bk, k.size(1),
        mean_q.data_ptr<double>(), var_q.data_ptr<double>(), mean_k.data_ptr<double>(),
        var_k.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {bd_pair_cuda_as(mean_q, var_q, mean_k, var_k, eps, q.scalar_type()), mean_q, var_q,
          mean_k, var_k};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bd_pair_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& mean_q, const at::Tensor& var_q,
    const at::Tensor& mean_k, const at::Tensor& var_k, double eps, OutputMask output_mask);

std::tuple<at::Tensor, at::Tensor> bd_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& mean_q, const at::Tensor& var_q, const at::Tensor& mean_k,
    const at::Tensor& var_k, double eps, OutputMask output_mask) {
  const char* op = "rcl_ops::bd_backward";
  check_bd_saved(q_in, k_in, mean_q, var_q, mean_k, var_k, op);
  c10::cuda::CUDAGuard device_guard(q_in.device());
  // The pair backward checks grad and the moments (shapes, dtype, device).
  auto [g_mq, g_vq, g_mk, g_vk] =
      bd_pair_backward_cuda(grad, mean_q, var_q, mean_k, var_k, eps, output_mask);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const at::Tensor mq = mean_q.contiguous(), mk = mean_k.contiguous();
  at::Tensor grad_q = output_mask[0] ? at::empty_like(q) : skipped_gradient(q);
  at::Tensor grad_k = output_mask[1] ? at::empty_like(k) : skipped_gradient(k);
  // A masked side contributes no rows to the launch.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rcl_ops::bd_backward", [&] {
    launch_moments_backward(batch_of<scalar_t>(q, mq, g_mq, g_vq, grad_q, output_mask[0]),
                            batch_of<scalar_t>(k, mk, g_mk, g_vk, grad_k, output_mask[1]), stream);
  });
  return {grad_q, grad_k};
}

// ---- pair -------------------------------------------------------------------------------

// Computed in double from the double moments, stored in the output's type.
template <typename Out>
__global__ void bd_pair_kernel(const double* __restrict__ mq, const double* __restrict__ vq,
                               const double* __restrict__ mk, const double* __restrict__ vk,
                               double eps, int64_t bk, int64_t total, Out* __restrict__ out) {
  for (int64_t idx = global_thread_index(); idx < total; idx += global_thread_stride()) {
    const int64_t i = idx / bk, j = idx - i * bk;
    out[idx] = Out(bd_value<double>(mq[i], vq[i], mk[j], vk[j], eps));
  }
}

at::Tensor bd_pair_cuda_as(const at::Tensor& mean_q, const at::Tensor& var_q,
                           const at::Tensor& mean_k, const at::Tensor& var_k, double eps,
                           at::ScalarType out_type) {
  const char* op = "rcl_ops::bd_pair";
  check_bd_moments(mean_q, var_q, mean_k, var_k, op);
  c10::cuda::CUDAGuard device_guard(mean_q.device());
  const int64_t bq = mean_q.size(0), bk = mean_k.size(0), total = bq * bk;
  at::Tensor out = at::empty({bq, bk}, mean_q.options().dtype(out_type));
  if (total == 0) return out;
  const at::Tensor mq = mean_q.contiguous(), vq = var_q.contiguous();
  const at::Tensor mk = mean_k.contiguous(), vk = var_k.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out_type, "rcl_ops::bd_pair", [&] {
    bd_pair_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        mq.data_ptr<double>(), vq.data_ptr<double>(), mk.data_ptr<double>(), vk.data_ptr<double>(),
        eps, bk, total, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor bd_pair_cuda(const at::Tensor& mean_q, const at::Tensor& var_q, const at::Tensor& mean_k,
                        const at::Tensor& var_k, double eps) {
  return bd_pair_cuda_as(mean_q, var_q, mean_k, var_k, eps, at::kDouble);
}

// Tasks [0, Bq) reduce row i of grad over j (the q side); tasks [Bq, Bq + Bk) reduce column
// j over i (the k side); a launch covers tasks [task_begin, task_end) (a masked side is left
// out). No two blocks write the same output; double accumulation.
template <typename G>
__global__ void __launch_bounds__(kThreads)
    bd_pair_backward_kernel(const G* __restrict__ grad, const double* __restrict__ mq,
                            const double* __restrict__ vq, const double* __restrict__ mk,
                            const double* __restrict__ vk, double eps, int64_t bq, int64_t bk,
                            int64_t task_begin, int64_t task_end, double* __restrict__ g_mq,
                            double* __restrict__ g_vq, double* __restrict__ g_mk,
                            double* __restrict__ g_vk) {
  for (int64_t task = task_begin + blockIdx.x; task < task_end; task += gridDim.x) {
    double d_mean = 0.0, d_var = 0.0;
    if (task < bq) {
      const int64_t i = task;
      for (int64_t j = threadIdx.x; j < bk; j += kThreads) {
        const auto d = bd_grad<double>(mq[i], vq[i], mk[j], vk[j], eps);
        const double g = double(grad[i * bk + j]);
        d_mean += g * d.d_mean_q;
        d_var += g * d.d_var_q;
      }
    } else {
      const int64_t j = task - bq;
      for (int64_t i = threadIdx.x; i < bq; i += kThreads) {
        const auto d = bd_grad<double>(mq[i], vq[i], mk[j], vk[j], eps);
        const double g = double(grad[i * bk + j]);
        d_mean -= g * d.d_mean_q;
        d_var += g * d.d_var_k;
      }
    }
    d_mean = block_sum<kThreads>(d_mean);  // task is uniform over the block
    d_var = block_sum<kThreads>(d_var);
    if (threadIdx.x == 0) {
      if (task < bq) {
        g_mq[task] = d_mean;
        g_vq[task] = d_var;
      } else {
        g_mk[task - bq] = d_mean;
        g_vk[task - bq] = d_var;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bd_pair_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& mean_q, const at::Tensor& var_q,
    const at::Tensor& mean_k, const at::Tensor& var_k, double eps, OutputMask output_mask) {
  const char* op = "rcl_ops::bd_pair_backward";
  check_bd_moments(mean_q, var_q, mean_k, var_k, op);
  const int64_t bq = mean_q.size(0), bk = mean_k.size(0);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == bq && grad_in.size(1) == bk, op,
              ": grad must have shape (", bq, ", ", bk, "), got ", grad_in.sizes());
  check_device(grad_in, mean_q, op, "grad", "mean_q");
  c10::cuda::CUDAGuard device_guard(mean_q.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor mq = mean_q.contiguous(), vq = var_q.contiguous();
  const at::Tensor mk = mean_k.contiguous(), vk = var_k.contiguous();
  at::Tensor g_mq = output_mask[0] ? at::empty_like(mq) : skipped_gradient(mq);
  at::Tensor g_vq = output_mask[0] ? at::empty_like(vq) : skipped_gradient(vq);
  at::Tensor g_mk = output_mask[1] ? at::empty_like(mk) : skipped_gradient(mk);
  at::Tensor g_vk = output_mask[1] ? at::empty_like(vk) : skipped_gradient(vk);
  const int64_t task_begin = output_mask[0] ? 0 : bq, task_end = output_mask[1] ? bq + bk : bq;
  const int64_t tasks = task_end - task_begin;
  if (tasks <= 0) return {g_mq, g_vq, g_mk, g_vk};
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(tasks, int64_t(1) << 20));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "rcl_ops::bd_pair_backward", [&] {
    bd_pair_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), mq.data_ptr<double>(), vq.data_ptr<double>(),
        mk.data_ptr<double>(), vk.data_ptr<double>(), eps, bq, bk, task_begin, task_end,
        g_mq.data_ptr<double>(), g_vq.data_ptr<double>(), g_mk.data_ptr<double>(),
        g_vk.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_mq, g_vq, g_mk, g_vk};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CUDA, m) {
  m.impl("moments", &moments_cuda);
  m.impl("moments_backward", &moments_backward_cuda);
  m.impl("bd_pair", &bd_pair_cuda);
  m.impl("bd_pair_backward", &bd_pair_backward_cuda);
  m.impl("bd", &bd_cuda);
  m.impl("bd_backward", &bd_backward_cuda);
}

}  // namespace rcl_ops
