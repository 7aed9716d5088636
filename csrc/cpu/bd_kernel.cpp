// Bhattacharyya distance on CPU: a one-pass shifted moment reduction per residual, then the
// closed-form (Bq, Bk) pair term of Eq. 6.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "cpu_utils.h"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

constexpr int kLanes = 8;

// Shifted sums S1 = sum (x - c), S2 = sum (x - c)^2 with c = x[0], accumulated in double
// lanes: var = (S2 - S1^2 / M) / (M - 1) does not cancel when |mean| >> std. The moments are
// stored in double whatever T is: the variance of float32 values near 1e20 is 1e40, beyond
// float32's range, while the distance built from it is finite.
template <typename T>
RCL_INLINE void row_moments(const T* x, int64_t count, double* mean, double* var) {
  const double shift = double(x[0]);
  double s1[kLanes] = {}, s2[kLanes] = {};
  int64_t m = 0;
  for (; m + kLanes <= count; m += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double d = double(x[m + l]) - shift;
      s1[l] += d;
      s2[l] += d * d;
    }
  }
  double sum1 = 0.0, sum2 = 0.0;
  for (; m < count; ++m) {
    const double d = double(x[m]) - shift;
    sum1 += d;
    sum2 += d * d;
  }
  for (int l = 0; l < kLanes; ++l) {
    sum1 += s1[l];
    sum2 += s2[l];
  }
  *mean = shift + sum1 / double(count);
  *var = count > 1 ? (sum2 - sum1 * sum1 / double(count)) / double(count - 1) : NAN;
}

RCL_MULTIVERSION void row_moments_f32(const float* x, int64_t count, double* mean, double* var) {
  row_moments(x, count, mean, var);
}

RCL_MULTIVERSION void row_moments_f64(const double* x, int64_t count, double* mean, double* var) {
  row_moments(x, count, mean, var);
}

inline void row_moments_any(const float* x, int64_t count, double* mean, double* var) {
  row_moments_f32(x, count, mean, var);
}

inline void row_moments_any(const double* x, int64_t count, double* mean, double* var) {
  row_moments_f64(x, count, mean, var);
}

// The row's coefficients once (math.h), then offset + slope (x - shift) in T's own precision:
// a loop the compiler vectorises.
template <typename T>
RCL_INLINE void row_moments_backward(const T* x, int64_t count, double mean, double grad_mean,
                                     double grad_var, T* grad_x) {
  const MomentsGradRow<T> row = moments_grad_row<T>(mean, grad_mean, grad_var, count);
  for (int64_t m = 0; m < count; ++m) grad_x[m] = moments_input_grad(x[m], row);
}

RCL_MULTIVERSION void row_moments_backward_f32(const float* x, int64_t count, double mean,
                                               double grad_mean, double grad_var, float* grad_x) {
  row_moments_backward(x, count, mean, grad_mean, grad_var, grad_x);
}

RCL_MULTIVERSION void row_moments_backward_f64(const double* x, int64_t count, double mean,
                                               double grad_mean, double grad_var, double* grad_x) {
  row_moments_backward(x, count, mean, grad_mean, grad_var, grad_x);
}

inline void row_moments_backward_any(const float* x, int64_t count, double mean, double grad_mean,
                                     double grad_var, float* grad_x) {
  row_moments_backward_f32(x, count, mean, grad_mean, grad_var, grad_x);
}

inline void row_moments_backward_any(const double* x, int64_t count, double mean, double grad_mean,
                                     double grad_var, double* grad_x) {
  row_moments_backward_f64(x, count, mean, grad_mean, grad_var, grad_x);
}

std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& x_in) {
  check_rows(x_in, "rcl_ops::moments", "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), count = x.size(1);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kDouble));
  at::Tensor var = at::empty({rows}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::moments", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    double* mp = mean.data_ptr<double>();
    double* vp = var.data_ptr<double>();
    at::parallel_for(0, rows, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) row_moments_any(xp + i * count, count, mp + i, vp + i);
    });
  });
  return {mean, var};
}

at::Tensor moments_backward_cpu(const at::Tensor& grad_mean_in, const at::Tensor& grad_var_in,
                                const at::Tensor& x_in, const at::Tensor& mean_in) {
  const char* op = "rcl_ops::moments_backward";
  check_rows(x_in, op, "x");
  const int64_t rows = x_in.size(0), count = x_in.size(1);
  check_vector(grad_mean_in, rows, op, "grad_mean");
  check_vector(grad_var_in, rows, op, "grad_var");
  check_vector(mean_in, rows, op, "mean");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_mean = grad_mean_in.to(at::kDouble).contiguous();
  const at::Tensor grad_var = grad_var_in.to(at::kDouble).contiguous();
  const at::Tensor mean = mean_in.to(at::kDouble).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcl_ops::moments_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gp = grad_x.data_ptr<scalar_t>();
    const double *gm = grad_mean.data_ptr<double>(), *gv = grad_var.data_ptr<double>();
    const double* mp = mean.data_ptr<double>();
    at::parallel_for(0, rows, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row_moments_backward_any(xp + i * count, count, mp[i], gm[i], gv[i], gp + i * count);
      }
    });
  });
  return grad_x;
}

