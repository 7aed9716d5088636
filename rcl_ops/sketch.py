"""Sketches: the per-residual summaries that every distance pairs (sketch, then pair).

Each distance reduces a residual of M values to a short sketch, and its (Bq, Bk) matrix
needs only the sketches, so sketches can be cached, gathered across ranks and queued:

- EMD: the K mid-level quantiles (K = M: the sorted values, exact EMD), x's dtype, (B, K).
- BD: float64 [mean, unbiased variance], (B, 2).
- MMD: float64 linear-binning weights on a fixed grid of G points spanning ``value_range``
  (each row sums to 1), (B, G). The kernel (and so the bandwidth) is applied when pairing.

Sketches are differentiable: gradients flow from the pair back to the residual values (for
MMD through the binning, see ``mmd_sketch``). ``pairwise_emd``/``pairwise_mmd``/``pairwise_bd``
pair two Sketch objects (or a sketch and a residual batch, which is sketched alike).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import _grid
from ._autograd import no_second_derivative
from ._backend import resolve_backend
from ._checks import DEFAULT_NUM_BINS, as_rows, check_all_finite, check_residuals, checked_options, compute_dtype


@dataclass(frozen=True, eq=False)
class Sketch:
    """A batch of B residual sketches: ``values`` (B, S) and the layout needed to pair them.

    distance: "emd", "mmd" or "bd"; num_values: M, the values per residual sketched;
    num_quantiles: K for EMD (None: the M sorted values); value_range: the MMD grid's (lo, hi);
    dtype: the residuals' compute dtype, in which pairs return their distances.
    """

    distance: str
    values: torch.Tensor
    num_values: int
    dtype: torch.dtype
    num_quantiles: int | None = None
    value_range: tuple[float, float] | None = None

    @property
    def pair_layout(self) -> tuple:
        """What two sketches must share to be paired: the distance and the sketch size, plus the
        values' dtype for EMD and the grid for MMD."""
        if self.distance == "emd":
            return ("emd", self.values.shape[1], self.values.dtype)
        if self.distance == "mmd":
            return ("mmd", self.values.shape[1], self.value_range)
        return ("bd",)

    @property
    def layout(self) -> tuple:
        """What sketches must share to be concatenated or queued together: their pair layout, plus M
        for MMD (the U-statistic of a row needs its M; for exact EMD the size is M)."""
        return self.pair_layout + ((self.num_values,) if self.distance == "mmd" else ())

    def __len__(self) -> int:
        return self.values.shape[0]

    def with_values(self, values: torch.Tensor) -> Sketch:
        """The same layout holding other rows (e.g. gathered or queued ones)."""
        return replace(self, values=values)

    def detach(self) -> Sketch:
        return self.with_values(self.values.detach())

    @staticmethod
    def cat(sketches: list[Sketch]) -> Sketch:
        """Rows of several sketches of one layout, in order (ValueError naming a mismatch)."""
        if not sketches:
            raise ValueError("Sketch.cat needs at least one sketch, got none")
        first = sketches[0]
        for other in sketches[1:]:
            check_same_layout(first, other, "Sketch.cat")
        if len(sketches) == 1:
            return first
        return first.with_values(torch.cat([s.values for s in sketches]))


def describe_layout(sketch: Sketch) -> str:
    """The sketch's layout in words, with its article ("an EMD sketch of 16 quantiles (K, ...)")."""
    if sketch.distance == "emd":
        size = "exact, M" if sketch.num_quantiles is None else "K"
        return f"an EMD sketch of {sketch.values.shape[1]} quantiles ({size}, {sketch.values.dtype})"
    if sketch.distance == "mmd":
        return (
            f"an MMD sketch of {sketch.values.shape[1]} bins on value_range {sketch.value_range} "
            f"(M = {sketch.num_values})"
        )
    return "a BD sketch (mean, variance)"


def check_same_layout(a: Sketch, b: Sketch, where: str, pairing: bool = False) -> None:
    """ValueError naming both layouts when a and b cannot be concatenated (or, ``pairing``, paired)."""
    if (a.pair_layout != b.pair_layout) if pairing else (a.layout != b.layout):
        hint = ""
        if a.distance == b.distance == "emd" and (a.num_quantiles is None or b.num_quantiles is None):
            hint = "; exact EMD sketches hold all M sorted values: pass num_quantiles=K for a fixed size"
        elif a.distance == b.distance == "mmd":
            hint = "; MMD sketches pair only on one grid: sketch both with the same value_range and num_bins"
        raise ValueError(f"{where}: cannot combine {describe_layout(a)} with {describe_layout(b)}{hint}")


