"""Closed forms shared by the backends (torch code, any device): the V/U statistic of the
direct MMD from its kernel sums and the Bhattacharyya pair term from moments."""

from __future__ import annotations

import torch


def mmd_from_kernel_sums(self_q, self_k, cross, m: int, n: int, num_h: int, unbiased: bool) -> torch.Tensor:
    """Squared MMD (Bq, Bk) from the kernel sums S_qq (Bq,), S_kk (Bk,), S_qk (Bq, Bk), in
    float64 (the three terms cancel when the distributions are close).

    V-statistic: S_qq / M^2 + S_kk / N^2 - 2 S_qk / (M N), clamped at 0 (it is a squared
    norm; rounding can leave -1e-17). U-statistic: the self sums leave out the diagonal
    (k(a, a) = H, the number of bandwidths): (S_qq - M H) / (M (M - 1)); it may be negative.
    """
    self_q, self_k, cross = (t.to(torch.float64) for t in (self_q, self_k, cross))
    if unbiased:
        self_q = (self_q - m * num_h) / (m * (m - 1))
        self_k = (self_k - n * num_h) / (n * (n - 1))
    else:
        self_q = self_q / (m * m)
        self_k = self_k / (n * n)
    value = self_q[:, None] + self_k[None, :] - cross * (2.0 / (m * n))
    return value if unbiased else value.clamp_min(0.0)


def bd_from_moments(mean_q, var_q, mean_k, var_k, eps: float) -> torch.Tensor:
    """Bhattacharyya distance (Bq, Bk) between N(mean_q[i], var_q[i]) and N(mean_k[j], var_k[j])
    (Eq. 6), a = var_i + eps, b = var_j + eps:
    1/4 ln(1/4 (a/b + b/a + 2)) + 1/4 (mu_i - mu_j)^2 / (a + b), the log written as
    1/4 log1p((a - b)/a (a - b)/b / 4), exact as a -> b (the same form as csrc's bd_value)."""
    a = (var_q + eps)[:, None]
    b = (var_k + eps)[None, :]
    mean_diff = mean_q[:, None] - mean_k[None, :]
    var_diff = a - b
    return 0.25 * torch.log1p((var_diff / a) * (var_diff / b) * 0.25) + 0.25 * (mean_diff / (a + b)) * mean_diff