// Computed in double from the double moments, stored in out_type.
at::Tensor bd_pair_cpu_as(const at::Tensor& mean_q, const at::Tensor& var_q,
                          const at::Tensor& mean_k, const at::Tensor& var_k, double eps,
                          at::ScalarType out_type) {
  check_bd_moments(mean_q, var_q, mean_k, var_k, "rcl_ops::bd_pair");
  const int64_t bq = mean_q.size(0), bk = mean_k.size(0);
  at::Tensor out = at::empty({bq, bk}, mean_q.options().dtype(out_type));
  const at::Tensor mq = mean_q.contiguous(), vq = var_q.contiguous();
  const at::Tensor mk = mean_k.contiguous(), vk = var_k.contiguous();
  const double *mqp = mq.data_ptr<double>(), *vqp = vq.data_ptr<double>();
  const double *mkp = mk.data_ptr<double>(), *vkp = vk.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(out_type, "rcl_ops::bd_pair", [&] {
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, bq, grain_for(16 * bk), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < bk; ++j) {
          op_[i * bk + j] = scalar_t(bd_value<double>(mqp[i], vqp[i], mkp[j], vkp[j], eps));
        }
      }
    });
  });
  return out;
}

at::Tensor bd_pair_cpu(const at::Tensor& mean_q, const at::Tensor& var_q, const at::Tensor& mean_k,
                       const at::Tensor& var_k, double eps) {
  return bd_pair_cpu_as(mean_q, var_q, mean_k, var_k, eps, at::kDouble);
}

// Sums of the pair gradient over the other batch: for row i of q, d_mean_q[i] and d_var_q[i];
// for column j of k, d_mean_k[j] and d_var_k[j]. grad (of type G) is read through its
// strides (autograd hands over expanded gradients); rows and columns are reduced in two
// passes (each only where the mask asks), so no two threads write the same output. All in
// double, like the moments.
template <typename G>
void bd_pair_grad_sums(const G* gp, int64_t stride_i, int64_t stride_j, const double* mqp,
                       const double* vqp, const double* mkp, const double* vkp, int64_t bq,
                       int64_t bk, double eps, OutputMask mask, double* g_mq, double* g_vq,
                       double* g_mk, double* g_vk) {
  if (mask[0])
    at::parallel_for(0, bq, grain_for(16 * bk), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double d_mean = 0.0, d_var = 0.0;
        for (int64_t j = 0; j < bk; ++j) {
          const auto d = bd_grad<double>(mqp[i], vqp[i], mkp[j], vkp[j], eps);
          const double g = double(gp[i * stride_i + j * stride_j]);
          d_mean += g * d.d_mean_q;
          d_var += g * d.d_var_q;
        }
        g_mq[i] = d_mean;
        g_vq[i] = d_var;
      }
    });
  if (mask[1])
    at::parallel_for(0, bk, grain_for(16 * bq), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        double d_mean = 0.0, d_var = 0.0;
        for (int64_t i = 0; i < bq; ++i) {
          const auto d = bd_grad<double>(mqp[i], vqp[i], mkp[j], vkp[j], eps);
          const double g = double(gp[i * stride_i + j * stride_j]);
          d_mean -= g * d.d_mean_q;
          d_var += g * d.d_var_k;
        }
        g_mk[j] = d_mean;
        g_vk[j] = d_var;
      }
    });
}

void check_pair_grad(const at::Tensor& grad, int64_t bq, int64_t bk, const char* op) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == bq && grad.size(1) == bk, op,
              ": grad must have shape (", bq, ", ", bk, "), got ", grad.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bd_pair_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& mean_q, const at::Tensor& var_q,
    const at::Tensor& mean_k, const at::Tensor& var_k, double eps, OutputMask output_mask) {
  const char* op = "rcl_ops::bd_pair_backward";
  check_bd_moments(mean_q, var_q, mean_k, var_k, op);
  const int64_t bq = mean_q.size(0), bk = mean_k.size(0);
  check_pair_grad(grad_in, bq, bk, op);
  const at::Tensor mq = mean_q.contiguous(), vq = var_q.contiguous();
  const at::Tensor mk = mean_k.contiguous(), vk = var_k.contiguous();
  at::Tensor g_mq = at::empty_like(mq), g_vq = at::empty_like(vq);
  at::Tensor g_mk = at::empty_like(mk), g_vk = at::empty_like(vk);
  AT_DISPATCH_FLOATING_TYPES(grad_in.scalar_type(), "rcl_ops::bd_pair_backward", [&] {
    bd_pair_grad_sums<scalar_t>(grad_in.data_ptr<scalar_t>(), grad_in.stride(0), grad_in.stride(1),
                                mq.data_ptr<double>(), vq.data_ptr<double>(), mk.data_ptr<double>(),
                                vk.data_ptr<double>(), bq, bk, eps, output_mask,
                                g_mq.data_ptr<double>(), g_vq.data_ptr<double>(),
                                g_mk.data_ptr<double>(), g_vk.data_ptr<double>());
  });
  if (!output_mask[0]) g_mq = skipped_gradient(mq), g_vq = skipped_gradient(vq);
  if (!output_mask[1]) g_mk = skipped_gradient(mk), g_vk = skipped_gradient(vk);
  return {g_mq, g_vq, g_mk, g_vk};
}

