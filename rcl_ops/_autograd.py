"""Autograd of the sketch and pair ops, shared by every op namespace that implements them
(``rcl_ops`` native C++/CUDA, ``rcl_ops_triton``; the native fused ops have theirs in C++).
Each forward op's backward calls the namespace's own ``*_backward`` op, so it dispatches to
the same device and backend.
eps is a constant: its gradient is not computed."""

from __future__ import annotations

import torch


def register_sketch_and_pair_autograd(namespace: str, quantiles_op: str) -> None:
    """Attach autograd to ``<namespace>::{quantiles_op, emd_pair, moments, bd_pair}``.

    ``quantiles_op`` (x, K) -> (quantiles, order) has the backward op ``<quantiles_op>_backward``.
    """
    ops = getattr(torch.ops, namespace)
    quantiles_backward = getattr(ops, f"{quantiles_op}_backward")

    def quantiles_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no (B, M) zeros for the integer order's gradient

    def quantiles_grad(ctx, grad_quantiles, grad_order):
        if grad_quantiles is None:
            return None, None
        (order,) = ctx.saved_tensors
        return quantiles_backward(grad_quantiles, order), None

    def emd_pair_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def emd_pair_grad(ctx, grad):
        return ops.emd_pair_backward(grad, *ctx.saved_tensors)

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
        return (*ops.bd_pair_backward(grad, *ctx.saved_tensors, ctx.eps), None)

    for name, backward, setup in (
        (quantiles_op, quantiles_grad, quantiles_setup),
        ("emd_pair", emd_pair_grad, emd_pair_setup),
        ("moments", moments_grad, moments_setup),
        ("bd_pair", bd_pair_grad, bd_pair_setup),
    ):
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)
