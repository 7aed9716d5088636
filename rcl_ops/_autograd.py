"""Autograd of the ops shared by the native (``rcl_ops``) and Triton (``rcl_ops_triton``)
libraries (rcl_ops/_fakes.py lists them). Each forward op's backward calls the namespace's
own ``*_backward`` op, so it dispatches to the same device and backend. The native fused ops
(emd_exact, bd, mmd_grid) have theirs in C++ (csrc/autograd.cpp).

Second derivatives: not implemented. The ``*_backward`` ops have no derivative of their own:
the native ones raise "the derivative for ... is not implemented" when a second derivative
flows through them (torch's not-implemented autograd kernel), the Triton ones (custom ops
without autograd) raise "Autograd has not been implemented for operator ...". Neither gives a
silently zero second derivative. eps, the bandwidths and num_bins are constants: no gradient.
The Python autograd Functions without a second derivative (the reference MMD, the MMD sketches'
binning) raise alike: ``no_second_derivative``."""

from __future__ import annotations

import functools

import torch


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on a backward's gradients, whose own backward raises (the second derivative)."""

    @staticmethod
    def forward(ctx, what: str, *grads):
        ctx.what = what
        return tuple(g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(
            f"{ctx.what}: the second derivative is not implemented (its backward is not differentiable); "
            "a gradient penalty needs EMD or BD on the reference backend"
        )


def no_second_derivative(what: str):
    """Decorator of an autograd.Function's backward, as torch's once_differentiable: the backward runs
    without a graph, and where one is being built (create_graph=True) its gradients carry a node that
    raises RuntimeError naming ``what`` when differentiated. once_differentiable did so only where the
    incoming gradient needed a graph: grad(D.sum(), create_graph=True) got a constant, so a penalty on
    it silently contributed nothing."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            tensors = [i for i, g in enumerate(outputs) if isinstance(g, torch.Tensor)]
            marked = _NoSecondDerivative.apply(what, *(outputs[i].detach().requires_grad_() for i in tensors))
            outputs = list(outputs)
            for i, g in zip(tensors, marked):
                outputs[i] = g
            return tuple(outputs)

        return wrapper

    return decorate


def gradient_if_needed(grad: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """A backward op's gradient where it was asked for (output_mask), else None: the op
    returned a 0-element placeholder for it."""
    return grad if needed else None


def register_sketch_and_pair_autograd(namespace: str) -> None:
    """Attach autograd to ``<namespace>::{sorted_quantiles, emd_pair, moments, bd_pair}``."""
    ops = getattr(torch.ops, namespace)

    def quantiles_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no (B, M) zeros for the integer order's gradient

    def quantiles_grad(ctx, grad_quantiles, grad_order):
        if grad_quantiles is None:
            return None, None
        (order,) = ctx.saved_tensors
        return ops.sorted_quantiles_backward(grad_quantiles, order), None

    def emd_pair_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def emd_pair_grad(ctx, grad):
        mask = list(ctx.needs_input_grad[:2])
        grad_q, grad_k = ops.emd_pair_backward(grad, *ctx.saved_tensors, mask)
        return gradient_if_needed(grad_q, mask[0]), gradient_if_needed(grad_k, mask[1])

    def moments_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[0])

    def moments_grad(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        return ops.moments_backward(grad_mean, grad_var, x, mean)

    def bd_pair_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.eps = inputs[4]

    def bd_pair_grad(ctx, grad):
        needs = ctx.needs_input_grad
        mask = [needs[0] or needs[1], needs[2] or needs[3]]
        grads = ops.bd_pair_backward(grad, *ctx.saved_tensors, ctx.eps, mask)
        return (*(gradient_if_needed(g, needs[i]) for i, g in enumerate(grads)), None)

    for name, backward, setup in (
        ("sorted_quantiles", quantiles_grad, quantiles_setup),
        ("emd_pair", emd_pair_grad, emd_pair_setup),
        ("moments", moments_grad, moments_setup),
        ("bd_pair", bd_pair_grad, bd_pair_setup),
    ):
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)


def register_mmd_grid_autograd(namespace: str) -> None:
    """Attach autograd to ``<namespace>::mmd_grid``: the backward reuses the forward's grid and
    binned weights (outputs 1-3, not differentiable)."""
    ops = getattr(torch.ops, namespace)

    def setup(ctx, inputs, output):
        q, k, bandwidths, ctx.num_bins, ctx.unbiased = inputs
        ctx.save_for_backward(q, k, bandwidths, *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad, *unused):
        if grad is None:
            return None, None, None, None, None
        q, k, bandwidths, grid, w_q, w_k = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:2])
        grad_q, grad_k = ops.mmd_grid_backward(grad, q, k, bandwidths, grid, w_q, w_k, ctx.num_bins, ctx.unbiased, mask)
        return gradient_if_needed(grad_q, mask[0]), gradient_if_needed(grad_k, mask[1]), None, None, None

    torch.library.register_autograd(f"{namespace}::mmd_grid", backward, setup_context=setup)
