"""The binned-grid MMD of the "triton" backend: the algorithm of csrc/mmd_grid.cpp composed in
Python from Triton kernels (linear binning in fixed point with int64 atomics, so the weights are
the same bit for bit whatever the order of the additions; interpolation of the gradient field)
and torch.fft / float64 GEMMs (rcl_ops/_grid.py), as ``rcl_ops_triton::`` custom ops.
Only method="grid".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _grid
from .._checks import MAX_GRID_VALUES, MAX_NUM_BINS
from ..ops import checked_default_bandwidth, warn_if_grid_inaccurate
from ._common import (
    ELEMENT_BLOCK,
    NAMESPACE,
    check_grad,
    check_rows,
    check_same,
    custom_op,
    on_tensor_device,
    ops,
    row_block,
)

# ---- binned-grid MMD: linear binning and interpolation --------------------------------------------


@triton.jit
def _grid_position(x, lo, step, num_bins):
    # grid_position of math.h in fp64: u = (x - lo) / step clamped to [0, G - 1]; the lower
    # bin (at most G - 2) and the weight of the upper one.
    inv_step = 1.0 / step
    u = (x.to(tl.float64) - lo) * inv_step
    u = tl.minimum(tl.maximum(u, 0.0), tl.zeros_like(u) + (num_bins - 1))
    lower = tl.minimum(u.to(tl.int64), num_bins - 2)
    return lower, u - lower.to(tl.float64)


def fixed_point_bits(count: int) -> int:
    """S of math.h's fixed_point_bits: each value's unit mass is 2^S integer units, with
    M 2^S < 2^63 (int64 sums) and S <= 52 (exact rounding of w 2^S)."""
    return min(52, 63 - count.bit_length())


@triton.jit
def _grid_bin_kernel(x_ptr, lo_ptr, step_ptr, units_ptr, count, num_bins, unit, blocks_per_row, BLOCK: tl.constexpr):
    # math.h's fixed_point_split: upper = round(w 2^S), lower = 2^S - upper units (unit = 2^S
    # an int), added by int64 atomics (units zeroed): integer sums do not depend on their order.
    row, offs, mask = row_block(blocks_per_row, count, BLOCK)
    x = tl.load(x_ptr + row * count + offs, mask=mask, other=0.0)
    lower, weight = _grid_position(x, tl.load(lo_ptr), tl.load(step_ptr), num_bins)
    upper_units = (weight * unit + 0.5).to(tl.int64)  # w 2^S exact; >= 0: truncation is the floor
    units_row = units_ptr + row * num_bins
    # relaxed: only the sums matter, no ordering with other memory (the default is acq_rel)
    tl.atomic_add(units_row + lower, unit - upper_units, mask=mask, sem="relaxed")
    tl.atomic_add(units_row + lower + 1, upper_units, mask=mask, sem="relaxed")


@triton.jit
def _units_to_weights_kernel(units_ptr, weights_ptr, total, count, unit, BLOCK: tl.constexpr):
    # math.h's fixed_point_weight, units / (M 2^S) in fp64, as (units / M) / 2^S: the same
    # rounding, and no float argument (Triton passes those as fp32). weights may alias units.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    units = tl.load(units_ptr + offs, mask=mask, other=0)
    tl.store(weights_ptr + offs, units.to(tl.float64) / count / unit, mask=mask)


@on_tensor_device
def _launch_grid_bin(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, num_bins: int) -> torch.Tensor:
    rows, count = x.shape
    if count == 0:
        return torch.zeros((rows, num_bins), dtype=torch.float64, device=x.device)
    bits = fixed_point_bits(count)
    units = torch.zeros((rows, num_bins), dtype=torch.int64, device=x.device)
    blocks = triton.cdiv(count, ELEMENT_BLOCK)
    _grid_bin_kernel[(rows * blocks,)](x, lo, step, units, count, num_bins, 1 << bits, blocks, BLOCK=ELEMENT_BLOCK)
    weights = units.view(torch.float64)  # converted in place: each element is read, then written
    total = rows * num_bins
    _units_to_weights_kernel[(triton.cdiv(total, ELEMENT_BLOCK),)](
        units, weights, total, count, 1 << bits, BLOCK=ELEMENT_BLOCK
    )
    return weights


@triton.jit
def _grid_interpolate_kernel(
    field_ptr, x_ptr, lo_ptr, step_ptr, out_ptr, count, num_bins, blocks_per_row, BLOCK: tl.constexpr
):
    row, offs, mask = row_block(blocks_per_row, count, BLOCK)
    x = tl.load(x_ptr + row * count + offs, mask=mask, other=0.0)
    lower, weight = _grid_position(x, tl.load(lo_ptr), tl.load(step_ptr), num_bins)
    field_row = field_ptr + row * num_bins
    f_lower = tl.load(field_row + lower, mask=mask, other=0.0)
    f_upper = tl.load(field_row + lower + 1, mask=mask, other=0.0)
    value = f_lower * (1.0 - weight) + f_upper * weight
    tl.store(out_ptr + row * count + offs, value.to(out_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def _launch_grid_interpolate(
    field: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    rows, count = x.shape
    num_bins = field.shape[1]
    out = torch.empty_like(x)
    blocks = triton.cdiv(count, ELEMENT_BLOCK)
    _grid_interpolate_kernel[(rows * blocks,)](field, x, lo, step, out, count, num_bins, blocks, BLOCK=ELEMENT_BLOCK)
    return out


# ---- the custom ops ----------------------------------------------------------------------------------


def _check_grid_point(t: torch.Tensor, x: torch.Tensor, op: str, name: str) -> None:
    torch._check(
        t.dim() == 0 and t.dtype == torch.float64 and t.device == x.device,
        lambda: f"{NAMESPACE}::{op}: {name} must be a 0-dim float64 tensor on {x.device}",
    )


@custom_op("grid_bin")
def grid_bin(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, num_bins: int) -> torch.Tensor:
    """(B, M) values -> (B, G) float64 weights: mass 1/M per value, split linearly onto the two
    nearest grid points lo + g * step (clamped to the ends), in fixed point (bit-reproducible)."""
    check_rows(x, "grid_bin", "x")
    _check_grid_point(lo, x, "grid_bin", "lo")
    _check_grid_point(step, x, "grid_bin", "step")
    torch._check(num_bins >= 2, lambda: f"{NAMESPACE}::grid_bin: num_bins must be at least 2, got {num_bins}")
    torch._check(
        x.shape[1] <= MAX_GRID_VALUES,
        lambda: f"{NAMESPACE}::grid_bin: at most {MAX_GRID_VALUES} values per row fit the fixed-point binning",
    )
    return _launch_grid_bin(x.contiguous(), lo, step, num_bins)


@custom_op("grid_interpolate")
def grid_interpolate(field: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(B, G) float64 field, (B, M) values -> (B, M) in x's dtype: the field at each value,
    interpolated linearly between grid points."""
    check_rows(x, "grid_interpolate", "x")
    torch._check(
        field.dim() == 2 and field.shape[0] == x.shape[0] and field.shape[1] >= 2 and field.dtype == torch.float64,
        lambda: f"{NAMESPACE}::grid_interpolate: field must be float64 of shape ({x.shape[0]}, G >= 2)",
    )
    _check_grid_point(lo, x, "grid_interpolate", "lo")
    _check_grid_point(step, x, "grid_interpolate", "step")
    return _launch_grid_interpolate(field.contiguous(), x.contiguous(), lo, step)


