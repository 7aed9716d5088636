"""Fake (shape-only) kernels of the ops that the native (``rcl_ops::``) and Triton
(``rcl_ops_triton::``) libraries both implement, with the same schemas and output dtypes.
Written once, registered for each namespace, so that torch.compile traces both alike.
Backward ops take ``output_mask`` (bool[2]: which input side, q or k, needs a gradient) and
return a 0-element placeholder for a side that does not.

The shared contract, per op (B rows of M values; K quantiles; G grid points):
- ``sorted_quantiles(x, K) -> (quantiles (B, K) x.dtype, order (B, M) int32)``;
  ``sorted_quantiles_backward(grad (B, K), order) -> (B, M)``.
- ``emd_pair(sorted_q, sorted_k) -> (Bq, Bk)``;
  ``emd_pair_backward(grad, sq, sk, output_mask) -> (gq, gk)``.
- ``moments(x) -> (mean, var)``, both float64 (B,) whatever x's dtype;
  ``moments_backward(grad_mean, grad_var, x, mean) -> (B, M) x.dtype``.
- ``bd_pair(mean_q, var_q, mean_k, var_k, eps) -> (Bq, Bk) float64`` from float64 moments;
  ``bd_pair_backward(grad, ..., eps, output_mask) -> four float64 vectors``.
- ``mmd_grid(q, k, bandwidths, num_bins, unbiased) -> (distances (Bq, Bk) q.dtype,
  grid (2,) float64 [lo, step], w_q (Bq, G) float64, w_k (Bk, G) float64)``;
  ``mmd_grid_backward(grad, q, k, bandwidths, grid, w_q, w_k, num_bins, unbiased, output_mask)
  -> (gq, gk)``.
"""

from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.float64)


def _check_rows(x: torch.Tensor, op: str, name: str) -> None:
    torch._check(x.dim() == 2, lambda: f"{op}: {name} must be 2-D, got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"{op}: {name} must be float32 or float64, got {x.dtype}")


def masked_gradients(inputs, output_mask) -> tuple[torch.Tensor, ...]:
    """The gradients a backward op returns for its two input sides: shaped like the input
    where output_mask asks for it, a 0-element placeholder where it does not."""
    return tuple(torch.empty_like(x) if needed else x.new_empty(0) for x, needed in zip(inputs, output_mask))


def register_fake_kernels(namespace: str) -> None:
    """Register the fake kernels of the shared ops of ``namespace``."""

    def fake(name):
        return torch.library.register_fake(f"{namespace}::{name}")

    @fake("sorted_quantiles")
    def _sorted_quantiles(x, num_quantiles):
        _check_rows(x, f"{namespace}::sorted_quantiles", "x")
        return x.new_empty(x.shape[0], num_quantiles), x.new_empty(x.shape, dtype=torch.int32)

    @fake("sorted_quantiles_backward")
    def _sorted_quantiles_backward(grad_quantiles, order):
        return grad_quantiles.new_empty(order.shape)

    @fake("emd_pair")
    def _emd_pair(sorted_q, sorted_k):
        torch._check(sorted_q.shape[1] == sorted_k.shape[1], lambda: f"{namespace}::emd_pair: K differs")
        return sorted_q.new_empty(sorted_q.shape[0], sorted_k.shape[0])

    @fake("emd_pair_backward")
    def _emd_pair_backward(grad, sorted_q, sorted_k, output_mask):
        return masked_gradients((sorted_q, sorted_k), output_mask)

    @fake("moments")
    def _moments(x):
        _check_rows(x, f"{namespace}::moments", "x")
        return x.new_empty(x.shape[0], dtype=torch.float64), x.new_empty(x.shape[0], dtype=torch.float64)

    @fake("moments_backward")
    def _moments_backward(grad_mean, grad_var, x, mean):
        return torch.empty_like(x)

    @fake("bd_pair")
    def _bd_pair(mean_q, var_q, mean_k, var_k, eps):
        return mean_q.new_empty(mean_q.shape[0], mean_k.shape[0], dtype=torch.float64)

    @fake("bd_pair_backward")
    def _bd_pair_backward(grad, mean_q, var_q, mean_k, var_k, eps, output_mask):
        grad_mean_q, grad_mean_k = masked_gradients((mean_q, mean_k), output_mask)
        grad_var_q, grad_var_k = masked_gradients((var_q, var_k), output_mask)
        return grad_mean_q, grad_var_q, grad_mean_k, grad_var_k

    @fake("mmd_grid")
    def _mmd_grid(q, k, bandwidths, num_bins, unbiased):
        return (
            q.new_empty(q.shape[0], k.shape[0]),
            q.new_empty(2, dtype=torch.float64),
            q.new_empty(q.shape[0], num_bins, dtype=torch.float64),
            k.new_empty(k.shape[0], num_bins, dtype=torch.float64),
        )

    @fake("mmd_grid_backward")
    def _mmd_grid_backward(grad, q, k, bandwidths, grid, w_q, w_k, num_bins, unbiased, output_mask):
        return masked_gradients((q, k), output_mask)
