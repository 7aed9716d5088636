"""The native backends ("cpu", "cuda"): the C++/CUDA ops of rcl_ops._C, with their fake
(shape-only) kernels (rcl_ops/_fakes.py) and autograd, so torch.compile traces them and opcheck
passes."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  loads the library and its TORCH_LIBRARY registrations
from ._autograd import gradient_if_needed, register_sketch_and_pair_autograd
from ._backend import Backend, mark_unavailable, op_library_stages, register_backend
from ._fakes import register_fake_kernels
from ._formulas import mmd_from_kernel_sums
from .ops import warn_if_grid_inaccurate

ops = torch.ops.rcl_ops


# ---- fake kernels: every op's, in rcl_ops/_fakes.py ------------------------------------------

register_fake_kernels("rcl_ops")


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