# The composite below mirrors csrc/mmd_grid.cpp step for step (same grid, centring, FFT sizes
# and float64 GEMMs), with the two per-value kernels (binning, interpolation) in Triton.


def _make_grid(q, k, bandwidths, num_bins):
    """lo and step (0-dim float64) of the grid spanning [min, max] of all values (a span of at
    least 1e-3 of the smallest bandwidth), and the FFT size >= 2 G."""
    lo = torch.minimum(q.min(), k.min()).to(torch.float64)
    hi = torch.maximum(q.max(), k.max()).to(torch.float64)
    span = torch.maximum(hi - lo, 1e-3 * bandwidths.min().to(torch.float64))
    return lo, span / float(num_bins - 1), _grid.fft_size(num_bins)


def _check_mmd(q, k, bandwidths, num_bins, unbiased, op):
    check_rows(q, op, "q")
    check_rows(k, op, "k")
    check_same(q, k, op, "q and k")
    torch._check(
        bandwidths.dim() == 1 and bandwidths.numel() > 0 and bandwidths.device == q.device,
        lambda: f"{NAMESPACE}::{op}: bandwidths must be a non-empty 1-D tensor on {q.device}",
    )
    torch._check(
        2 <= num_bins <= MAX_NUM_BINS,
        lambda: f"{NAMESPACE}::{op}: num_bins must be in [2, {MAX_NUM_BINS}], got {num_bins}",
    )
    torch._check(
        max(q.shape[1], k.shape[1]) <= MAX_GRID_VALUES,
        lambda: f"{NAMESPACE}::{op}: at most {MAX_GRID_VALUES} values per row fit the fixed-point binning",
    )
    torch._check(
        not unbiased or (q.shape[1] > 1 and k.shape[1] > 1),
        lambda: f"{NAMESPACE}::{op}: the unbiased estimator needs at least 2 values per residual",
    )


