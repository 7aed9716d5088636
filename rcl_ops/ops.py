"""Public pairwise distance functions between batches of residuals."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ._backend import Backend, resolve_backend
from ._checks import (
    DEFAULT_NUM_BINS,
    MAX_NUM_BINS,
    check_default_bandwidth,
    check_pair,
    check_result,
    checked_options,
    host_checks_on,
    prepare_pair,
)
from .sketch import (
    Sketch,
    bd_sketch,
    check_same_layout,
    check_sketch_options,
    emd_sketch,
    mmd_sketch,
    pair_bd,
    pair_emd,
    pair_mmd,
    sketch_bandwidth,
)

# Cost of one kernel evaluation of the direct sum in grid points (method="auto"): the exact sum
# where DIRECT_SUM_COST M N <= num_bins. On CPU the direct sum's forward+backward is faster than
# the 4096-bin grid's up to M N ~ num_bins at B=64 (benchmarks/results/design-measurements.md).
DIRECT_SUM_COST = 4
# The grid MMD's accuracy (1e-3 relative, gradients' cosine >= 0.999; tests/test_mmd_grid.py)
# is tested up to a grid step of this fraction of the smallest bandwidth (range / h = 100 on
# the default 4096 bins); beyond it a GridAccuracyWarning says so.
GRID_STEP_OVER_BANDWIDTH_TESTED = 0.025


class GridAccuracyWarning(UserWarning):
    """The grid MMD runs where its documented accuracy is not tested: see pairwise_mmd."""


def _sketch_pair(q, k, distance: str, where: str, sketch_like, first=None, **options) -> tuple[Sketch, Sketch] | None:
    """(sketch_q, sketch_k) when q or k is a Sketch, or when ``first`` sketches a residual batch q;
    None for two residual batches. Residuals beside a sketch are sketched by ``sketch_like(x,
    sketch)``; the ``options`` given (not None) must agree with the sketches' layouts."""
    given = {name: value for name, value in options.items() if value is not None}
    for name, s in (("q", q), ("k", k)):
        if isinstance(s, Sketch):
            if s.distance != distance:
                raise ValueError(
                    f"{where}: {name} is a {s.distance} sketch; pass {distance} sketches (rcl_ops.{distance}_sketch)"
                )
            check_sketch_options(s, name, where, **given)
    if not isinstance(q, Sketch) and not isinstance(k, Sketch):
        if first is None:
            return None
        q = first(q)
    q = q if isinstance(q, Sketch) else sketch_like(q, k)
    k = k if isinstance(k, Sketch) else sketch_like(k, q)
    return q, k


