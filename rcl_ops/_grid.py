"""The binned-grid MMD's pair stage in torch ops (any device), shared by the Triton backend
and the MMD sketches of rcl_ops.sketch; csrc/mmd_grid.cpp is the same algorithm in C++.

Residuals are binned linearly onto G points t_g = lo + g step with weights w (B, G) (each
row sums to 1); the kernel sum_h exp(-d^2 / (2 h^2)) acts on the grid as a convolution,
applied by FFT of size >= 2 G (linear, not circular)."""

from __future__ import annotations

import torch


def fft_size(num_bins: int) -> int:
    """The FFT size: the power of two >= 2 G."""
    return 1 << (2 * num_bins - 1).bit_length()


def kernel_spectrum(step, size: int, bandwidths: torch.Tensor, derivative: bool = False) -> torch.Tensor:
    """rfft of sum_h exp(-d^2 / (2 h^2)) (or its derivative in d) at the signed grid offsets
    d = n step (step: a float or a 0-dim float64 tensor), float64."""
    n = torch.arange(size, dtype=torch.float64, device=bandwidths.device)
    diff = (torch.where(n < size // 2, n, n - size) * step).unsqueeze(1)
    inv_two_h2 = 0.5 / bandwidths.to(torch.float64).square()
    values = torch.exp(-diff.square() * inv_two_h2)
    if derivative:
        values = values * (-2.0 * diff * inv_two_h2)
    return torch.fft.rfft(values.sum(1), size)


def convolve(w: torch.Tensor, spectrum: torch.Tensor, size: int) -> torch.Tensor:
    """(..., G) weights convolved with the kernel whose spectrum is given, (..., G)."""
    product = torch.fft.rfft(w, size, dim=-1) * spectrum
    return torch.fft.irfft(product, size, dim=-1)[..., : w.shape[-1]]


def centred_weights(w_q: torch.Tensor, w_k: torch.Tensor):
    """w_mean over both batches (detached: the MMD is unchanged by a common shift of the
    weights) and u = w - w_mean, with which the float64 GEMMs lose less to cancellation."""
    w_mean = ((w_q.sum(0) + w_k.sum(0)) / float(w_q.shape[0] + w_k.shape[0])).detach()
    return w_mean, w_q - w_mean, w_k - w_mean


def grid_mmd(
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    spectrum: torch.Tensor,
    size: int,
    counts: tuple[int, int],
    num_h: int,
    unbiased: bool,
) -> torch.Tensor:
    """Squared MMD (Bq, Bk) float64 from binned weights: with u = w - w_mean and v = K * u,
    D[i, j] = u_i.v_i + u_j.v_j - 2 u_i.v_j (V-statistic); unbiased (U-statistic): plus
    (w_i^T K w_i - H) / (M - 1) per side (counts = (M, N); H bandwidths: k(x, x) = H)."""
    w_mean, u_q, u_k = centred_weights(w_q, w_k)
    v_q, v_k = convolve(u_q, spectrum, size), convolve(u_k, spectrum, size)
    self_q, self_k = (u_q * v_q).sum(1), (u_k * v_k).sum(1)
    out = self_q.unsqueeze(1) + self_k.unsqueeze(0) - 2.0 * torch.mm(u_q, v_k.t())
    if unbiased:
        v_mean = convolve(w_mean.unsqueeze(0), spectrum, size).squeeze(0)
        mean_self = (w_mean * v_mean).sum()
        full_q = self_q + 2.0 * (u_q * v_mean).sum(1) + mean_self
        full_k = self_k + 2.0 * (u_k * v_mean).sum(1) + mean_self
        out = (
            out
            + ((full_q - num_h) / float(counts[0] - 1)).unsqueeze(1)
            + ((full_k - num_h) / float(counts[1] - 1)).unsqueeze(0)
        )
    return out