// ---- fused: the whole distance in one op each way ------------------------------------------
// The same kernels as moments, bd_pair and their backward, without a dispatch, an allocation
// and a copy per step in between: at training batch sizes a BD step is a few microseconds of
// arithmetic, so these are what its host time is made of.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, double eps) {
  check_bd_inputs(q_in, k_in, "rcl_ops::bd");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const int64_t bq = q.size(0), bk = k.size(0), count_q = q.size(1), count_k = k.size(1);
  const auto moment_options = q.options().dtype(at::kDouble);
  at::Tensor mean_q = at::empty({bq}, moment_options), var_q = at::empty({bq}, moment_options);
  at::Tensor mean_k = at::empty({bk}, moment_options), var_k = at::empty({bk}, moment_options);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rcl_ops::bd", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>();
    double *mqp = mean_q.data_ptr<double>(), *vqp = var_q.data_ptr<double>();
    double *mkp = mean_k.data_ptr<double>(), *vkp = var_k.data_ptr<double>();
    at::parallel_for(0, bq + bk, grain_for(std::max(count_q, count_k)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        if (r < bq) {
          row_moments_any(qp + r * count_q, count_q, mqp + r, vqp + r);
        } else {
          row_moments_any(kp + (r - bq) * count_k, count_k, mkp + r - bq, vkp + r - bq);
        }
      }
    });
  });
  return {bd_pair_cpu_as(mean_q, var_q, mean_k, var_k, eps, q.scalar_type()), mean_q, var_q, mean_k,
          var_k};
}

std::tuple<at::Tensor, at::Tensor> bd_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& mean_q, const at::Tensor& var_q, const at::Tensor& mean_k,
    const at::Tensor& var_k, double eps, OutputMask output_mask) {
  const char* op = "rcl_ops::bd_backward";
  check_bd_saved(q_in, k_in, mean_q, var_q, mean_k, var_k, op);
  const int64_t bq = q_in.size(0), bk = k_in.size(0);
  check_pair_grad(grad_in, bq, bk, op);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const at::Tensor mq = mean_q.contiguous(), vq = var_q.contiguous();
  const at::Tensor mk = mean_k.contiguous(), vk = var_k.contiguous();
  const int64_t count_q = q.size(1), count_k = k.size(1);
  at::Tensor grad_q = output_mask[0] ? at::empty_like(q) : skipped_gradient(q);
  at::Tensor grad_k = output_mask[1] ? at::empty_like(k) : skipped_gradient(k);
  // Per-row coefficients (bq + bk of them) on the heap, not as tensors.
  std::vector<double> coef(2 * (bq + bk));
  double *g_mq = coef.data(), *g_vq = g_mq + bq, *g_mk = g_vq + bq, *g_vk = g_mk + bk;
  const double *mqp = mq.data_ptr<double>(), *mkp = mk.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(grad_in.scalar_type(), "rcl_ops::bd_backward", [&] {
    bd_pair_grad_sums<scalar_t>(grad_in.data_ptr<scalar_t>(), grad_in.stride(0), grad_in.stride(1),
                                mqp, vq.data_ptr<double>(), mkp, vk.data_ptr<double>(), bq, bk, eps,
                                output_mask, g_mq, g_vq, g_mk, g_vk);
  });
  // Rows [0, bq) are q's, [bq, bq + bk) k's; a masked side's rows are left out.
  const int64_t first_row = output_mask[0] ? 0 : bq, end_row = output_mask[1] ? bq + bk : bq;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rcl_ops::bd_backward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>();
    scalar_t *gqp = grad_q.data_ptr<scalar_t>(), *gkp = grad_k.data_ptr<scalar_t>();
    at::parallel_for(first_row, end_row, grain_for(std::max(count_q, count_k)),
                     [&](int64_t b, int64_t e) {
                       for (int64_t r = b; r < e; ++r) {
                         if (r < bq) {
                           row_moments_backward_any(qp + r * count_q, count_q, mqp[r], g_mq[r],
                                                    g_vq[r], gqp + r * count_q);
                         } else {
                           const int64_t j = r - bq;
                           row_moments_backward_any(kp + j * count_k, count_k, mkp[j], g_mk[j],
                                                    g_vk[j], gkp + j * count_k);
                         }
                       }
                     });
  });
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CPU, m) {
  m.impl("moments", &moments_cpu);
  m.impl("moments_backward", &moments_backward_cpu);
  m.impl("bd_pair", &bd_pair_cpu);
  m.impl("bd_pair_backward", &bd_pair_backward_cpu);
  m.impl("bd", &bd_cpu);
  m.impl("bd_backward", &bd_backward_cpu);
}

}  // namespace rcl_ops
