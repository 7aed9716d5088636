// Autograd of the fused ops (emd_exact, mmd_grid, mmd_direct, bd, info_nce) in C++, on every
// device.
//
// Why C++: a loss step calls one of these per step, and torch.library's Python autograd
// adds host time per op and per backward on top of the kernels, more than the whole
// Bhattacharyya step takes on a GPU (benchmarks/results/design-measurements.md). Here the
// forward is one dispatcher call and the backward runs in the autograd engine's C++ thread.
// The primitive ops (moments, bd_pair, sorted_quantiles, emd_pair) keep their Python
// autograd (rcl_ops/_autograd.py) for direct use.
//
// Second derivatives are not implemented (except info_nce's, by ATen ops). Every backward op (of
// the fused ops and of the primitives) gets torch's "not implemented" autograd kernel: a backward
// with create_graph=True records a node that raises "the derivative for 'rcl_ops::..._backward' is
// not implemented" when a second derivative flows through it, instead of the silently zero
// second derivative that an op without autograd gives.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>

namespace rcl_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using TensorPair = std::tuple<Tensor, Tensor>;
using Mask = std::array<bool, 2>;

// Which of the first two inputs (q, k) need a gradient: the backward ops skip the others.
Mask input_grad_mask(AutogradContext* ctx) {
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
}

// The op's gradient where it was asked for, undefined (no gradient) where it was not.
Tensor if_needed(const Tensor& grad, bool needed) { return needed ? grad : Tensor(); }

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// ---- exact EMD ----------------------------------------------------------------------------

using EmdExactOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

class EmdExactFunction : public torch::autograd::Function<EmdExactFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k) {
    static const auto op =
        find_op<EmdExactOutputs(const Tensor&, const Tensor&)>("rcl_ops::emd_exact");
    ctx->set_materialize_grads(false);
    Tensor distances, sorted_q, order_q, sorted_k, order_k;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(distances, sorted_q, order_q, sorted_k, order_k) = op.call(q, k);
    }
    ctx->save_for_backward({sorted_q, order_q, sorted_k, order_k});
    ctx->mark_non_differentiable({sorted_q, order_q, sorted_k, order_k});
    return {distances, sorted_q, order_q, sorted_k, order_k};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, Mask)>("rcl_ops::emd_exact_backward");
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    const Mask mask = input_grad_mask(ctx);
    auto [grad_q, grad_k] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], mask);
    return {if_needed(grad_q, mask[0]), if_needed(grad_k, mask[1])};
  }
};

EmdExactOutputs emd_exact_autograd(const Tensor& q, const Tensor& k) {
  const auto out = EmdExactFunction::apply(q, k);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ---- binned-grid MMD ----------------------------------------------------------------------

using MmdGridOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;

class MmdGridFunction : public torch::autograd::Function<MmdGridFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const Tensor& bandwidths, int64_t num_bins, bool unbiased) {
    static const auto op =
        find_op<MmdGridOutputs(const Tensor&, const Tensor&, const Tensor&, int64_t, bool)>(
            "rcl_ops::mmd_grid");
    ctx->set_materialize_grads(false);
    Tensor distances, grid, w_q, w_k;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(distances, grid, w_q, w_k) = op.call(q, k, bandwidths, num_bins, unbiased);
    }
    ctx->save_for_backward({q, k, bandwidths, grid, w_q, w_k});
    ctx->saved_data["num_bins"] = num_bins;
    ctx->saved_data["unbiased"] = unbiased;
    ctx->mark_non_differentiable({grid, w_q, w_k});
    return {distances, grid, w_q, w_k};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, int64_t, bool, Mask)>(
            "rcl_ops::mmd_grid_backward");
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const auto s = ctx->get_saved_variables();
    const Mask mask = input_grad_mask(ctx);
    auto [grad_q, grad_k] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["num_bins"].toInt(),
                ctx->saved_data["unbiased"].toBool(), mask);
    // The bandwidths (and the grid) are constants: no gradient, as documented.
    return {if_needed(grad_q, mask[0]), if_needed(grad_k, mask[1]), Tensor(), Tensor(), Tensor()};
  }
};

MmdGridOutputs mmd_grid_autograd(const Tensor& q, const Tensor& k, const Tensor& bandwidths,
                                 int64_t num_bins, bool unbiased) {
  const auto out = MmdGridFunction::apply(q, k, bandwidths, num_bins, unbiased);
  return {out[0], out[1], out[2], out[3]};
}

// ---- exact (direct) MMD --------------------------------------------------------------------

using MmdDirectOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;

class MmdDirectFunction : public torch::autograd::Function<MmdDirectFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const std::optional<Tensor>& bandwidths, bool unbiased,
                               bool derivatives) {
    static const auto op =
        find_op<MmdDirectOutputs(const Tensor&, const Tensor&, const std::optional<Tensor>&, bool,
                                 bool)>("rcl_ops::mmd_direct");
    ctx->set_materialize_grads(false);
    Tensor distances, used_bandwidths, statistic, derivative_sums;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(distances, used_bandwidths, statistic, derivative_sums) =
          op.call(q, k, bandwidths, unbiased, derivatives);
    }
    ctx->save_for_backward({q, k, used_bandwidths, statistic, derivative_sums});
    ctx->saved_data["unbiased"] = unbiased;
    ctx->mark_non_differentiable({used_bandwidths, statistic, derivative_sums});
    return {distances, used_bandwidths, statistic, derivative_sums};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, bool, Mask)>(
            "rcl_ops::mmd_direct_backward");
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const auto s = ctx->get_saved_variables();
    const Mask mask = input_grad_mask(ctx);
    auto [grad_q, grad_k] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["unbiased"].toBool(), mask);
    // The bandwidths are constants: no gradient, as documented.
    return {if_needed(grad_q, mask[0]), if_needed(grad_k, mask[1]), Tensor(), Tensor(), Tensor()};
  }
};

