"""The native backends ("cpu", "cuda"): the C++/CUDA ops of rcl_ops._C, with their fake
(shape-only) kernels and autograd, so torch.compile traces them and opcheck passes."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  loads the library and its TORCH_LIBRARY registrations
from ._autograd import gradient_if_needed, register_sketch_and_pair_autograd
from ._backend import Backend, mark_unavailable, op_library_stages, register_backend
from ._fakes import masked_gradients, register_fake_kernels
from ._formulas import mmd_from_kernel_sums
from .ops import warn_if_grid_inaccurate

ops = torch.ops.rcl_ops


# ---- fake kernels: the ops shared with the Triton library in rcl_ops/_fakes.py -------------

register_fake_kernels("rcl_ops")


@torch.library.register_fake("rcl_ops::emd_exact")
def _emd_exact_fake(q, k):
    torch._check(q.shape[1] == k.shape[1], lambda: "rcl_ops::emd_exact: q and k need the same M")
    return (
        q.new_empty(q.shape[0], k.shape[0]),
        torch.empty_like(q),
        q.new_empty(q.shape, dtype=torch.int32),
        torch.empty_like(k),
        k.new_empty(k.shape, dtype=torch.int32),
    )


@torch.library.register_fake("rcl_ops::emd_exact_backward")
def _emd_exact_backward_fake(grad, sorted_q, order_q, sorted_k, order_k, output_mask):
    return masked_gradients((sorted_q, sorted_k), output_mask)


@torch.library.register_fake("rcl_ops::bd")
def _bd_fake(q, k, eps):
    torch._check(q.dim() == 2 and k.dim() == 2, lambda: "rcl_ops::bd: q and k must be 2-D")
    bq, bk = q.shape[0], k.shape[0]
    moments = [q.new_empty(n, dtype=torch.float64) for n in (bq, bq, bk, bk)]
    return q.new_empty(bq, bk), *moments


@torch.library.register_fake("rcl_ops::bd_backward")
def _bd_backward_fake(grad, q, k, mean_q, var_q, mean_k, var_k, eps, output_mask):
    return masked_gradients((q, k), output_mask)


@torch.library.register_fake("rcl_ops::gaussian_kernel_sums")
def _gaussian_kernel_sums_fake(x, y, bandwidths, paired):
    shape = (x.shape[0],) if paired else (x.shape[0], y.shape[0])
    return x.new_empty(shape, dtype=torch.float64)


@torch.library.register_fake("rcl_ops::gaussian_kernel_sums_backward")
def _gaussian_kernel_sums_backward_fake(grad, x, y, bandwidths, paired, output_mask):
    return masked_gradients((x, y), output_mask)


# ---- autograd -----------------------------------------------------------------------------
# emd_exact, mmd_grid and bd: in C++ (csrc/autograd.cpp), one host hop per step.


def _kernel_sums_setup(ctx, inputs, output):
    x, y, bandwidths, ctx.paired = inputs
    ctx.save_for_backward(x, y, bandwidths)


def _kernel_sums_backward(ctx, grad):
    x, y, bandwidths = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    grad_x, grad_y = ops.gaussian_kernel_sums_backward(grad, x, y, bandwidths, ctx.paired, mask)
    return gradient_if_needed(grad_x, mask[0]), gradient_if_needed(grad_y, mask[1]), None, None


register_sketch_and_pair_autograd("rcl_ops")
torch.library.register_autograd(
    "rcl_ops::gaussian_kernel_sums", _kernel_sums_backward, setup_context=_kernel_sums_setup
)


# ---- the backend --------------------------------------------------------------------------


def native_emd(q: torch.Tensor, k: torch.Tensor, num_quantiles: int | None) -> torch.Tensor:
    if num_quantiles is None or num_quantiles == q.shape[1] == k.shape[1]:
        return ops.emd_exact(q, k)[0]
    sorted_q, _ = ops.sorted_quantiles(q, num_quantiles)
    sorted_k, _ = ops.sorted_quantiles(k, num_quantiles)
    return ops.emd_pair(sorted_q, sorted_k)


def native_mmd(q, k, bandwidths, unbiased: bool, method: str, num_bins: int) -> torch.Tensor:
    if method == "grid":
        distances, grid, _, _ = ops.mmd_grid(q, k, bandwidths, num_bins, unbiased)
        warn_if_grid_inaccurate(grid, bandwidths, num_bins)
        return distances
    return mmd_from_kernel_sums(
        ops.gaussian_kernel_sums(q, q, bandwidths, True),
        ops.gaussian_kernel_sums(k, k, bandwidths, True),
        ops.gaussian_kernel_sums(q, k, bandwidths, False),
        q.shape[1],
        k.shape[1],
        bandwidths.numel(),
        unbiased,
    ).to(q.dtype)


def native_bd(q: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    return ops.bd(q, k, eps)[0]


register_backend(Backend("cpu", ("cpu",), native_emd, native_mmd, native_bd, **op_library_stages(ops)))
if ops.emd_pair.default.has_kernel_for_dispatch_key("CUDA"):
    register_backend(Backend("cuda", ("cuda",), native_emd, native_mmd, native_bd, **op_library_stages(ops)))
else:
    mark_unavailable("cuda", "rcl_ops._C was built without CUDA kernels")
