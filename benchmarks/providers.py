"""Competitors, each a function (q, k) -> (Bq, Bk) distance matrix on (B, ...) residuals.

- ``rcl_ops[<backend>]``: the library, per loaded backend;
- ``reference``: the library's pure-PyTorch oracle (rcl_ops.reference, not a copy);
- ``naive``: what a user would write by hand: EMD as cdist of sorted values, BD from torch
  moments, MMD as the direct kernel sum on m = 1024 subsampled values per residual;
- ``reference+compile``: torch.compile of the reference (EMD, BD; the reference MMD's chunk
  loop is not worth compiling);
- peers, when installed (``pip install .[bench]``; never required by the library):
  ``pot`` (ot.wasserstein_1d, torch backend, expanded to all Bq x Bk pairs as its users
  must), ``geomloss`` (SamplesLoss("gaussian"), tensorized, all pairs expanded), and
  ``scipy`` (scipy.stats.wasserstein_distance per pair; forward only, no gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import rcl_ops
from rcl_ops import reference

DISTANCES = ("emd", "mmd", "bd")
NAIVE_MMD_SUBSAMPLE = 1024


def naive_emd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    sq = torch.sort(q.flatten(1), dim=1).values
    sk = torch.sort(k.flatten(1), dim=1).values
    return torch.cdist(sq, sk, p=1) / sq.shape[1]


def naive_bd(q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    var_q, mean_q = torch.var_mean(q.flatten(1), dim=1)
    var_k, mean_k = torch.var_mean(k.flatten(1), dim=1)
    a, b = var_q[:, None] + eps, var_k[None, :] + eps
    return 0.25 * torch.log(0.25 * (a / b + b / a + 2)) + 0.25 * (mean_q[:, None] - mean_k[None, :]) ** 2 / (a + b)


def naive_mmd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Direct Gaussian MMD^2 (pooled-std bandwidth) on a random subsample of m values per residual."""
    x, y = q.flatten(1), k.flatten(1)
    m = min(NAIVE_MMD_SUBSAMPLE, x.shape[1], y.shape[1])
    x = x[:, torch.randperm(x.shape[1], device=x.device)[:m]]
    y = y[:, torch.randperm(y.shape[1], device=y.device)[:m]]
    h = rcl_ops.default_bandwidth(x, y)
    return reference.pairwise_mmd(x, y, h)


def _reference(distance: str) -> Callable:
    fn = getattr(rcl_ops, f"pairwise_{distance}")
    return lambda q, k: fn(q, k, backend="reference")


def _library(distance: str, backend: str) -> Callable:
    fn = getattr(rcl_ops, f"pairwise_{distance}")
    return lambda q, k: fn(q, k, backend=backend)


def library_backends(device: str) -> list[str]:
    """The rcl_ops backends worth timing on ``device`` (not Triton's CPU interpreter)."""
    return [
        b for b in rcl_ops.available_backends(device) if b != "reference" and not (b == "triton" and device == "cpu")
    ]


def pot_emd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """POT's 1-D Wasserstein on every (i, j) pair: columns of (M, Bq * Bk) expanded inputs."""
    import ot

    x, y = q.flatten(1), k.flatten(1)
    bq, bk = x.shape[0], y.shape[0]
    u = x.t().repeat_interleave(bk, dim=1)  # (M, Bq * Bk): column i * Bk + j is q[i]
    v = y.t().repeat(1, bq)  # column i * Bk + j is k[j]
    return ot.wasserstein_1d(u, v, p=1).reshape(bq, bk)


def geomloss_mmd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """GeomLoss's Gaussian-kernel MMD (tensorized) on every pair, expanded to (Bq Bk, M, 1)."""
    from geomloss import SamplesLoss

    x, y = q.flatten(1), k.flatten(1)
    bq, bk = x.shape[0], y.shape[0]
    h = rcl_ops.default_bandwidth(x, y).item()
    loss = SamplesLoss("gaussian", blur=h, backend="tensorized")
    a = x.repeat_interleave(bk, dim=0)[..., None]
    b = y.repeat(bq, 1)[..., None]
    return loss(a, b).reshape(bq, bk)


def scipy_emd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """scipy.stats.wasserstein_distance for each pair, in a Python loop (no gradient)."""
    from scipy.stats import wasserstein_distance

    x, y = q.detach().flatten(1).cpu().numpy(), k.detach().flatten(1).cpu().numpy()
    out = [[wasserstein_distance(a, b) for b in y] for a in x]
    return torch.tensor(out, dtype=q.dtype)


scipy_emd.forward_only = True


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _compiled_reference(distance: str) -> Callable:
    compiled = torch.compile(getattr(reference, f"pairwise_{distance}"))
    extra = {"emd": (None,), "bd": (1e-6,)}[distance]
    return lambda q, k: compiled(q.flatten(1), k.flatten(1), *extra)


def providers(distance: str, device: str) -> dict[str, Callable]:
    """Name -> callable for every competitor that runs on ``device``."""
    found = {f"rcl_ops[{b}]": _library(distance, b) for b in library_backends(device)}
    found["reference"] = _reference(distance)
    if distance != "mmd":
        found["reference+compile"] = _compiled_reference(distance)
    found["naive"] = {"emd": naive_emd, "mmd": naive_mmd, "bd": naive_bd}[distance]
    if distance == "emd" and _installed("ot"):
        found["pot"] = pot_emd
    if distance == "emd" and device == "cpu" and _installed("scipy"):
        found["scipy"] = scipy_emd
    if distance == "mmd" and _installed("geomloss"):
        found["geomloss"] = geomloss_mmd
    return found


def loss_providers(distance: str, device: str) -> dict[str, Callable]:
    """Name -> callable (q, k) -> scalar loss: the whole ResidualContrastiveLoss step."""
    found = {}
    for backend in [*library_backends(device), "reference"]:
        name = "reference" if backend == "reference" else f"rcl_ops[{backend}]"
        found[name] = rcl_ops.ResidualContrastiveLoss(distance, backend=backend)
    return found


def kernel_evaluations(distance: str, batch: int, values: int) -> float:
    """Pairwise element operations of the direct O(B^2 M^2) MMD, used to cap slow providers."""
    return float(batch) ** 2 * float(values) ** 2 if distance == "mmd" else float(batch) ** 2 * values


# Providers whose cost is the direct all-pairs sum, and so are capped (or extrapolated).
DIRECT_SUM_PROVIDERS = ("reference", "naive", "geomloss")
# Providers that expand the inputs to all Bq x Bk pairs (Bq Bk M values, sorted with int64
# indices and kept for backward): skipped beyond this many expanded values.
EXPANDING_PROVIDERS = ("pot",)
EXPANDED_VALUES_CAP = 1 << 27