def mmd_grid_forward(q, k, bandwidths, num_bins: int, unbiased: bool):
    """Binned-grid squared MMD (Bq, Bk), exactly the algorithm of csrc/mmd_grid.cpp, with its
    grid [lo, step] and the float64 binned weights of q and k (for the backward)."""
    q, k = q.contiguous(), k.contiguous()
    lo, step, size = _make_grid(q, k, bandwidths, num_bins)
    w_q = _launch_grid_bin(q, lo, step, num_bins)
    w_k = _launch_grid_bin(k, lo, step, num_bins)
    spectrum = _grid.kernel_spectrum(step, size, bandwidths)
    out = _grid.grid_mmd(w_q, w_k, spectrum, size, (q.shape[1], k.shape[1]), bandwidths.numel(), unbiased)
    return out.to(q.dtype), torch.stack([lo, step]), w_q, w_k


def mmd_grid_backward_impl(grad, q, k, bandwidths, grid, w_q, w_k, num_bins: int, unbiased: bool, output_mask):
    """Gradients of sum(grad * D) for q and k (each only where output_mask asks), as in
    csrc/mmd_grid.cpp: per side, the coefficients against both batches' weights, convolved
    with the kernel derivative into a field, interpolated at its values."""
    lo, step = grid[0], grid[1]
    size = _grid.fft_size(num_bins)
    _, u_q, u_k = _grid.centred_weights(w_q, w_k)
    g = grad.to(torch.float64)
    spectrum = _grid.kernel_spectrum(step, size, bandwidths, derivative=True)

    def side_gradient(x, w_x, u_x, u_other, g_x):
        # The field of x[i] is K' * (rowsum_i w_i - (g w_other)_i) times 2 / M (centring cancels).
        sums = g_x.sum(1)
        coef = sums.unsqueeze(1) * u_x - torch.mm(g_x, u_other)
        if unbiased:
            coef = coef + (sums / float(x.shape[1] - 1)).unsqueeze(1) * w_x
        field = _grid.convolve(coef, spectrum, size) * (2.0 / float(x.shape[1]))
        return _launch_grid_interpolate(field.contiguous(), x.contiguous(), lo, step)

    return (
        side_gradient(q, w_q, u_q, u_k, g) if output_mask[0] else q.new_empty(0),
        side_gradient(k, w_k, u_k, u_q, g.t()) if output_mask[1] else k.new_empty(0),
    )


@custom_op("mmd_grid")
def mmd_grid(
    q: torch.Tensor, k: torch.Tensor, bandwidths: torch.Tensor, num_bins: int, unbiased: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_mmd(q, k, bandwidths, num_bins, unbiased, "mmd_grid")
    return mmd_grid_forward(q, k, bandwidths, num_bins, unbiased)


def _check_grid_state(grid, w_q, w_k, q, k, num_bins, op):
    torch._check(
        grid.shape == (2,) and grid.dtype == torch.float64,
        lambda: f"{NAMESPACE}::{op}: grid must be a float64 tensor of shape (2,)",
    )
    for name, w, rows in (("w_q", w_q, q.shape[0]), ("w_k", w_k, k.shape[0])):
        torch._check(
            w.shape == (rows, num_bins) and w.dtype == torch.float64,
            lambda name=name, rows=rows: f"{NAMESPACE}::{op}: {name} must be float64 of shape ({rows}, {num_bins})",
        )


@custom_op(
    "mmd_grid_backward",
    schema="(Tensor grad, Tensor q, Tensor k, Tensor bandwidths, Tensor grid, Tensor w_q, Tensor w_k, "
    "int num_bins, bool unbiased, bool[2] output_mask) -> (Tensor, Tensor)",
)
def mmd_grid_backward(grad, q, k, bandwidths, grid, w_q, w_k, num_bins, unbiased, output_mask):
    _check_mmd(q, k, bandwidths, num_bins, unbiased, "mmd_grid_backward")
    check_grad(grad, q.shape[0], k.shape[0], "mmd_grid_backward")
    _check_grid_state(grid, w_q, w_k, q, k, num_bins, "mmd_grid_backward")
    return mmd_grid_backward_impl(grad, q, k, bandwidths, grid, w_q, w_k, num_bins, unbiased, tuple(output_mask))


OPS = (grid_bin, grid_interpolate, mmd_grid, mmd_grid_backward)


def triton_mmd(q, k, bandwidths, unbiased: bool, method: str, num_bins: int) -> torch.Tensor:
    """The backend's MMD: the binned grid (no other method)."""
    if method != "grid":
        raise ValueError(f"the triton backend computes MMD only by the binned grid, not {method!r}")
    if bandwidths is None:
        bandwidths = checked_default_bandwidth(q, k, "pairwise_mmd")
    distances, grid, _, _ = ops.mmd_grid(q, k, bandwidths, num_bins, unbiased)
    warn_if_grid_inaccurate(grid, bandwidths, num_bins)
    return distances
