"""The native backends ("cpu", "cuda"): the C++/CUDA ops of rcl_ops._C, with their fake
(shape-only) kernels (rcl_ops/_fakes.py) and autograd, so torch.compile traces them and opcheck
passes."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  loads the library and its TORCH_LIBRARY registrations
from ._autograd import gradient_if_needed, register_sketch_and_pair_autograd
from ._backend import Backend, mark_unavailable, op_library_stages, register_backend
from ._checks import check_default_bandwidth, host_checks_on
from ._fakes import register_fake_kernels
from .ops import warn_if_grid_inaccurate

ops = torch.ops.rcl_ops
# Value pairs (Bq Bk M N) up to which the CPU's exact MMD returns its derivative sums for the
# backward (csrc/cpu/mmd_direct.cpp: kFusedMaxWork, 4 * 2^16 kernel evaluations; on 2 threads the
# fused pass stays faster well beyond: benchmarks/results/design-measurements.md).
DERIVATIVE_SUMS_MAX_PAIRS = 1 << 18


# ---- fake kernels: every op's, in rcl_ops/_fakes.py ------------------------------------------

register_fake_kernels("rcl_ops")


# ---- autograd -----------------------------------------------------------------------------
# emd_exact, mmd_grid, mmd_direct and bd: in C++ (csrc/autograd.cpp), one host hop per step.


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
        if bandwidths is None:
            # One op (3 launches on CUDA) for what default_bandwidth computes with ~30 torch ops.
            bandwidths = check_default_bandwidth(ops.pooled_std(q.detach(), k.detach()), "pairwise_mmd")
        distances, grid, _, _ = ops.mmd_grid(q, k, bandwidths, num_bins, unbiased)
        warn_if_grid_inaccurate(grid, bandwidths, num_bins)
        return distances
    # One node: the pooled bandwidth (bandwidths None), the three kernel sums and the statistic;
    # on CPU, where a gradient will be wanted, also the sums of k' that the backward contracts.
    distances, used, _, _ = ops.mmd_direct(q, k, bandwidths, unbiased, _derivative_sums_wanted(q, k))
    if bandwidths is None and host_checks_on(used.device.type, "pairwise_mmd"):
        # Out of range, mmd_direct has made the distances NaN (csrc/mmd_direct.h, kMinBandwidth);
        # where the host checks run, the bandwidth is named instead.
        check_default_bandwidth(used, "pairwise_mmd")
    return distances


def _derivative_sums_wanted(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether mmd_direct should also return its derivative sums: on CPU, where autograd will
    record it, up to DERIVATIVE_SUMS_MAX_PAIRS pairs of values (Bq Bk (M + N) float64 values, and
    the op then runs on one thread: the size where its parallel sums would start to split)."""
    if q.device.type != "cpu" or not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad):
        return False
    return q.shape[0] * k.shape[0] * q.shape[1] * k.shape[1] <= DERIVATIVE_SUMS_MAX_PAIRS


def native_bd(q: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    return ops.bd(q, k, eps)[0]


register_backend(Backend("cpu", ("cpu",), native_emd, native_mmd, native_bd, **op_library_stages(ops)))
if ops.emd_pair.default.has_kernel_for_dispatch_key("CUDA"):
    register_backend(Backend("cuda", ("cuda",), native_emd, native_mmd, native_bd, **op_library_stages(ops)))
else:
    mark_unavailable("cuda", "rcl_ops._C was built without CUDA kernels")
