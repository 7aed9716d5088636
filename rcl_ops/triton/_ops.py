"""Custom ops of the "triton" backend, their fake kernels and autograd, and the backend itself.

The ops live in their own namespace, ``rcl_ops_triton::`` (tests/test_native.py requires an
opcheck sample for every ``rcl_ops::`` op of the native library; tests/test_triton.py checks
these). They are ``torch.library.custom_op``s rather than ``triton_op``s: opaque to
torch.compile (fullgraph traces them through their fake kernels), and they pass opcheck under
TRITON_INTERPRET=1, where triton_op fails the fake-tensor test.
"""

from __future__ import annotations

import torch

from .._autograd import register_sketch_and_pair_autograd
from .._backend import Backend, register_backend
from ..ops import MAX_NUM_BINS
from . import _kernels
from ._kernels import INTERPRET

NAMESPACE = "rcl_ops_triton"
ops = torch.ops.rcl_ops_triton  # the dispatcher's view of the ops below (used once they are defined)
_FLOATS = (torch.float32, torch.float64)


def _op(name: str):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


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


@_op("quantiles")
def quantiles(x: torch.Tensor, num_quantiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) -> (B, K) mid-level quantiles of each row (the sorted row when K == M) and the
    (B, M) sort order. Sorted by torch.sort; the interpolation is a Triton kernel."""
    _check_rows(x, "quantiles", "x")
    torch._check(num_quantiles >= 1, lambda: f"{NAMESPACE}::quantiles: num_quantiles must be positive")
    values, order = torch.sort(x, dim=1)
    if num_quantiles == x.shape[1]:
        return values, order
    return _kernels.quantile_interpolate(values, num_quantiles), order


@quantiles.register_fake
def _(x, num_quantiles):
    _check_rows(x, "quantiles", "x")
    return x.new_empty(x.shape[0], num_quantiles), x.new_empty(x.shape, dtype=torch.long)


@_op("quantiles_backward")
def quantiles_backward(grad_quantiles: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, K) gradient of the quantiles -> (B, M) gradient of the values: split onto the two
    order statistics of each quantile and scattered through the sort order in one kernel."""
    _check_rows(grad_quantiles, "quantiles_backward", "grad_quantiles")
    torch._check(
        order.dim() == 2 and order.shape[0] == grad_quantiles.shape[0] and order.dtype == torch.long,
        lambda: f"{NAMESPACE}::quantiles_backward: order must be int64 of shape ({grad_quantiles.shape[0]}, M)",
    )
    return _kernels.quantile_scatter(grad_quantiles.contiguous(), order.contiguous())


@quantiles_backward.register_fake
def _(grad_quantiles, order):
    return grad_quantiles.new_empty(order.shape)


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


@emd_pair.register_fake
def _(sorted_q, sorted_k):
    _check_pair(sorted_q, sorted_k, "emd_pair")
    return sorted_q.new_empty(sorted_q.shape[0], sorted_k.shape[0])


