"""Public pairwise distance functions between batches of residuals."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from ._backend import resolve_backend
from ._checks import check_positive_float, check_positive_int, prepare_pair

MMD_METHODS = ("auto", "grid", "direct")
# Cost of one kernel evaluation of the direct sum in grid multiply-adds (method="auto").
DIRECT_SUM_COST = 16
# Largest grid: its FFTs have 2^25 points per residual (the kernels index it with int64).
MAX_NUM_BINS = 1 << 24


def pairwise_emd(
    q: torch.Tensor, k: torch.Tensor, *, num_quantiles: int | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Earth mover's (1-D Wasserstein-1) distance between residual value distributions.

    q: (Bq, ...), k: (Bk, ...); each residual is the empirical distribution of its values.
    Returns D (Bq, Bk) with D[i, j] = W1(q[i], k[j]).

    With ``num_quantiles=None`` both must hold the same number of values M and the result is
    exact: mean_m |sort(q[i])[m] - sort(k[j])[m]|. With ``num_quantiles=K`` each residual is
    summarised by its quantiles at the mid-levels t = (m + 0.5) / K (linear interpolation
    between order statistics) and D[i, j] = mean_m |Q_i(t_m) - Q_j(t_m)|; K = M is exact.
    float16/bfloat16 inputs are computed (and returned) in float32.
    """
    where = "pairwise_emd"
    q2, k2 = prepare_pair(q, k, where)
    if num_quantiles is None:
        if q2.shape[1] != k2.shape[1]:
            raise ValueError(
                f"{where}: q has {q2.shape[1]} values per residual but k has {k2.shape[1]}; "
                "exact EMD needs equal counts; pass num_quantiles=K to compare K quantiles"
            )
    else:
        num_quantiles = check_positive_int(num_quantiles, "num_quantiles", where)
    return resolve_backend(backend, q2.device, where).emd(q2, k2, num_quantiles)


def default_bandwidth(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The data-driven MMD bandwidth: the standard deviation of all values of q and k pooled
    (detached, no host sync), or 1 where that is 0. Shape (1,)."""
    with torch.no_grad():
        var_q, mean_q = torch.var_mean(q, correction=0)
        var_k, mean_k = torch.var_mean(k, correction=0)
        n_q, n_k = q.numel(), k.numel()
        frac_q = n_q / (n_q + n_k)
        pooled = frac_q * var_q + (1 - frac_q) * var_k + frac_q * (1 - frac_q) * (mean_q - mean_k).square()
        std = pooled.sqrt()
        return torch.where(std > 0, std, torch.ones_like(std)).reshape(1)


def _bandwidths(bandwidth, q: torch.Tensor, k: torch.Tensor, where: str) -> torch.Tensor:
    if bandwidth is None:
        return default_bandwidth(q, k)
    if isinstance(bandwidth, torch.Tensor):
        raise TypeError(f"{where}: pass bandwidth as a float or a sequence of floats, not a tensor")
    if isinstance(bandwidth, numbers.Real):
        bandwidth = [bandwidth]
    if not isinstance(bandwidth, Sequence) or len(bandwidth) == 0:
        raise ValueError(f"{where}: bandwidth must be None, a float or a non-empty sequence of floats")
    values = [check_positive_float(h, "bandwidth", where) for h in bandwidth]
    return torch.tensor(values, dtype=q.dtype, device=q.device)


def pairwise_mmd(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    bandwidth: float | Sequence[float] | None = None,
    unbiased: bool = False,
    method: str = "auto",
    num_bins: int = 4096,
    backend: str = "auto",
) -> torch.Tensor:
    """Squared Gaussian-kernel MMD between residual value distributions.

    q: (Bq, ...) with M values each, k: (Bk, ...) with N values each. Returns D (Bq, Bk),
    D[i, j] = mean k(x, x') + mean k(y, y') - 2 mean k(x, y) over x in q[i], y in k[j]
    (V-statistic; ``unbiased=True`` drops the x = x' and y = y' terms: the U-statistic),
    with k(a, b) = sum_h exp(-(a - b)^2 / (2 h^2)) over the bandwidths h.

    bandwidth: a float, a sequence of floats (sum of kernels), or None for the standard
    deviation of all values of q and k pooled (detached; 1 if they are all equal).
    method: "direct" is the exact O(M N) sum; "grid" (native backends) bins the values
    linearly onto ``num_bins`` points spanning the batch's range and applies the kernel as a
    convolution there: O(M + G log G) per residual plus a (Bq, Bk) GEMM over the bins; its
    error grows with (range / h) / num_bins. "auto" is "grid" on the native backends, except
    for residuals so small that the exact sum is cheaper (16 M N <= num_bins: an exp costs
    ~16 multiply-adds, and the grid pays O(G) per pair whatever M), and "direct" on the
    reference backend. Computed in float32 for half inputs.
    """
    where = "pairwise_mmd"
    q2, k2 = prepare_pair(q, k, where)
    if method not in MMD_METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; choose one of {MMD_METHODS}")
    num_bins = check_positive_int(num_bins, "num_bins", where)
    if not 2 <= num_bins <= MAX_NUM_BINS:
        raise ValueError(f"{where}: num_bins must be in [2, {MAX_NUM_BINS}], got {num_bins}")
    if unbiased and min(q2.shape[1], k2.shape[1]) < 2:
        raise ValueError(f"{where}: the unbiased estimator needs at least 2 values per residual")
    impl = resolve_backend(backend, q2.device, where)
    if method == "auto":
        method = impl.mmd_methods[0]
        if "direct" in impl.mmd_methods and DIRECT_SUM_COST * q2.shape[1] * k2.shape[1] <= num_bins:
            method = "direct"
    elif method not in impl.mmd_methods:
        raise ValueError(f"{where}: backend {impl.name!r} supports methods {impl.mmd_methods}, not {method!r}")
    bandwidths = _bandwidths(bandwidth, q2, k2, where)
    return impl.mmd(q2, k2, bandwidths, bool(unbiased), method, num_bins)


def pairwise_bd(q: torch.Tensor, k: torch.Tensor, *, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Bhattacharyya distance between the Gaussians fitted to each residual (Eq. 6).

    q: (Bq, ...), k: (Bk, ...), at least 2 values each. With mean mu and unbiased variance
    v (plus ``eps``) of each residual's values, a = v_i + eps, b = v_j + eps:
    D[i, j] = 1/4 ln(1/4 (a/b + b/a + 2)) + 1/4 (mu_i - mu_j)^2 / (a + b). Returns (Bq, Bk).
    """
    where = "pairwise_bd"
    q2, k2 = prepare_pair(q, k, where)
    if min(q2.shape[1], k2.shape[1]) < 2:
        raise ValueError(f"{where}: the sample variance needs at least 2 values per residual")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{where}: eps must be a non-negative float, got {eps!r}")
    return resolve_backend(backend, q2.device, where).bd(q2, k2, float(eps))
