"""Pure-PyTorch reference backend: the oracle every kernel is tested against.

All functions take flattened residual batches ``q`` (Bq, Mq) and ``k`` (Bk, Mk) and return
the (Bq, Bk) distance matrix in the inputs' dtype, differentiable with autograd (EMD and BD
twice: their second derivatives are torch's own). They are written for clarity and
accuracy, not speed: everything is computed in float64 (sorts, sums, moments, kernels), with
the stable closed forms of rcl_ops._formulas; the native and Triton backends compute the
same quantities without (Bq, Bk, M) tensors.
"""

from __future__ import annotations

import torch

from ._autograd import no_second_derivative
from ._backend import Backend, register_backend
from ._formulas import bd_from_moments, mmd_from_kernel_sums
from .ops import checked_default_bandwidth

# Pairwise element differences are built in chunks of at most this many values, so the
# O(M^2) MMD sum never holds a (Bq, Bk, M, M) tensor.
_MMD_CHUNK_ELEMENTS = 1 << 22


def quantile_positions(num_values: int, num_quantiles: int, device=None):
    """Mid-level quantile interpolation: for t_k = (k + 0.5) / K, the fractional order-statistic
    position p_k = t_k * M - 0.5 clamped to [0, M - 1]; returns (lower index, upper index,
    weight of the upper one), each of shape (K,). With K == M, p_k = k exactly."""
    k = torch.arange(num_quantiles, dtype=torch.float64, device=device)
    pos = ((k + 0.5) * num_values / num_quantiles - 0.5).clamp(0, num_values - 1)
    lower = pos.floor().long()
    upper = (lower + 1).clamp(max=num_values - 1)
    return lower, upper, pos - lower


def sorted_quantiles(x: torch.Tensor, num_quantiles: int | None = None) -> torch.Tensor:
    """(B, M) -> (B, K) mid-level quantiles of each row (the sorted row when K is None or M)."""
    values = torch.sort(x, dim=1).values
    num_values = x.shape[1]
    if num_quantiles is None or num_quantiles == num_values:
        return values
    lower, upper, weight = quantile_positions(num_values, num_quantiles, x.device)
    weight = weight.to(x.dtype)
    return values[:, lower] * (1 - weight) + values[:, upper] * weight


def pairwise_emd(q: torch.Tensor, k: torch.Tensor, num_quantiles: int | None = None) -> torch.Tensor:
    """D[i, j] = mean_t |Q_i(t) - Q_j(t)| over the sorted values (exact W1 for equal counts)
    or over K mid-level quantiles. In float64 (cdist in float32 is off by 1e-3 at M = 4e6)."""
    sq = sorted_quantiles(q.double(), num_quantiles)
    sk = sorted_quantiles(k.double(), num_quantiles)
    return _MeanAbsoluteDifference.apply(sq, sk).to(q.dtype)


# Value differences are formed in chunks of at most this many values in the EMD backward.
_EMD_CHUNK_ELEMENTS = 1 << 22


