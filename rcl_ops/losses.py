"""The residual contrastive loss (Eq. 5, Algorithm 1) as an nn.Module."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_float
from .ops import pairwise_bd, pairwise_emd, pairwise_mmd

DISTANCES: dict[str, Callable[..., torch.Tensor]] = {
    "emd": pairwise_emd,
    "mmd": pairwise_mmd,
    "bd": pairwise_bd,
}
REDUCTIONS = ("mean", "sum", "none")


def _keyword_names(fn: Callable) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_reduction(reduction, where: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: unknown reduction {reduction!r}; choose one of {REDUCTIONS}")


def residual_contrastive_loss(
    distances: torch.Tensor, temperature: float, symmetric: bool = False, reduction: str = "mean"
) -> torch.Tensor:
    """InfoNCE over a (B, B) distance matrix: logits -D / temperature, row i's target is column i.

    symmetric=True averages the row-wise and the column-wise losses. reduction "none"
    returns the (B,) per-pair losses.
    """
    where = "residual_contrastive_loss"
    if not isinstance(distances, torch.Tensor) or not distances.is_floating_point():
        got = distances.dtype if isinstance(distances, torch.Tensor) else type(distances).__name__
        raise TypeError(f"{where}: distances must be a floating-point (B, B) tensor, got {got}")
    if distances.dim() != 2 or distances.shape[0] != distances.shape[1] or distances.shape[0] < 2:
        raise ValueError(f"{where}: distances must be a (B, B) matrix with B >= 2, got shape {tuple(distances.shape)}")
    temperature = check_positive_float(temperature, "temperature", where)
    if not isinstance(symmetric, bool):
        raise TypeError(f"{where}: symmetric must be a bool, got {type(symmetric).__name__}")
    _check_reduction(reduction, where)
    logits = -distances / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.t(), target, reduction="none"))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class ResidualContrastiveLoss(nn.Module):
    """Residual contrastive loss of RCL (Eq. 5): InfoNCE with a negative statistical distance.

    forward(q, k): q and k are (B, ...) residual batches (first and second crops of the same
    B images, B >= 2). D = distance(q, k) is (B, B); the loss is the cross entropy of the
    logits -D / temperature with row i's target at column i (k[i] is q[i]'s positive, the
    other k[j] its negatives), reduced by ``reduction`` ("mean", "sum" or "none" for (B,)).

    distance: "emd", "mmd", "bd" or a callable (q, k) -> (B, B); ``distance_kwargs`` go to
    the distance function (e.g. num_quantiles=, bandwidth=, eps=, backend=).
    symmetric: also use each column as a query (k[j] against all q), and average.
    """

    def __init__(
        self,
        distance: str | Callable[..., torch.Tensor] = "emd",
        temperature: float = 0.1,
        symmetric: bool = False,
        reduction: str = "mean",
        **distance_kwargs,
    ):
        super().__init__()
        where = "ResidualContrastiveLoss"
        if isinstance(distance, str):
            if distance not in DISTANCES:
                raise ValueError(f"{where}: unknown distance {distance!r}; choose one of {sorted(DISTANCES)}")
            allowed = _keyword_names(DISTANCES[distance])
            unknown = sorted(set(distance_kwargs) - allowed)
            if unknown:
                raise TypeError(
                    f"{where}: distance {distance!r} takes no option(s) {unknown}; it takes {sorted(allowed)}"
                )
            self.distance_name = distance
            self.distance_fn = DISTANCES[distance]
        elif callable(distance):
            self.distance_name = getattr(distance, "__name__", type(distance).__name__)
            self.distance_fn = distance
        else:
            raise TypeError(f"{where}: distance must be a name or a callable, got {type(distance).__name__}")
        self.temperature = check_positive_float(temperature, "temperature", where)
        _check_reduction(reduction, where)
        self.symmetric = bool(symmetric)
        self.reduction = reduction
        self.distance_kwargs = distance_kwargs

    def extra_repr(self) -> str:
        options = "".join(f", {key}={value!r}" for key, value in self.distance_kwargs.items())
        return (
            f"distance={self.distance_name!r}, temperature={self.temperature}, "
            f"symmetric={self.symmetric}, reduction={self.reduction!r}{options}"
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        where = "ResidualContrastiveLoss"
        for name, x in (("q", q), ("k", k)):
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                raise TypeError(f"{where}: {name} must be a (B, ...) tensor")
        if q.shape[0] != k.shape[0]:
            raise ValueError(
                f"{where}: q has batch size {q.shape[0]} but k has {k.shape[0]}; "
                "row i of q and row i of k must be two crops of the same image"
            )
        if q.shape[0] < 2:
            raise ValueError(f"{where}: a batch of {q.shape[0]} has no negatives; use a batch of at least 2")
        distances = self.distance_fn(q, k, **self.distance_kwargs)
        batch = q.shape[0]
        if not isinstance(distances, torch.Tensor) or distances.shape != (batch, batch):
            got = tuple(distances.shape) if isinstance(distances, torch.Tensor) else type(distances).__name__
            raise ValueError(f"{where}: the distance must return a ({batch}, {batch}) tensor, got {got}")
        return residual_contrastive_loss(distances, self.temperature, self.symmetric, self.reduction)