MmdDirectOutputs mmd_direct_autograd(const Tensor& q, const Tensor& k,
                                     const std::optional<Tensor>& bandwidths, bool unbiased,
                                     bool derivatives) {
  const auto out = MmdDirectFunction::apply(q, k, bandwidths, unbiased, derivatives);
  return {out[0], out[1], out[2], out[3]};
}

// ---- Bhattacharyya ------------------------------------------------------------------------

using BdOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

class BdFunction : public torch::autograd::Function<BdFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, double eps) {
    static const auto op = find_op<BdOutputs(const Tensor&, const Tensor&, double)>("rcl_ops::bd");
    ctx->set_materialize_grads(false);
    Tensor distances, mean_q, var_q, mean_k, var_k;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(distances, mean_q, var_q, mean_k, var_k) = op.call(q, k, eps);
    }
    ctx->save_for_backward({q, k, mean_q, var_q, mean_k, var_k});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean_q, var_q, mean_k, var_k});
    return {distances, mean_q, var_q, mean_k, var_k};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, double, Mask)>(
            "rcl_ops::bd_backward");
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    const auto s = ctx->get_saved_variables();
    const Mask mask = input_grad_mask(ctx);
    auto [grad_q, grad_k] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5],
                                    ctx->saved_data["eps"].toDouble(), mask);
    return {if_needed(grad_q, mask[0]), if_needed(grad_k, mask[1]), Tensor()};
  }
};

BdOutputs bd_autograd(const Tensor& q, const Tensor& k, double eps) {
  const auto out = BdFunction::apply(q, k, eps);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ---- InfoNCE ------------------------------------------------------------------------------

using InfoNceOutputs = std::tuple<Tensor, Tensor, Tensor>;

// d sum_i grad[i] losses[i] / d D from distances by differentiable ATen ops: the backward where
// a second derivative is wanted (create_graph=True), which the saved derivatives cannot give.
Tensor info_nce_gradient_composite(const Tensor& grad, const Tensor& distances, double temperature,
                                   bool symmetric, int64_t first_positive) {
  const int64_t rows = distances.size(0);
  const Tensor logits = distances.neg().div(temperature);
  Tensor target = at::zeros_like(distances, at::MemoryFormat::Contiguous);
  target.narrow(1, first_positive, rows).fill_diagonal_(1.0);
  const double scale = symmetric ? 0.5 / temperature : 1.0 / temperature;
  Tensor result = (target - logits.softmax(1)).mul(grad.unsqueeze(1)).mul(scale);
  if (symmetric) result = result + (target - logits.softmax(0)).mul(grad.unsqueeze(0)).mul(scale);
  return result;
}

class InfoNceFunction : public torch::autograd::Function<InfoNceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& distances, double temperature,
                               bool symmetric, int64_t first_positive) {
    static const auto op =
        find_op<InfoNceOutputs(const Tensor&, double, bool, int64_t)>("rcl_ops::info_nce");
    ctx->set_materialize_grads(false);
    Tensor losses, grad_rows, grad_columns;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(losses, grad_rows, grad_columns) =
          op.call(distances, temperature, symmetric, first_positive);
    }
    ctx->save_for_backward({distances, grad_rows, grad_columns});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["symmetric"] = symmetric;
    ctx->saved_data["first_positive"] = first_positive;
    ctx->mark_non_differentiable({grad_rows, grad_columns});
    return {losses, grad_rows, grad_columns};
  }

  // grad[i] grad_rows[i, j] + grad[j] grad_columns[i, j] from the forward's derivatives; under
  // create_graph=True the same from the distances by differentiable ops.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    const auto s = ctx->get_saved_variables();
    const bool symmetric = ctx->saved_data["symmetric"].toBool();
    const Tensor grad = grads[0].to(s[0].scalar_type());
    if (at::GradMode::is_enabled()) {
      return {info_nce_gradient_composite(grad, s[0], ctx->saved_data["temperature"].toDouble(),
                                          symmetric, ctx->saved_data["first_positive"].toInt()),
              Tensor(), Tensor(), Tensor()};
    }
    Tensor result = s[1] * grad.unsqueeze(1);
    if (symmetric) result.addcmul_(s[2], grad.unsqueeze(0));
    return {result, Tensor(), Tensor(), Tensor()};
  }
};

InfoNceOutputs info_nce_autograd(const Tensor& distances, double temperature, bool symmetric,
                                 int64_t first_positive) {
  const auto out = InfoNceFunction::apply(distances, temperature, symmetric, first_positive);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, Autograd, m) {
  m.impl("emd_exact", &emd_exact_autograd);
  m.impl("mmd_grid", &mmd_grid_autograd);
  m.impl("mmd_direct", &mmd_direct_autograd);
  m.impl("bd", &bd_autograd);
  m.impl("info_nce", &info_nce_autograd);
  for (const char* backward_op :
       {"emd_exact_backward", "mmd_grid_backward", "mmd_direct_backward", "bd_backward",
        "moments_backward", "bd_pair_backward", "sorted_quantiles_backward", "emd_pair_backward",
        "gaussian_kernel_sums_backward"}) {
    m.impl(backward_op, torch::autograd::autogradNotImplementedFallback());
  }
}

}  // namespace rcl_ops