class _MeanAbsoluteDifference(torch.autograd.Function):
    """D[i, j] = mean_m |a[i, m] - b[j, m]|: torch.cdist forward (no (Bq, Bk, K) tensor), and
    a backward written in differentiable torch ops, chunked over j, so that double backward
    works (cdist's backward has no derivative): dD/da[i, m] = sign(a[i, m] - b[j, m]) / K."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.cdist(a.unsqueeze(0), b.unsqueeze(0), p=1).squeeze(0) / a.shape[1]

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        chunk = max(1, _EMD_CHUNK_ELEMENTS // (a.shape[0] * a.shape[1]))
        grad_a, grad_b = torch.zeros_like(a), []
        for j in range(0, b.shape[0], chunk):
            signs = torch.sign(a.unsqueeze(1) - b[j : j + chunk].unsqueeze(0))  # (Bq, c, K)
            weighted = grad[:, j : j + chunk, None] * signs / a.shape[1]
            grad_a = grad_a + weighted.sum(1)
            grad_b.append(-weighted.sum(0))
        return grad_a, torch.cat(grad_b)


def _kernel_blocks(x: torch.Tensor, y: torch.Tensor, inv_two_h2: torch.Tensor, paired: bool):
    """Yield (a-slice, b-slice, diff, kernel) over chunks of value pairs, where for
    paired=False diff[i, j, a, b, h] = x[i, a] - y[j, b] (paired: diff[i, a, b, h] with j = i)
    and kernel = exp(-diff^2 / (2 h^2)). Chunks hold at most _MMD_CHUNK_ELEMENTS values."""
    rows = x.shape[0] if paired else x.shape[0] * y.shape[0]
    chunk = max(1, int((_MMD_CHUNK_ELEMENTS / (rows * inv_two_h2.numel())) ** 0.5))
    for a in range(0, x.shape[1], chunk):
        for b in range(0, y.shape[1], chunk):
            xa, yb = x[:, a : a + chunk], y[:, b : b + chunk]
            if paired:
                diff = xa[:, :, None, None] - yb[:, None, :, None]
            else:
                diff = xa[:, None, :, None, None] - yb[None, :, None, :, None]
            yield slice(a, a + chunk), slice(b, b + chunk), diff, torch.exp(-diff.square() * inv_two_h2)


class _GaussianKernelSums(torch.autograd.Function):
    """Chunked kernel sums with an explicit chunked backward, so memory stays bounded."""

    @staticmethod
    def forward(ctx, x, y, bandwidths, paired):
        inv_two_h2 = 0.5 / bandwidths.to(x.dtype).square()
        ctx.save_for_backward(x, y, inv_two_h2)
        ctx.paired = paired
        reduce_dims = (-3, -2, -1)
        return sum(kernel.sum(dim=reduce_dims) for _, _, _, kernel in _kernel_blocks(x, y, inv_two_h2, paired))

    @staticmethod
    @no_second_derivative("the reference MMD (pairwise_mmd, backend='reference')")
    def backward(ctx, grad):
        # d/dx k(x - y) = -2 (x - y) / (2 h^2) k(x - y), summed over h, weighted by grad.
        x, y, inv_two_h2 = ctx.saved_tensors
        grad_x, grad_y = torch.zeros_like(x), torch.zeros_like(y)
        for a, b, diff, kernel in _kernel_blocks(x, y, inv_two_h2, ctx.paired):
            slope = (-2.0 * diff * inv_two_h2 * kernel).sum(-1)
            if ctx.paired:  # slope (B, ca, cb), grad (B,)
                grad_x[:, a] += grad[:, None] * slope.sum(2)
                grad_y[:, b] -= grad[:, None] * slope.sum(1)
            else:  # slope (Bx, By, ca, cb), grad (Bx, By)
                grad_x[:, a] += torch.einsum("ij,ijab->ia", grad, slope)
                grad_y[:, b] -= torch.einsum("ij,ijab->jb", grad, slope)
        return grad_x, grad_y, None, None


def gaussian_kernel_sums(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor, paired: bool):
    """Sum of Gaussian kernels over all value pairs.

    paired=False: (Bx, Mx), (By, My) -> (Bx, By), S[i, j] = sum_{a, b, h} k_h(x[i, a], y[j, b]).
    paired=True:  (B, Mx), (B, My) -> (B,), S[i] = sum_{a, b, h} k_h(x[i, a], y[i, b]).
    Computed in chunks, forward and backward, so memory stays bounded.
    """
    return _GaussianKernelSums.apply(x, y, bandwidths, paired)


def pairwise_mmd(q: torch.Tensor, k: torch.Tensor, bandwidths: torch.Tensor, unbiased: bool = False):
    """Squared MMD with the kernel sum_h exp(-(a - b)^2 / (2 h^2)), by the direct O(M N) sum,
    in float64."""
    q64, k64, h64 = q.double(), k.double(), bandwidths.double()
    return mmd_from_kernel_sums(
        gaussian_kernel_sums(q64, q64, h64, paired=True),
        gaussian_kernel_sums(k64, k64, h64, paired=True),
        gaussian_kernel_sums(q64, k64, h64, paired=False),
        q.shape[1],
        k.shape[1],
        bandwidths.numel(),
        unbiased,
    ).to(q.dtype)


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) -> float64 mean (B,), unbiased variance (B,)."""
    x = x.double()
    return x.mean(dim=1), x.var(dim=1, correction=1)


def pairwise_bd(q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Bhattacharyya distance between the Gaussians fitted to each residual, in float64."""
    return bd_from_moments(*moments(q), *moments(k), eps).to(q.dtype)


def _reference_mmd(q, k, bandwidths, unbiased, method, num_bins):
    if method == "grid":
        raise ValueError("the reference backend computes MMD only by the exact direct sum; use method='direct'")
    if bandwidths is None:
        bandwidths = checked_default_bandwidth(q, k, "pairwise_mmd")
    return pairwise_mmd(q, k, bandwidths, unbiased)


register_backend(
    Backend(
        name="reference",
        device_types=("cpu", "cuda", "mps", "xpu", "meta"),
        emd=pairwise_emd,
        mmd=_reference_mmd,
        bd=pairwise_bd,
        mmd_methods=("direct",),
        sorted_quantiles=lambda x, num_quantiles: sorted_quantiles(x.double(), num_quantiles),
        emd_pair=lambda a, b: _MeanAbsoluteDifference.apply(a.double(), b.double()),
        moments=moments,
        bd_pair=bd_from_moments,
    )
)
