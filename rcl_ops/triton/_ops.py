"""Custom ops of the "triton" backend, their fake kernels and autograd, and the backend itself.

The ops live in their own namespace, ``rcl_ops_triton::`` (tests/test_native.py requires an
opcheck sample for every ``rcl_ops::`` op of the native library; tests/test_triton.py checks
these). They are ``torch.library.custom_op``s rather than ``triton_op``s: opaque to
torch.compile (fullgraph traces them through their fake kernels), and they pass opcheck under
TRITON_INTERPRET=1, where triton_op fails the fake-tensor test.
"""

from __future__ import annotations

import torch

from .. import _grid
from .._autograd import register_mmd_grid_autograd, register_sketch_and_pair_autograd
from .._backend import Backend, op_library_stages, register_backend
from .._fakes import register_fake_kernels
from ..ops import MAX_NUM_BINS, warn_if_grid_inaccurate
from . import _kernels
from ._kernels import INTERPRET

NAMESPACE = "rcl_ops_triton"
ops = torch.ops.rcl_ops_triton  # the dispatcher's view of the ops below (used once they are defined)
_FLOATS = (torch.float32, torch.float64)


def _op(name: str, schema: str | None = None):
    """A custom op of the namespace; ``schema`` where the native op's types cannot be inferred
    from annotations (bool[2])."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=schema)


def _check_rows(x: torch.Tensor, op: str, name: str) -> None:
    torch._check(x.dim() == 2, lambda: f"{NAMESPACE}::{op}: {name} must be 2-D, got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"{NAMESPACE}::{op}: {name} must be float32 or float64, got {x.dtype}")


def _check_same(a: torch.Tensor, b: torch.Tensor, op: str, names: str) -> None:
    torch._check(
        a.dtype == b.dtype and a.device == b.device,
        lambda: (
            f"{NAMESPACE}::{op}: {names} must share dtype and device, got {a.dtype}/{a.device} and {b.dtype}/{b.device}"
        ),
    )


def _check_grad(grad: torch.Tensor, rows: int, cols: int, op: str) -> None:
    torch._check(
        grad.dim() == 2 and grad.shape[0] == rows and grad.shape[1] == cols,
        lambda: f"{NAMESPACE}::{op}: grad must have shape ({rows}, {cols}), got {tuple(grad.shape)}",
    )


def _check_vector(x: torch.Tensor, size: int, op: str, name: str) -> None:
    torch._check(
        x.dim() == 1 and x.shape[0] == size,
        lambda: f"{NAMESPACE}::{op}: {name} must have shape ({size},), got {tuple(x.shape)}",
    )


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t in ref's dtype, contiguous (autograd hands over expanded or strided gradients)."""
    return t.to(ref.dtype).contiguous()


# ---- EMD: quantile sketch and pair term ---------------------------------------------------------


@_op("sorted_quantiles")
def sorted_quantiles(x: torch.Tensor, num_quantiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) -> (B, K) mid-level quantiles of each row (the sorted row when K == M) and the
    (B, M) int32 sort order. Sorted by torch.sort (stable); the interpolation is a Triton kernel."""
    _check_rows(x, "sorted_quantiles", "x")
    torch._check(num_quantiles >= 1, lambda: f"{NAMESPACE}::sorted_quantiles: num_quantiles must be positive")
    torch._check(x.shape[1] < 2**31, lambda: f"{NAMESPACE}::sorted_quantiles: at most 2^31 - 1 values per row")
    values, order = torch.sort(x, dim=1, stable=True)
    order = order.to(torch.int32)
    if num_quantiles == x.shape[1]:
        return values, order
    return _kernels.quantile_interpolate(values, num_quantiles), order


@_op("sorted_quantiles_backward")
def sorted_quantiles_backward(grad_quantiles: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, K) gradient of the quantiles -> (B, M) gradient of the values: split onto the two
    order statistics of each quantile and scattered through the sort order in one kernel."""
    _check_rows(grad_quantiles, "sorted_quantiles_backward", "grad_quantiles")
    torch._check(
        order.dim() == 2 and order.shape[0] == grad_quantiles.shape[0] and order.dtype == torch.int32,
        lambda: f"{NAMESPACE}::sorted_quantiles_backward: order must be int32 of shape ({grad_quantiles.shape[0]}, M)",
    )
    return _kernels.quantile_scatter(grad_quantiles.contiguous(), order.contiguous())


def _check_pair(sorted_q, sorted_k, op):
    _check_rows(sorted_q, op, "sorted_q")
    _check_rows(sorted_k, op, "sorted_k")
    _check_same(sorted_q, sorted_k, op, "sorted_q and sorted_k")
    torch._check(
        sorted_q.shape[1] == sorted_k.shape[1],
        lambda: (
            f"{NAMESPACE}::{op}: sorted_q and sorted_k must have the same K, got "
            f"{sorted_q.shape[1]} and {sorted_k.shape[1]}"
        ),
    )