def check_sketch_options(sketch: Sketch, name: str, where: str, **options) -> None:
    """ValueError where an option given with a sketch (num_quantiles, value_range, num_bins) is not
    the one the sketch ``name`` was made with: it would be silently ignored."""
    held = {
        "num_quantiles": sketch.num_quantiles,
        "value_range": sketch.value_range,
        "num_bins": sketch.values.shape[1] if sketch.distance == "mmd" else None,
    }
    for option, value in options.items():
        if held[option] != value:
            raise ValueError(
                f"{where}: {option}={value!r} but {name} is {describe_layout(sketch)}; "
                f"pass the sketch's {option}, or leave it out"
            )


def _prepare_rows(x: torch.Tensor, where: str) -> torch.Tensor:
    """Validate a residual batch and flatten it to (B, M) in the compute dtype."""
    check_residuals(x, "x", where)
    check_all_finite({"x": x}, where)
    return as_rows(x, compute_dtype(x))


# ---- EMD -----------------------------------------------------------------------------------


@checked_options("x")
def emd_sketch(x: torch.Tensor, *, num_quantiles: int | None = None, backend: str = "auto") -> Sketch:
    """EMD sketch of (B, ...) residuals: the K mid-level quantiles Q(t_m), t_m = (m + 0.5) / K,
    of each residual's M values, (B, K) (K = None: the M sorted values, for exact EMD).
    Differentiable (the gradient returns through the sort order)."""
    where = "emd_sketch"
    x2 = _prepare_rows(x, where)
    size = x2.shape[1] if num_quantiles is None else num_quantiles
    values = resolve_backend(backend, x2.device, where).sorted_quantiles(x2, size)
    return Sketch("emd", values, x2.shape[1], x2.dtype, num_quantiles=num_quantiles)


def pair_emd(sketch_q: Sketch, sketch_k: Sketch, backend: str = "auto") -> torch.Tensor:
    """D[i, j] = mean_m |Q_i(t_m) - Q_j(t_m)|, (Bq, Bk), from two EMD sketches of one layout."""
    where = "pairwise_emd"
    check_same_layout(sketch_q, sketch_k, where, pairing=True)
    dtype = torch.promote_types(sketch_q.dtype, sketch_k.dtype)
    values_dtype = torch.promote_types(sketch_q.values.dtype, sketch_k.values.dtype)
    a, b = sketch_q.values.to(values_dtype), sketch_k.values.to(values_dtype)
    return resolve_backend(backend, sketch_q.values.device, where).emd_pair(a, b).to(dtype)


# ---- BD ------------------------------------------------------------------------------------


@checked_options("x")
def bd_sketch(x: torch.Tensor, *, backend: str = "auto") -> Sketch:
    """BD sketch of (B, ...) residuals: float64 [mean, unbiased variance] per residual, (B, 2)."""
    where = "bd_sketch"
    x2 = _prepare_rows(x, where)
    if x2.shape[1] < 2:
        raise ValueError(f"{where}: the sample variance needs at least 2 values per residual")
    mean, var = resolve_backend(backend, x2.device, where).moments(x2)
    return Sketch("bd", torch.stack((mean, var), dim=1), x2.shape[1], x2.dtype)


def pair_bd(sketch_q: Sketch, sketch_k: Sketch, eps: float, backend: str = "auto") -> torch.Tensor:
    """Eq. 6 between the Gaussians of two BD sketches, (Bq, Bk)."""
    where = "pairwise_bd"
    check_same_layout(sketch_q, sketch_k, where, pairing=True)
    dtype = torch.promote_types(sketch_q.dtype, sketch_k.dtype)
    mean_q, var_q = sketch_q.values.unbind(1)
    mean_k, var_k = sketch_k.values.unbind(1)
    moments = [t.contiguous() for t in (mean_q, var_q, mean_k, var_k)]
    return resolve_backend(backend, sketch_q.values.device, where).bd_pair(*moments, eps).to(dtype)


# ---- MMD -----------------------------------------------------------------------------------


def grid_positions(x: torch.Tensor, lo: float, step: float, num_bins: int):
    """Lower bin index (B, M) int64 and the weight of the upper bin, float64, of each value on the
    grid lo + g * step, g < num_bins (values beyond it are clamped onto its ends)."""
    position = ((x.double() - lo) / step).clamp(0.0, num_bins - 1.0)
    lower = position.floor().clamp(max=num_bins - 2)
    return lower.long(), position - lower


