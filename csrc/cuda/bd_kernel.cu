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

template <typename T>
__global__ void moments_backward_kernel(const T* __restrict__ x, const double* __restrict__ mean,
                                        const double* __restrict__ grad_mean,
                                        const double* __restrict__ grad_var, int64_t total,
                                        int64_t count, T* __restrict__ grad_x) {
  for (int64_t idx = global_thread_index(); idx < total; idx += global_thread_stride()) {
    const int64_t row = idx / count;
    grad_x[idx] =
        T(moments_input_grad(double(x[idx]), mean[row], grad_mean[row], grad_var[row], count));
  }
}

at::Tensor moments_backward_cuda(const at::Tensor& grad_mean_in, const at::Tensor& grad_var_in,
                                 const at::Tensor& x_in, const at::Tensor& mean_in) {
  const char* op = "rcl_ops::moments_backward";
  check_rows(x_in, op, "x");
  const int64_t rows = x_in.size(0), count = x_in.size(1);
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
  const int64_t total = rows * count;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::moments_backward", [&] {
    moments_backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), mean.data_ptr<double>(), grad_mean.data_ptr<double>(),
        grad_var.data_ptr<double>(), total, count, grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

// ---- fused: both batches per launch --------------------------------------------------------

// Elements [0, total_q) are q's, the rest k's: the moments backward of both batches.
template <typename T>
__global__ void two_batch_moments_backward_kernel(
    const T* __restrict__ q, const double* __restrict__ mean_q, const double* __restrict__ g_mean_q,
    const double* __restrict__ g_var_q, int64_t total_q, int64_t count_q, const T* __restrict__ k,
    const double* __restrict__ mean_k, const double* __restrict__ g_mean_k,
    const double* __restrict__ g_var_k, int64_t total_k, int64_t count_k, T* __restrict__ grad_q,
    T* __restrict__ grad_k) {
  for (int64_t idx = global_thread_index(); idx < total_q + total_k;
       idx += global_thread_stride()) {
    if (idx < total_q) {
      const int64_t row = idx / count_q;
      grad_q[idx] =
          T(moments_input_grad(double(q[idx]), mean_q[row], g_mean_q[row], g_var_q[row], count_q));
    } else {
      const int64_t e = idx - total_q, row = e / count_k;
      grad_k[e] =
          T(moments_input_grad(double(k[e]), mean_k[row], g_mean_k[row], g_var_k[row], count_k));
    }
  }
}

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
  // A masked side contributes no elements to the launch.
  const int64_t total_q = output_mask[0] ? q.numel() : 0, total_k = output_mask[1] ? k.numel() : 0;
  if (total_q + total_k == 0) return {grad_q, grad_k};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rcl_ops::bd_backward", [&] {
    two_batch_moments_backward_kernel<scalar_t>
        <<<blocks_for(total_q + total_k), kThreads, 0, stream>>>(
            q.data_ptr<scalar_t>(), mq.data_ptr<double>(), g_mq.data_ptr<double>(),
            g_vq.data_ptr<double>(), total_q, q.size(1), k.data_ptr<scalar_t>(),
            mk.data_ptr<double>(), g_mk.data_ptr<double>(), g_vk.data_ptr<double>(), total_k,
            k.size(1), grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
