"""Competitors, each a function (q, k) -> (Bq, Bk) distance matrix on (B, ...) residuals.

- ``rcl_ops[<backend>]``: the library, per loaded backend;
- ``reference``: the library's pure-PyTorch oracle (rcl_ops.reference, not a copy);
- ``naive``: what a user would write by hand: EMD as cdist of sorted values, BD from torch
  moments, MMD as the direct kernel sum on m = 1024 subsampled values per residual.
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


def providers(distance: str, device: str) -> dict[str, Callable]:
    """Name -> callable for every competitor that runs on ``device``."""
    found = {f"rcl_ops[{b}]": _library(distance, b) for b in library_backends(device)}
    found["reference"] = _reference(distance)
    found["naive"] = {"emd": naive_emd, "mmd": naive_mmd, "bd": naive_bd}[distance]
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