class _BinValues(torch.autograd.Function):
    """Linear binning of each row onto the grid (mass 1/M per value). The backward treats the
    incoming gradient F (B, G) as samples of a smooth field and returns dF/dx / M at each value:
    the central difference of F, interpolated linearly (the gradient of a binned estimate is
    piecewise constant; its smooth limit is what the grid MMD's own backward uses too)."""

    @staticmethod
    def forward(ctx, x, lo: float, step: float, num_bins: int):
        lower, upper_weight = grid_positions(x, lo, step, num_bins)
        rows, count = x.shape
        flat = lower + torch.arange(rows, device=x.device).unsqueeze(1) * num_bins
        mass = 1.0 / count
        # index_add_, not bincount: the same sums in the same order, and a size that does not depend
        # on the data (torch.compile traces it).
        weights = torch.zeros(rows * num_bins, dtype=torch.float64, device=x.device)
        weights.index_add_(0, flat.flatten(), ((1.0 - upper_weight) * mass).flatten())
        weights.index_add_(0, (flat + 1).flatten(), (upper_weight * mass).flatten())
        ctx.save_for_backward(x)
        ctx.grid = (lo, step, num_bins)
        return weights.view(rows, num_bins)

    @staticmethod
    @no_second_derivative("the MMD sketch's binning (mmd_sketch, pairwise_mmd with value_range)")
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        lo, step, num_bins = ctx.grid
        slope = torch.gradient(grad.double(), spacing=step, dim=1)[0]
        lower, upper_weight = grid_positions(x, lo, step, num_bins)
        at_lower = slope.gather(1, lower)
        at_upper = slope.gather(1, lower + 1)
        grad_x = (at_lower + (at_upper - at_lower) * upper_weight) / x.shape[1]
        return grad_x.to(x.dtype), None, None, None


@checked_options("x")
def mmd_sketch(x: torch.Tensor, *, value_range: tuple[float, float], num_bins: int = DEFAULT_NUM_BINS) -> Sketch:
    """MMD sketch of (B, ...) residuals: float64 linear-binning weights (B, G) of each residual's
    values on the G = ``num_bins`` points lo + g (hi - lo) / (G - 1) of ``value_range`` = (lo, hi)
    (values outside it count at its ends). A fixed range is what lets sketches of other
    batches, ranks and steps be paired; the grid MMD's accuracy needs a step of at most ~0.025
    of the bandwidth (pairwise_mmd). Torch ops on any device (no backend choice)."""
    where = "mmd_sketch"
    if value_range is None:
        raise TypeError(f"{where}: value_range must be a pair (lo, hi) of floats, got None")
    x2 = _prepare_rows(x, where)
    lo, hi = value_range
    num_bins = DEFAULT_NUM_BINS if num_bins is None else num_bins
    weights = _BinValues.apply(x2, lo, (hi - lo) / (num_bins - 1), num_bins)
    return Sketch("mmd", weights, x2.shape[1], x2.dtype, value_range=(lo, hi))


def sketch_bandwidth(sketch_q: Sketch, sketch_k: Sketch) -> torch.Tensor:
    """The default bandwidth from MMD sketches: the pooled std of the binned values (the grid
    points weighted by w; linear binning keeps the mean and adds at most step^2 / 4 to the
    variance), float64 (1,), detached; 1 where all the mass is on one grid point (0 where the
    squares underflow float64: a grid of step ~1e-200)."""
    with torch.no_grad():
        lo, hi = sketch_q.value_range
        num_bins = sketch_q.values.shape[1]
        device = sketch_q.values.device
        points = torch.linspace(lo, hi, num_bins, dtype=torch.float64, device=device)
        weights = torch.cat([sketch_q.values * sketch_q.num_values, sketch_k.values * sketch_k.num_values]).sum(0)
        weights = weights / weights.sum()
        mean = (weights * points).sum()
        std = (weights * (points - mean).square()).sum().sqrt()
        index = torch.arange(num_bins, dtype=torch.float64, device=device)
        one_point = (weights * (index - (weights * index).sum()).square()).sum() == 0
        return torch.where(one_point, torch.ones_like(std), std).reshape(1)


def pair_mmd(sketch_q: Sketch, sketch_k: Sketch, bandwidths: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Squared MMD (Bq, Bk) from two MMD sketches on one grid (rcl_ops._grid.grid_mmd: the
    kernel as a convolution on the grid, centred float64 GEMMs; V- or U-statistic)."""
    check_same_layout(sketch_q, sketch_k, "pairwise_mmd", pairing=True)
    w_q, w_k = sketch_q.values, sketch_k.values
    num_bins = w_q.shape[1]
    lo, hi = sketch_q.value_range
    size = _grid.fft_size(num_bins)
    spectrum = _grid.kernel_spectrum((hi - lo) / (num_bins - 1), size, bandwidths.to(w_q.device))
    counts = (sketch_q.num_values, sketch_k.num_values)
    out = _grid.grid_mmd(w_q, w_k, spectrum, size, counts, bandwidths.numel(), unbiased)
    return out.to(torch.promote_types(sketch_q.dtype, sketch_k.dtype))
