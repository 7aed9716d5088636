// Exact EMD (K == M) as one autograd node: forward sorts both batches and pairs them,
// returning the sorted values and int32 orders that the backward needs; on CPU the
// backward's pair gradient is scattered back in place, row by row, with no (B, M)
// temporaries (csrc/cpu/emd_kernel.cpp); on CUDA the forward sorts q and k in one radix
// sort (csrc/cuda/emd_kernel.cu). These composite kernels, built from the primitive ops,
// serve the rest (the CUDA backward, other devices).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"

namespace rcl_ops {
namespace {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

TensorPair call_sorted_quantiles(const at::Tensor& x, int64_t num_quantiles) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rcl_ops::sorted_quantiles", "")
                             .typed<TensorPair(const at::Tensor&, int64_t)>();
  return op.call(x, num_quantiles);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emd_exact_composite(
    const at::Tensor& q, const at::Tensor& k) {
  const char* op = "rcl_ops::emd_exact";
  check_rows(q, op, "q");
  check_rows(k, op, "k");
  check_same_rows(q, k, op);
  static const auto emd_pair = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("rcl_ops::emd_pair", "")
                                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  auto [sorted_q, order_q] = call_sorted_quantiles(q, q.size(1));
  auto [sorted_k, order_k] = call_sorted_quantiles(k, k.size(1));
  return {emd_pair.call(sorted_q, sorted_k), sorted_q, order_q, sorted_k, order_k};
}

TensorPair emd_exact_backward_composite(const at::Tensor& grad, const at::Tensor& sorted_q,
                                        const at::Tensor& order_q, const at::Tensor& sorted_k,
                                        const at::Tensor& order_k) {
  const char* op = "rcl_ops::emd_exact_backward";
  check_sorted_pair_and_orders(sorted_q, order_q, sorted_k, order_k, op);
  static const auto pair_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rcl_ops::emd_pair_backward", "")
          .typed<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  static const auto scatter = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("rcl_ops::sorted_quantiles_backward", "")
                                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  auto [grad_sorted_q, grad_sorted_k] = pair_backward.call(grad, sorted_q, sorted_k);
  return {scatter.call(grad_sorted_q, order_q), scatter.call(grad_sorted_k, order_k)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CompositeExplicitAutograd, m) {
  m.impl("emd_exact", &emd_exact_composite);
  m.impl("emd_exact_backward", &emd_exact_backward_composite);
}

}  // namespace rcl_ops