@_op("emd_pair")
def emd_pair(sorted_q: torch.Tensor, sorted_k: torch.Tensor) -> torch.Tensor:
    """D[i, j] = mean_k |sorted_q[i, k] - sorted_k[j, k]|: (Bq, Bk) tiles, looping over K."""
    _check_pair(sorted_q, sorted_k, "emd_pair")
    return _kernels.emd_pair(sorted_q.contiguous(), sorted_k.contiguous())


@_op(
    "emd_pair_backward",
    schema="(Tensor grad, Tensor sorted_q, Tensor sorted_k, bool[2] output_mask) -> (Tensor, Tensor)",
)
def emd_pair_backward(grad, sorted_q, sorted_k, output_mask):
    _check_pair(sorted_q, sorted_k, "emd_pair_backward")
    _check_grad(grad, sorted_q.shape[0], sorted_k.shape[0], "emd_pair_backward")
    return _kernels.emd_pair_backward(
        _like(grad, sorted_q), sorted_q.contiguous(), sorted_k.contiguous(), tuple(output_mask)
    )


# ---- BD: moments and pair term -------------------------------------------------------------------


@_op("moments")
def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) -> float64 mean (B,), unbiased variance (B,): one program per row."""
    _check_rows(x, "moments", "x")
    return _kernels.moments(x.contiguous())


@_op("moments_backward")
def moments_backward(
    grad_mean: torch.Tensor, grad_var: torch.Tensor, x: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    _check_rows(x, "moments_backward", "x")
    for name, t in (("grad_mean", grad_mean), ("grad_var", grad_var), ("mean", mean)):
        _check_vector(t, x.shape[0], "moments_backward", name)
    as64 = [t.to(torch.float64).contiguous() for t in (grad_mean, grad_var, mean)]
    return _kernels.moments_backward(as64[0], as64[1], x.contiguous(), as64[2])


def _check_bd(mean_q, var_q, mean_k, var_k, op):
    torch._check(mean_q.dim() == 1 and mean_k.dim() == 1, lambda: f"{NAMESPACE}::{op}: means must be 1-D")
    torch._check(mean_q.dtype == torch.float64, lambda: f"{NAMESPACE}::{op}: the moments must be float64")
    _check_vector(var_q, mean_q.shape[0], op, "var_q")
    _check_vector(var_k, mean_k.shape[0], op, "var_k")
    for name, t in (("mean_k", mean_k), ("var_q", var_q), ("var_k", var_k)):
        _check_same(mean_q, t, op, f"mean_q and {name}")


@_op("bd_pair")
def bd_pair(
    mean_q: torch.Tensor, var_q: torch.Tensor, mean_k: torch.Tensor, var_k: torch.Tensor, eps: float
) -> torch.Tensor:
    """Eq. 6 between N(mean_q[i], var_q[i]) and N(mean_k[j], var_k[j]), (Bq, Bk) float64 tiles."""
    _check_bd(mean_q, var_q, mean_k, var_k, "bd_pair")
    args = [t.contiguous() for t in (mean_q, var_q, mean_k, var_k)]
    return _kernels.bd_pair(*args, eps)


@_op(
    "bd_pair_backward",
    schema="(Tensor grad, Tensor mean_q, Tensor var_q, Tensor mean_k, Tensor var_k, float eps, "
    "bool[2] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
)
def bd_pair_backward(grad, mean_q, var_q, mean_k, var_k, eps, output_mask):
    _check_bd(mean_q, var_q, mean_k, var_k, "bd_pair_backward")
    _check_grad(grad, mean_q.shape[0], mean_k.shape[0], "bd_pair_backward")
    args = [t.contiguous() for t in (mean_q, var_q, mean_k, var_k)]
    return _kernels.bd_pair_backward(grad.contiguous(), *args, eps, tuple(output_mask))


# ---- MMD: the binned grid ------------------------------------------------------------------------


def _check_grid_point(t: torch.Tensor, x: torch.Tensor, op: str, name: str) -> None:
    torch._check(
        t.dim() == 0 and t.dtype == torch.float64 and t.device == x.device,
        lambda: f"{NAMESPACE}::{op}: {name} must be a 0-dim float64 tensor on {x.device}",
    )


@_op("grid_bin")
def grid_bin(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, num_bins: int) -> torch.Tensor:
    """(B, M) values -> (B, G) float64 weights: mass 1/M per value, split linearly onto the two
    nearest grid points lo + g * step (clamped to the ends)."""
    _check_rows(x, "grid_bin", "x")
    _check_grid_point(lo, x, "grid_bin", "lo")
    _check_grid_point(step, x, "grid_bin", "step")
    torch._check(num_bins >= 2, lambda: f"{NAMESPACE}::grid_bin: num_bins must be at least 2, got {num_bins}")
    return _kernels.grid_bin(x.contiguous(), lo, step, num_bins)


@_op("grid_interpolate")
def grid_interpolate(field: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(B, G) float64 field, (B, M) values -> (B, M) in x's dtype: the field at each value,
    interpolated linearly between grid points."""
    _check_rows(x, "grid_interpolate", "x")
    torch._check(
        field.dim() == 2 and field.shape[0] == x.shape[0] and field.shape[1] >= 2 and field.dtype == torch.float64,
        lambda: f"{NAMESPACE}::grid_interpolate: field must be float64 of shape ({x.shape[0]}, G >= 2)",
    )
    _check_grid_point(lo, x, "grid_interpolate", "lo")
    _check_grid_point(step, x, "grid_interpolate", "step")
    return _kernels.grid_interpolate(field.contiguous(), x.contiguous(), lo, step)


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
    _check_rows(q, op, "q")
    _check_rows(k, op, "k")
    _check_same(q, k, op, "q and k")
    torch._check(
        bandwidths.dim() == 1 and bandwidths.numel() > 0 and bandwidths.device == q.device,
        lambda: f"{NAMESPACE}::{op}: bandwidths must be a non-empty 1-D tensor on {q.device}",
    )
    torch._check(
        2 <= num_bins <= MAX_NUM_BINS,
        lambda: f"{NAMESPACE}::{op}: num_bins must be in [2, {MAX_NUM_BINS}], got {num_bins}",
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
    w_q = _kernels.grid_bin(q, lo, step, num_bins)
    w_k = _kernels.grid_bin(k, lo, step, num_bins)
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
        return _kernels.grid_interpolate(field.contiguous(), x.contiguous(), lo, step)

    return (
        side_gradient(q, w_q, u_q, u_k, g) if output_mask[0] else q.new_empty(0),
        side_gradient(k, w_k, u_k, u_q, g.t()) if output_mask[1] else k.new_empty(0),
    )


@_op("mmd_grid")
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


@_op(
    "mmd_grid_backward",
    schema="(Tensor grad, Tensor q, Tensor k, Tensor bandwidths, Tensor grid, Tensor w_q, Tensor w_k, "
    "int num_bins, bool unbiased, bool[2] output_mask) -> (Tensor, Tensor)",
)
def mmd_grid_backward(grad, q, k, bandwidths, grid, w_q, w_k, num_bins, unbiased, output_mask):
    _check_mmd(q, k, bandwidths, num_bins, unbiased, "mmd_grid_backward")
    _check_grad(grad, q.shape[0], k.shape[0], "mmd_grid_backward")
    _check_grid_state(grid, w_q, w_k, q, k, num_bins, "mmd_grid_backward")
    return mmd_grid_backward_impl(grad, q, k, bandwidths, grid, w_q, w_k, num_bins, unbiased, tuple(output_mask))


# ---- fake kernels (rcl_ops/_fakes.py) and autograd, shared with the native ops --------------------

register_fake_kernels(NAMESPACE)
register_sketch_and_pair_autograd(NAMESPACE)
# The native library registers the same rule for rcl_ops::mmd_grid in C++ (csrc/autograd.cpp),
# where it costs no Python on the host per step.
register_mmd_grid_autograd(NAMESPACE)

# Every op of the namespace, for the tests' opcheck coverage.
OPS = (
    sorted_quantiles,
    sorted_quantiles_backward,
    emd_pair,
    emd_pair_backward,
    moments,
    moments_backward,
    bd_pair,
    bd_pair_backward,
    grid_bin,
    grid_interpolate,
    mmd_grid,
    mmd_grid_backward,
)


# ---- the backend ---------------------------------------------------------------------------------


def triton_emd(q: torch.Tensor, k: torch.Tensor, num_quantiles: int | None) -> torch.Tensor:
    num_quantiles = q.shape[1] if num_quantiles is None else num_quantiles
    sorted_q, _ = ops.sorted_quantiles(q, num_quantiles)
    sorted_k, _ = ops.sorted_quantiles(k, num_quantiles)
    return ops.emd_pair(sorted_q, sorted_k)


def triton_mmd(q, k, bandwidths, unbiased: bool, method: str, num_bins: int) -> torch.Tensor:
    if method != "grid":
        raise ValueError(f"the triton backend computes MMD only by the binned grid, not {method!r}")
    distances, grid, _, _ = ops.mmd_grid(q, k, bandwidths, num_bins, unbiased)
    warn_if_grid_inaccurate(grid, bandwidths, num_bins)
    return distances


def triton_bd(q: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    return ops.bd_pair(*ops.moments(q), *ops.moments(k), eps).to(q.dtype)


# CUDA tensors normally; CPU tensors too when kernels run in the interpreter (the tests).
DEVICE_TYPES = ("cpu", "cuda") if INTERPRET else ("cuda",)

register_backend(
    Backend("triton", DEVICE_TYPES, triton_emd, triton_mmd, triton_bd, mmd_methods=("grid",), **op_library_stages(ops))
)
