// The exact (direct) MMD over the kernel-sum ops (see mmd_direct.h).
#include "mmd_direct.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>

namespace rcl_ops {
namespace {

using Tensor = at::Tensor;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

void check_mmd_direct_args(const Tensor& q, const Tensor& k,
                           const std::optional<Tensor>& bandwidths, bool unbiased, const char* op) {
  check_rows(q, op, "q");
  check_rows(k, op, "k");
  check_same(q, k, op, "q", "k");
  if (bandwidths.has_value()) {
    TORCH_CHECK(bandwidths->dim() == 1 && bandwidths->numel() > 0, op,
                ": bandwidths must be a non-empty 1-D tensor, got shape ", bandwidths->sizes());
    TORCH_CHECK(bandwidths->device() == q.device(), op, ": bandwidths is on ", bandwidths->device(),
                " but q is on ", q.device());
  }
  TORCH_CHECK(!unbiased || (q.size(1) > 1 && k.size(1) > 1), op,
              ": the unbiased estimator needs at least 2 values per residual");
}

void check_mmd_direct_backward_args(const Tensor& grad, const Tensor& q, const Tensor& k,
                                    const Tensor& bandwidths, const Tensor& statistic,
                                    const Tensor& derivative_sums, bool unbiased, const char* op) {
  check_mmd_direct_args(q, k, bandwidths, unbiased, op);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == q.size(0) && grad.size(1) == k.size(0), op,
              ": grad must have shape (", q.size(0), ", ", k.size(0), "), got ", grad.sizes());
  TORCH_CHECK(grad.device() == q.device(), op, ": grad is on ", grad.device(), " but q is on ",
              q.device());
  TORCH_CHECK(statistic.sizes() == grad.sizes() && statistic.scalar_type() == at::kDouble &&
                  statistic.device() == q.device() && bandwidths.scalar_type() == at::kDouble,
              op, ": statistic and bandwidths must be the forward's float64 outputs");
  TORCH_CHECK(
      derivative_sums.dim() == 1 && derivative_sums.scalar_type() == at::kDouble &&
          derivative_sums.device() == q.device() &&
          (derivative_sums.numel() == 0 || derivative_sums.numel() == derivative_sums_size(q, k)),
      op, ": derivative_sums must be the forward's float64 vector of 0 or ",
      derivative_sums_size(q, k), " values, got ", derivative_sums.sizes());
}

MmdTerms mmd_terms(int64_t m, int64_t n, int64_t num_h, bool unbiased) {
  const double md = double(m), nd = double(n), h = double(num_h);
  if (unbiased) return {md * h, md * (md - 1.0), nd * h, nd * (nd - 1.0), 2.0 / (md * nd)};
  return {0.0, md * md, 0.0, nd * nd, 2.0 / (md * nd)};
}

MmdDirectOutputs mmd_direct_composite(const Tensor& q, const Tensor& k,
                                      const std::optional<Tensor>& bandwidths, bool unbiased,
                                      bool derivatives) {
  static const auto sums = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>(
      "rcl_ops::gaussian_kernel_sums");
  check_mmd_direct_args(q, k, bandwidths, unbiased, "rcl_ops::mmd_direct");
  TORCH_CHECK(!derivatives, "rcl_ops::mmd_direct: derivatives=True is implemented on CPU only");
  static const auto pooled_std =
      find_op<Tensor(const Tensor&, const Tensor&)>("rcl_ops::pooled_std");
  // A copy also where the bandwidths are float64 already: an op's output may not alias its input.
  const Tensor h = bandwidths.has_value()
                       ? bandwidths->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true)
                       : pooled_std.call(q, k);
  // A default bandwidth out of range: the sums run with 1 and the statistic is NaN (no host sync).
  std::optional<Tensor> in_range;
  Tensor h_used = h;
  if (!bandwidths.has_value()) {
    in_range = (h >= kMinBandwidth).logical_and(h <= kMaxBandwidth).all();
    h_used = at::where(*in_range, h, at::ones_like(h));
  }
  const MmdTerms terms = mmd_terms(q.size(1), k.size(1), h.numel(), unbiased);
  const Tensor self_q = (sums.call(q, q, h_used, true) - terms.diag_q) / terms.div_q;
  const Tensor self_k = (sums.call(k, k, h_used, true) - terms.diag_k) / terms.div_k;
  Tensor statistic =
      self_q.unsqueeze(1) + self_k.unsqueeze(0) - sums.call(q, k, h_used, false) * terms.cross;
  if (in_range.has_value()) {
    statistic = at::where(*in_range, statistic, at::full({}, NAN, statistic.options()));
  }
  const Tensor distances = unbiased ? statistic.to(q.scalar_type(), false, /*copy=*/true)
                                    : statistic.clamp_min(0.0).to(q.scalar_type());
  return {distances, h, statistic, at::empty({0}, statistic.options())};
}

// d/dS of the statistic: grad / div_q summed over j for S_qq, over i for S_kk, -cross grad for
// S_qk; the V-statistic passes grad only where it was not clamped (statistic >= 0, as
// clamp_min's derivative). S_xx's derivative in x is twice its x-side one (k' is odd).
std::tuple<Tensor, Tensor> mmd_direct_backward_composite(const Tensor& grad_in, const Tensor& q,
                                                         const Tensor& k, const Tensor& bandwidths,
                                                         const Tensor& statistic,
                                                         const Tensor& derivative_sums,
                                                         bool unbiased, OutputMask output_mask) {
  static const auto sums_backward = find_op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, OutputMask)>(
      "rcl_ops::gaussian_kernel_sums_backward");
  check_mmd_direct_backward_args(grad_in, q, k, bandwidths, statistic, derivative_sums, unbiased,
                                 "rcl_ops::mmd_direct_backward");
  Tensor grad = grad_in.to(at::kDouble);
  if (!unbiased) grad = at::where(statistic >= 0, grad, at::zeros_like(grad));
  const MmdTerms terms = mmd_terms(q.size(1), k.size(1), bandwidths.numel(), unbiased);
  auto [grad_q, grad_k] =
      sums_backward.call(grad * (-terms.cross), q, k, bandwidths, false, output_mask);
  if (output_mask[0]) {
    const Tensor self = std::get<0>(
        sums_backward.call(grad.sum(1) / terms.div_q, q, q, bandwidths, true, {true, false}));
    grad_q = grad_q + self * 2;
  }
  if (output_mask[1]) {
    const Tensor self = std::get<0>(
        sums_backward.call(grad.sum(0) / terms.div_k, k, k, bandwidths, true, {true, false}));
    grad_k = grad_k + self * 2;
  }
  return {grad_q, grad_k};
}

}  // namespace rcl_ops
