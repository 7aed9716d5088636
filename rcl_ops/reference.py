"""Pure-PyTorch reference backend: the oracle every kernel is tested against.

All functions take flattened residual batches ``q`` (Bq, Mq) and ``k`` (Bk, Mk) and return
the (Bq, Bk) distance matrix, differentiable with autograd. They are written for clarity;
the native and Triton backends compute the same quantities without (Bq, Bk, M) tensors.
"""

from __future__ import annotations

import torch

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
    or over K mid-level quantiles."""
    sq = sorted_quantiles(q, num_quantiles)
    sk = sorted_quantiles(k, num_quantiles)
    return torch.cdist(sq.unsqueeze(0), sk.unsqueeze(0), p=1).squeeze(0) / sq.shape[1]


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
    @torch.autograd.function.once_differentiable
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


def mmd_from_kernel_sums(self_q, self_k, cross, m: int, n: int, num_h: int, unbiased: bool):
    """Squared MMD (Bq, Bk) from the kernel sums S_qq (Bq,), S_kk (Bk,), S_qk (Bq, Bk).

    V-statistic: S_qq / M^2 + S_kk / N^2 - 2 S_qk / (M N). U-statistic: the self sums leave
    out the diagonal (k(a, a) = H, the number of bandwidths): (S_qq - M H) / (M (M - 1)).
    """
    if unbiased:
        self_q = (self_q - m * num_h) / (m * (m - 1))
        self_k = (self_k - n * num_h) / (n * (n - 1))
    else:
        self_q = self_q / (m * m)
        self_k = self_k / (n * n)
    return self_q[:, None] + self_k[None, :] - cross * (2.0 / (m * n))


def pairwise_mmd(q: torch.Tensor, k: torch.Tensor, bandwidths: torch.Tensor, unbiased: bool = False):
    """Squared MMD with the kernel sum_h exp(-(a - b)^2 / (2 h^2)), by the direct O(M N) sum."""
    return mmd_from_kernel_sums(
        gaussian_kernel_sums(q, q, bandwidths, paired=True),
        gaussian_kernel_sums(k, k, bandwidths, paired=True),
        gaussian_kernel_sums(q, k, bandwidths, paired=False),
        q.shape[1],
        k.shape[1],
        bandwidths.numel(),
        unbiased,
    )


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) -> mean (B,), unbiased variance (B,)."""
    return x.mean(dim=1), x.var(dim=1, correction=1)


def bd_from_moments(mean_q, var_q, mean_k, var_k, eps: float) -> torch.Tensor:
    """Bhattacharyya distance between N(mean_q[i], var_q[i]) and N(mean_k[j], var_k[j]) (Eq. 6):
    1/4 ln(1/4 (a/b + b/a + 2)) + 1/4 (mu_i - mu_j)^2 / (a + b), a = var_i + eps, b = var_j + eps."""
    a = (var_q + eps)[:, None]
    b = (var_k + eps)[None, :]
    mean_diff = mean_q[:, None] - mean_k[None, :]
    return 0.25 * torch.log(0.25 * (a / b + b / a + 2)) + 0.25 * mean_diff.square() / (a + b)


def pairwise_bd(q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Bhattacharyya distance between the Gaussians fitted to each residual."""
    return bd_from_moments(*moments(q), *moments(k), eps)
