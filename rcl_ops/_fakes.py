"""Fake (shape-only) kernels of every op of the native (``rcl_ops::``) and Triton
(``rcl_ops_triton::``) libraries, all in this one module (as torchvision keeps
``_meta_registrations.py``), so that torch.compile traces them and opcheck passes. The ops both
libraries implement, with the same schemas and output dtypes, have one fake kernel written once
and registered for each namespace; each library's own ops follow. Backward ops take
``output_mask`` (bool[2]: which input side, q or k, needs a gradient) and return a 0-element
placeholder for a side that does not. A library registers its fakes once its ops are defined:
``register_fake_kernels(namespace)``.

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

The native library's own ops: the fused ``emd_exact``, ``bd`` (with the sorted values and orders,
or the moments, that their backward reuses), the direct MMD's ``gaussian_kernel_sums``
(float64) and the fused ``mmd_direct(q, k, bandwidths or None, unbiased, derivatives) ->
(distances (Bq, Bk) q.dtype, bandwidths (H,) float64 (H = 1 for None: the pooled std), statistic
(Bq, Bk) float64, derivative_sums float64 (Bq Bk (M + N) + Bq M + Bk N values with derivatives,
else 0))``, with their backward ops, and the fused loss ``info_nce(distances (Bq, Bk), temperature,
symmetric, first_positive) -> (losses (Bq,), grad_rows (Bq, Bk), grad_columns (Bq, Bk) if symmetric
else 0 elements)``, all in distances' dtype, and ``pooled_std(q, k) -> (1,) float64`` (the MMD's default
bandwidth). The Triton library's own ops: the grid MMD's per-value
kernels ``grid_bin`` ((B, G) float64 weights) and ``grid_interpolate`` ((B, M) in x's dtype).
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
    """Register the fake kernels of every op of ``namespace`` ("rcl_ops" or "rcl_ops_triton"):
    the shared ops, then the library's own. Call it once the namespace's ops are defined."""
    _register_shared_fakes(namespace)
    _OWN_FAKES[namespace](namespace)


def _fake(namespace: str, name: str):
    return torch.library.register_fake(f"{namespace}::{name}")


def _register_shared_fakes(namespace: str) -> None:
    """The fake kernels of the ops that both libraries implement."""

    def fake(name):
        return _fake(namespace, name)

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


def _register_native_fakes(namespace: str) -> None:
    """The fake kernels of the native library's own ops."""

    @_fake(namespace, "emd_exact")
    def _emd_exact(q, k):
        torch._check(q.shape[1] == k.shape[1], lambda: f"{namespace}::emd_exact: q and k need the same M")
        return (
            q.new_empty(q.shape[0], k.shape[0]),
            torch.empty_like(q),
            q.new_empty(q.shape, dtype=torch.int32),
            torch.empty_like(k),
            k.new_empty(k.shape, dtype=torch.int32),
        )

    @_fake(namespace, "emd_exact_backward")
    def _emd_exact_backward(grad, sorted_q, order_q, sorted_k, order_k, output_mask):
        return masked_gradients((sorted_q, sorted_k), output_mask)

    @_fake(namespace, "bd")
    def _bd(q, k, eps):
        torch._check(q.dim() == 2 and k.dim() == 2, lambda: f"{namespace}::bd: q and k must be 2-D")
        bq, bk = q.shape[0], k.shape[0]
        moments = [q.new_empty(n, dtype=torch.float64) for n in (bq, bq, bk, bk)]
        return q.new_empty(bq, bk), *moments

    @_fake(namespace, "bd_backward")
    def _bd_backward(grad, q, k, mean_q, var_q, mean_k, var_k, eps, output_mask):
        return masked_gradients((q, k), output_mask)

    @_fake(namespace, "gaussian_kernel_sums")
    def _gaussian_kernel_sums(x, y, bandwidths, paired):
        shape = (x.shape[0],) if paired else (x.shape[0], y.shape[0])
        return x.new_empty(shape, dtype=torch.float64)

    @_fake(namespace, "gaussian_kernel_sums_backward")
    def _gaussian_kernel_sums_backward(grad, x, y, bandwidths, paired, output_mask):
        return masked_gradients((x, y), output_mask)

    @_fake(namespace, "mmd_direct")
    def _mmd_direct(q, k, bandwidths, unbiased, derivatives):
        torch._check(q.dim() == 2 and k.dim() == 2, lambda: f"{namespace}::mmd_direct: q and k must be 2-D")
        (bq, m), (bk, n) = q.shape, k.shape
        num_h = 1 if bandwidths is None else bandwidths.shape[0]
        statistic = q.new_empty(bq, bk, dtype=torch.float64)
        sums = q.new_empty(bq * bk * (m + n) + bq * m + bk * n if derivatives else 0, dtype=torch.float64)
        return q.new_empty(bq, bk), q.new_empty(num_h, dtype=torch.float64), statistic, sums

    @_fake(namespace, "mmd_direct_backward")
    def _mmd_direct_backward(grad, q, k, bandwidths, statistic, derivative_sums, unbiased, output_mask):
        return masked_gradients((q, k), output_mask)

    @_fake(namespace, "pooled_std")
    def _pooled_std(q, k):
        _check_rows(q, f"{namespace}::pooled_std", "q")
        _check_rows(k, f"{namespace}::pooled_std", "k")
        return q.new_empty(1, dtype=torch.float64)

    @_fake(namespace, "info_nce")
    def _info_nce(distances, temperature, symmetric, first_positive):
        _check_rows(distances, f"{namespace}::info_nce", "distances")
        grad_columns = torch.empty_like(distances) if symmetric else distances.new_empty(0)
        return distances.new_empty(distances.shape[0]), torch.empty_like(distances), grad_columns


def _register_triton_fakes(namespace: str) -> None:
    """The fake kernels of the Triton library's own ops."""

    @_fake(namespace, "grid_bin")
    def _grid_bin(x, lo, step, num_bins):
        return x.new_empty((x.shape[0], num_bins), dtype=torch.float64)

    @_fake(namespace, "grid_interpolate")
    def _grid_interpolate(field, x, lo, step):
        return torch.empty_like(x)


_OWN_FAKES = {"rcl_ops": _register_native_fakes, "rcl_ops_triton": _register_triton_fakes}