@_op("emd_pair_backward")
def emd_pair_backward(
    grad: torch.Tensor, sorted_q: torch.Tensor, sorted_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair(sorted_q, sorted_k, "emd_pair_backward")
    _check_grad(grad, sorted_q.shape[0], sorted_k.shape[0], "emd_pair_backward")
    return _kernels.emd_pair_backward(_like(grad, sorted_q), sorted_q.contiguous(), sorted_k.contiguous())


@emd_pair_backward.register_fake
def _(grad, sorted_q, sorted_k):
    return torch.empty_like(sorted_q), torch.empty_like(sorted_k)


# ---- BD: moments and pair term -------------------------------------------------------------------


@_op("moments")
def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) -> mean (B,), unbiased variance (B,): one program per row."""
    _check_rows(x, "moments", "x")
    return _kernels.moments(x.contiguous())


@moments.register_fake
def _(x):
    _check_rows(x, "moments", "x")
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


@_op("moments_backward")
def moments_backward(
    grad_mean: torch.Tensor, grad_var: torch.Tensor, x: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    _check_rows(x, "moments_backward", "x")
    for name, t in (("grad_mean", grad_mean), ("grad_var", grad_var), ("mean", mean)):
        _check_vector(t, x.shape[0], "moments_backward", name)
    return _kernels.moments_backward(_like(grad_mean, x), _like(grad_var, x), x.contiguous(), _like(mean, x))


@moments_backward.register_fake
def _(grad_mean, grad_var, x, mean):
    return torch.empty_like(x)


def _check_bd(mean_q, var_q, mean_k, var_k, op):
    torch._check(mean_q.dim() == 1 and mean_k.dim() == 1, lambda: f"{NAMESPACE}::{op}: means must be 1-D")
    torch._check(mean_q.dtype in _FLOATS, lambda: f"{NAMESPACE}::{op}: mean_q must be float32 or float64")
    _check_vector(var_q, mean_q.shape[0], op, "var_q")
    _check_vector(var_k, mean_k.shape[0], op, "var_k")
    for name, t in (("mean_k", mean_k), ("var_q", var_q), ("var_k", var_k)):
        _check_same(mean_q, t, op, f"mean_q and {name}")


@_op("bd_pair")
def bd_pair(
    mean_q: torch.Tensor, var_q: torch.Tensor, mean_k: torch.Tensor, var_k: torch.Tensor, eps: float
) -> torch.Tensor:
    """Eq. 6 between N(mean_q[i], var_q[i]) and N(mean_k[j], var_k[j]), (Bq, Bk) tiles."""
    _check_bd(mean_q, var_q, mean_k, var_k, "bd_pair")
    args = [t.contiguous() for t in (mean_q, var_q, mean_k, var_k)]
    return _kernels.bd_pair(*args, eps)


@bd_pair.register_fake
def _(mean_q, var_q, mean_k, var_k, eps):
    _check_bd(mean_q, var_q, mean_k, var_k, "bd_pair")
    return mean_q.new_empty(mean_q.shape[0], mean_k.shape[0])


@_op("bd_pair_backward")
def bd_pair_backward(
    grad: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor, mean_k: torch.Tensor, var_k: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_bd(mean_q, var_q, mean_k, var_k, "bd_pair_backward")
    _check_grad(grad, mean_q.shape[0], mean_k.shape[0], "bd_pair_backward")
    args = [t.contiguous() for t in (mean_q, var_q, mean_k, var_k)]
    return _kernels.bd_pair_backward(_like(grad, mean_q), *args, eps)


@bd_pair_backward.register_fake
def _(grad, mean_q, var_q, mean_k, var_k, eps):
    return tuple(torch.empty_like(t) for t in (mean_q, var_q, mean_k, var_k))


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


@grid_bin.register_fake
def _(x, lo, step, num_bins):
    return x.new_empty((x.shape[0], num_bins), dtype=torch.float64)


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


@grid_interpolate.register_fake
def _(field, x, lo, step):
    return torch.empty_like(x)


# The composite below mirrors csrc/mmd_grid.cpp step for step (same grid, centring, FFT sizes
# and float64 GEMMs), with the two per-value kernels (binning, interpolation) in Triton.


def _make_grid(q, k, bandwidths, num_bins):
    """lo and step (0-dim float64) of the grid spanning [min, max] of all values (a span of at
    least 1e-3 of the smallest bandwidth), and the FFT size >= 2 G."""
    lo = torch.minimum(q.min(), k.min()).to(torch.float64)
    hi = torch.maximum(q.max(), k.max()).to(torch.float64)
    span = torch.maximum(hi - lo, 1e-3 * bandwidths.min().to(torch.float64))
    fft_size = 1
    while fft_size < 2 * num_bins:
        fft_size *= 2
    return lo, span / float(num_bins - 1), fft_size


def _kernel_spectrum(step, fft_size, bandwidths, derivative):
    """rfft of sum_h exp(-d^2 / (2 h^2)) (or its derivative in d) at the signed offsets d = n step."""
    n = torch.arange(fft_size, dtype=torch.float64, device=step.device)
    n = torch.where(n < float(fft_size // 2), n, n - float(fft_size))
    diff = (n * step).unsqueeze(1)
    inv_two_h2 = 0.5 / bandwidths.to(torch.float64).square()
    values = torch.exp(-diff.square() * inv_two_h2)
    if derivative:
        values = values * (-2.0 * diff * inv_two_h2)
    return torch.fft.rfft(values.sum(1), fft_size)


def _convolve(w, spectrum, fft_size, num_bins):
    product = torch.fft.rfft(w, fft_size, dim=-1) * spectrum
    return torch.fft.irfft(product, fft_size, dim=-1)[..., :num_bins]


def _centred_weights(q, k, lo, step, num_bins):
    w_q = _kernels.grid_bin(q, lo, step, num_bins)
    w_k = _kernels.grid_bin(k, lo, step, num_bins)
    w_mean = (w_q.sum(0) + w_k.sum(0)) / float(q.shape[0] + k.shape[0])
    return w_q, w_k, w_mean, w_q - w_mean, w_k - w_mean


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


def mmd_grid_forward(q, k, bandwidths, num_bins: int, unbiased: bool) -> torch.Tensor:
    """Binned-grid squared MMD (Bq, Bk), exactly the algorithm of csrc/mmd_grid.cpp."""
    q, k = q.contiguous(), k.contiguous()
    lo, step, fft_size = _make_grid(q, k, bandwidths, num_bins)
    w_q, w_k, w_mean, u_q, u_k = _centred_weights(q, k, lo, step, num_bins)
    spectrum = _kernel_spectrum(step, fft_size, bandwidths, derivative=False)
    v_q = _convolve(u_q, spectrum, fft_size, num_bins)
    v_k = _convolve(u_k, spectrum, fft_size, num_bins)
    self_q, self_k = (u_q * v_q).sum(1), (u_k * v_k).sum(1)
    out = self_q.unsqueeze(1) + self_k.unsqueeze(0) - 2.0 * torch.mm(u_q, v_k.t())
    if unbiased:
        # U-statistic: drop the diagonal k(x, x) = H of each self sum, w^T K w (uncentred).
        v_mean = _convolve(w_mean.unsqueeze(0), spectrum, fft_size, num_bins).squeeze(0)
        mean_self = (w_mean * v_mean).sum()
        num_h = float(bandwidths.numel())
        full_q = self_q + 2.0 * (u_q * v_mean).sum(1) + mean_self
        full_k = self_k + 2.0 * (u_k * v_mean).sum(1) + mean_self
        out = (
            out
            + ((full_q - num_h) / float(q.shape[1] - 1)).unsqueeze(1)
            + ((full_k - num_h) / float(k.shape[1] - 1)).unsqueeze(0)
        )
    return out.to(q.dtype)


def mmd_grid_backward_impl(grad, q, k, bandwidths, num_bins: int, unbiased: bool):
    q, k = q.contiguous(), k.contiguous()
    lo, step, fft_size = _make_grid(q, k, bandwidths, num_bins)
    w_q, w_k, _, u_q, u_k = _centred_weights(q, k, lo, step, num_bins)
    g = grad.to(torch.float64)
    row_sums, col_sums = g.sum(1), g.sum(0)
    # The field of q[i] is K' * (rowsum_i w_i - (grad w_k)_i) times 2 / M (centring cancels).
    coef_q = row_sums.unsqueeze(1) * u_q - torch.mm(g, u_k)
    coef_k = col_sums.unsqueeze(1) * u_k - torch.mm(g.t(), u_q)
    if unbiased:
        coef_q = coef_q + (row_sums / float(q.shape[1] - 1)).unsqueeze(1) * w_q
        coef_k = coef_k + (col_sums / float(k.shape[1] - 1)).unsqueeze(1) * w_k
    spectrum = _kernel_spectrum(step, fft_size, bandwidths, derivative=True)
    field_q = _convolve(coef_q, spectrum, fft_size, num_bins) * (2.0 / float(q.shape[1]))
    field_k = _convolve(coef_k, spectrum, fft_size, num_bins) * (2.0 / float(k.shape[1]))
    return (
        _kernels.grid_interpolate(field_q.contiguous(), q, lo, step),
        _kernels.grid_interpolate(field_k.contiguous(), k, lo, step),
    )


@_op("mmd_grid")
def mmd_grid(q: torch.Tensor, k: torch.Tensor, bandwidths: torch.Tensor, num_bins: int, unbiased: bool) -> torch.Tensor:
    _check_mmd(q, k, bandwidths, num_bins, unbiased, "mmd_grid")
    return mmd_grid_forward(q, k, bandwidths, num_bins, unbiased)


@mmd_grid.register_fake
def _(q, k, bandwidths, num_bins, unbiased):
    _check_mmd(q, k, bandwidths, num_bins, unbiased, "mmd_grid")
    return q.new_empty(q.shape[0], k.shape[0])


@_op("mmd_grid_backward")
def mmd_grid_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, bandwidths: torch.Tensor, num_bins: int, unbiased: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_mmd(q, k, bandwidths, num_bins, unbiased, "mmd_grid_backward")
    _check_grad(grad, q.shape[0], k.shape[0], "mmd_grid_backward")
    return mmd_grid_backward_impl(grad, q, k, bandwidths, num_bins, unbiased)


@mmd_grid_backward.register_fake
def _(grad, q, k, bandwidths, num_bins, unbiased):
    return torch.empty_like(q), torch.empty_like(k)


# ---- autograd (the sketch and pair ops' is shared with the native ops) -------------------------

register_sketch_and_pair_autograd(NAMESPACE, quantiles_op="quantiles")


def _mmd_grid_setup(ctx, inputs, output):
    q, k, bandwidths, ctx.num_bins, ctx.unbiased = inputs
    ctx.save_for_backward(q, k, bandwidths)


def _mmd_grid_grad(ctx, grad):
    # The bandwidths (and the grid) are constants: no gradient, as documented.
    q, k, bandwidths = ctx.saved_tensors
    grad_q, grad_k = ops.mmd_grid_backward(grad, q, k, bandwidths, ctx.num_bins, ctx.unbiased)
    return grad_q, grad_k, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::mmd_grid", _mmd_grid_grad, setup_context=_mmd_grid_setup)

# Every op of the namespace, for the tests' opcheck coverage.
OPS = (
    quantiles,
    quantiles_backward,
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
    sorted_q, _ = ops.quantiles(q, num_quantiles)
    sorted_k, _ = ops.quantiles(k, num_quantiles)
    return ops.emd_pair(sorted_q, sorted_k)


def triton_mmd(q, k, bandwidths, unbiased: bool, method: str, num_bins: int) -> torch.Tensor:
    if method != "grid":
        raise ValueError(f"the triton backend computes MMD only by the binned grid, not {method!r}")
    return ops.mmd_grid(q, k, bandwidths, num_bins, unbiased)


def triton_bd(q: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    return ops.bd_pair(*ops.moments(q), *ops.moments(k), eps)


# CUDA tensors normally; CPU tensors too when kernels run in the interpreter (the tests).
DEVICE_TYPES = ("cpu", "cuda") if INTERPRET else ("cuda",)

register_backend(Backend("triton", DEVICE_TYPES, triton_emd, triton_mmd, triton_bd, mmd_methods=("grid",)))