@checked_options("q", "k")
def pairwise_emd(
    q: torch.Tensor | Sketch, k: torch.Tensor | Sketch, *, num_quantiles: int | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Earth mover's (1-D Wasserstein-1) distance between residual value distributions.

    q: (Bq, ...), k: (Bk, ...); each residual is the empirical distribution of its values.
    Returns D (Bq, Bk) with D[i, j] = W1(q[i], k[j]).

    With ``num_quantiles=None`` both must hold the same number of values M and the result is
    exact: mean_m |sort(q[i])[m] - sort(k[j])[m]|. With ``num_quantiles=K`` each residual is
    summarised by its quantiles at the mid-levels t = (m + 0.5) / K (linear interpolation
    between order statistics) and D[i, j] = mean_m |Q_i(t_m) - Q_j(t_m)|; K = M is exact.
    float16/bfloat16 inputs are computed (and returned) in float32.

    q and k may also be EMD sketches (``emd_sketch``), or one a sketch and the other residuals
    (sketched with the sketch's K): pairwise_emd(q, k) == pairwise_emd(emd_sketch(q),
    emd_sketch(k)). On residuals the native exact EMD runs both stages as one fused op.
    """
    where = "pairwise_emd"
    sketches = _sketch_pair(
        q,
        k,
        "emd",
        where,
        lambda x, s: emd_sketch(x, num_quantiles=s.num_quantiles, backend=backend),
        num_quantiles=num_quantiles,
    )
    if sketches is not None:
        return check_result(pair_emd(*sketches, backend=backend), where)
    q2, k2 = prepare_pair(q, k, where)
    if num_quantiles is None and q2.shape[1] != k2.shape[1]:
        raise ValueError(
            f"{where}: q has {q2.shape[1]} values per residual but k has {k2.shape[1]}; "
            "exact EMD needs equal counts; pass num_quantiles=K to compare K quantiles"
        )
    return check_result(resolve_backend(backend, q2.device, where).emd(q2, k2, num_quantiles), where)


def value_statistics(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The count of x's values and their float64 [mean, sum of squared deviations, largest absolute
    deviation] (3,), detached. Accumulated in float64 (a norm, no float32 square): values near 1e20
    in float32 (squared deviations near 1e40) still give their finite statistics. The largest
    deviation tells constant values (0) from squares that underflow float64 (values near 1e-200)."""
    with torch.no_grad():
        mean = x.mean(dtype=torch.float64)
        centred = x - mean.to(x.dtype)
        deviations = torch.linalg.vector_norm(centred, dtype=torch.float64).square()
        spread = torch.linalg.vector_norm(centred, ord=math.inf, dtype=torch.float64)
        return x.numel(), torch.stack([mean, deviations, spread])


def pooled_std(counts: list[int], stats: torch.Tensor) -> torch.Tensor:
    """The standard deviation of the union of N groups of values from their counts and (N, 3)
    value_statistics (Chan's combination), float64 (1,); 1 where the values are all equal (0 where
    it underflows float64, NaN where they hold NaN)."""
    weights = torch.tensor(counts, dtype=torch.float64).to(stats.device, non_blocking=True)
    total = float(sum(counts))
    means, deviations, spreads = stats.unbind(1)
    pooled_mean = (weights * means).sum() / total
    std = ((deviations.sum() + (weights * (means - pooled_mean).square()).sum()) / total).sqrt()
    constant = (spreads.amax() == 0) & (means == means[0]).all()
    return torch.where(constant, torch.ones_like(std), std).reshape(1)


def _pooled_std_of(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    (count_q, stats_q), (count_k, stats_k) = value_statistics(q), value_statistics(k)
    return pooled_std([count_q, count_k], torch.stack([stats_q, stats_k]))


def default_bandwidth(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The data-driven MMD bandwidth: the standard deviation of all values of q and k pooled
    (detached, no host sync), or 1 where that is 0. Shape (1,), float64 (accumulated in float64).
    q and k are checked as the distances check them (NaN or Inf: ValueError where the check is on,
    a NaN bandwidth where it is off)."""
    check_pair(q, k, "default_bandwidth")
    return _pooled_std_of(q, k)


def checked_default_bandwidth(q: torch.Tensor, k: torch.Tensor, where: str) -> torch.Tensor:
    """default_bandwidth of the prepared (B, M) q and k, within the range the kernels take
    (check_default_bandwidth): what a backend uses where the caller gave no bandwidth."""
    return check_default_bandwidth(_pooled_std_of(q, k), where)


def _bandwidths(bandwidth: tuple[float, ...] | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The checked ``bandwidth`` option as a float64 tensor (every kernel evaluates the Gaussian in
    float64 whatever the inputs' dtype), or None: the backend computes checked_default_bandwidth."""
    if bandwidth is None:
        return None
    return torch.tensor(bandwidth, dtype=torch.float64, device=q.device)


def warn_if_grid_inaccurate(grid: torch.Tensor, bandwidths: torch.Tensor, num_bins: int) -> None:
    """GridAccuracyWarning when the grid step (``grid`` = [lo, step], as the grid ops return it)
    exceeds the tested fraction of the smallest bandwidth. Called by the backends with the grid
    they built (no extra pass over the data), where the NaN/Inf check runs (no GPU sync else)."""
    if not host_checks_on(grid.device.type, "pairwise_mmd"):
        return
    step = grid[1].item()
    ratio = step / bandwidths.min().item()
    if ratio > GRID_STEP_OVER_BANDWIDTH_TESTED:
        warnings.warn(
            f"pairwise_mmd: the grid step is {ratio:.3g} of the smallest bandwidth (value range "
            f"{step * (num_bins - 1):.3g} over {num_bins} bins), beyond the {GRID_STEP_OVER_BANDWIDTH_TESTED} "
            "where its 1e-3 accuracy is tested; raise num_bins (to "
            f"{min(MAX_NUM_BINS, math.ceil(num_bins * ratio / GRID_STEP_OVER_BANDWIDTH_TESTED))}) "
            "or use method='direct'",
            GridAccuracyWarning,
            stacklevel=5,  # pairwise_mmd's caller: here <- backend <- pairwise_mmd <- its option check <- caller
        )


@checked_options("q", "k")
def pairwise_mmd(
    q: torch.Tensor | Sketch,
    k: torch.Tensor | Sketch,
    *,
    bandwidth: float | Sequence[float] | None = None,
    unbiased: bool = False,
    method: str = "auto",
    num_bins: int | None = None,
    value_range: tuple[float, float] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Squared Gaussian-kernel MMD between residual value distributions.

    q: (Bq, ...) with M values each, k: (Bk, ...) with N values each. Returns D (Bq, Bk),
    D[i, j] = mean k(x, x') + mean k(y, y') - 2 mean k(x, y) over x in q[i], y in k[j]
    (V-statistic; ``unbiased=True`` drops the x = x' and y = y' terms: the U-statistic),
    with k(a, b) = sum_h exp(-(a - b)^2 / (2 h^2)) over the bandwidths h.

    bandwidth: a float, a sequence of floats (sum of kernels), each in [1e-154, 1e154], or None
    for the standard deviation of all values of q and k pooled (detached; 1 if they are all equal).
    method: "direct" is the exact O(M N) sum; "grid" (native backends) bins the values
    linearly onto ``num_bins`` (None: 4096) points spanning the batch's range and applies the
    kernel as a convolution there: O(M + G log G) per residual plus a (Bq, Bk) GEMM over the bins;
    its error grows with (range / h) / num_bins. "auto" is "grid" on the native backends, except
    for residuals so small that the exact sum is cheaper (4 M N <= num_bins, e.g. M = N = 32 with
    the default 4096 bins: the grid pays O(G) per pair whatever M), and "direct" on the
    reference backend. Computed in float32 for half inputs.

    value_range=(lo, hi): the grid spans this fixed range instead of the batch's (values
    outside count at its ends), computed through MMD sketches (torch ops, any device). q and k
    may be MMD sketches (``mmd_sketch``; one of them may be residuals, binned on the other's
    grid; value_range and num_bins, where given, must be the sketches'); with bandwidth=None the
    bandwidth is then the pooled std of the binned values.
    """
    where = "pairwise_mmd"
    grid = DEFAULT_NUM_BINS if num_bins is None else num_bins
    sketches = _sketch_pair(
        q,
        k,
        "mmd",
        where,
        lambda x, s: mmd_sketch(x, value_range=s.value_range, num_bins=s.values.shape[1]),
        None if value_range is None else lambda x: mmd_sketch(x, value_range=value_range, num_bins=grid),
        value_range=value_range,
        num_bins=num_bins,
    )
    if sketches is not None:
        return pair_mmd_sketches(*sketches, bandwidth, unbiased, method, where)
    q2, k2 = prepare_pair(q, k, where)
    if unbiased and min(q2.shape[1], k2.shape[1]) < 2:
        raise ValueError(f"{where}: the unbiased estimator needs at least 2 values per residual")
    impl = resolve_backend(backend, q2.device, where)
    method = _mmd_method(impl, method, q2.shape[1] * k2.shape[1], grid, where)
    bandwidths = _bandwidths(bandwidth, q2, k2)
    return check_result(impl.mmd(q2, k2, bandwidths, unbiased, method, grid), where)


def pair_mmd_sketches(
    sketch_q: Sketch, sketch_k: Sketch, bandwidth, unbiased: bool, method: str, where: str
) -> torch.Tensor:
    """pairwise_mmd of two MMD sketches on one grid; ``bandwidth`` checked (a tuple), None (the
    pooled std of the binned values) or a float64 tensor of bandwidths (the loss's, no host sync)."""
    check_same_layout(sketch_q, sketch_k, where, pairing=True)
    if method == "direct":
        raise ValueError(f"{where}: sketches and value_range pair on the grid; use method='grid' or 'auto'")
    if unbiased and min(sketch_q.num_values, sketch_k.num_values) < 2:
        raise ValueError(f"{where}: the unbiased estimator needs at least 2 values per residual")
    if bandwidth is None:
        bandwidths = check_default_bandwidth(sketch_bandwidth(sketch_q, sketch_k), where)
    elif isinstance(bandwidth, torch.Tensor):
        bandwidths = bandwidth
    else:
        bandwidths = _bandwidths(bandwidth, sketch_q.values, sketch_k.values)
    return check_result(pair_mmd(sketch_q, sketch_k, bandwidths, unbiased), where)


def _mmd_method(impl: Backend, method: str, value_pairs: int, num_bins: int, where: str) -> str:
    """The method ``impl`` computes: "auto" is its first, or the exact sum where it has one and
    DIRECT_SUM_COST per pair of values costs no more than the grid's num_bins."""
    if method == "auto":
        method = impl.mmd_methods[0]
        if "direct" in impl.mmd_methods and DIRECT_SUM_COST * value_pairs <= num_bins:
            method = "direct"
    elif method not in impl.mmd_methods:
        raise ValueError(f"{where}: backend {impl.name!r} supports methods {impl.mmd_methods}, not {method!r}")
    return method


@checked_options("q", "k")
def pairwise_bd(
    q: torch.Tensor | Sketch, k: torch.Tensor | Sketch, *, eps: float = 1e-6, backend: str = "auto"
) -> torch.Tensor:
    """Bhattacharyya distance between the Gaussians fitted to each residual (Eq. 6).

    q: (Bq, ...), k: (Bk, ...), at least 2 values each. With mean mu and unbiased variance
    v (plus ``eps``) of each residual's values, a = v_i + eps, b = v_j + eps:
    D[i, j] = 1/4 ln(1/4 (a/b + b/a + 2)) + 1/4 (mu_i - mu_j)^2 / (a + b). Returns (Bq, Bk).
    q and k may also be BD sketches (``bd_sketch``: the float64 moments), or one of each.
    """
    where = "pairwise_bd"
    sketches = _sketch_pair(q, k, "bd", where, lambda x, s: bd_sketch(x, backend=backend))
    if sketches is not None:
        return check_result(pair_bd(*sketches, eps, backend=backend), where)
    q2, k2 = prepare_pair(q, k, where)
    if min(q2.shape[1], k2.shape[1]) < 2:
        raise ValueError(f"{where}: the sample variance needs at least 2 values per residual")
    return check_result(resolve_backend(backend, q2.device, where).bd(q2, k2, eps), where)
