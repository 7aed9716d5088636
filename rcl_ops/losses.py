"""The residual contrastive loss (Eq. 5, Algorithm 1) as an nn.Module."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._backend import available_backends
from ._checks import DEFAULT_NUM_BINS, check_default_bandwidth, check_loss, checked_options
from .distributed import all_gather_rows, check_batches, global_pooled_std, global_value_range, world
from .ops import pair_mmd_sketches, pairwise_bd, pairwise_emd, pairwise_mmd
from .sketch import Sketch, bd_sketch, check_same_layout, check_sketch_options, emd_sketch, mmd_sketch

DISTANCES: dict[str, Callable[..., torch.Tensor]] = {
    "emd": pairwise_emd,
    "mmd": pairwise_mmd,
    "bd": pairwise_bd,
}


def _keyword_names(fn: Callable) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@checked_options("distances")
def residual_contrastive_loss(
    distances: torch.Tensor,
    temperature: float,
    symmetric: bool = False,
    reduction: str = "mean",
    first_positive: int = 0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """InfoNCE over a (Bq, Bk) distance matrix: logits -D / temperature, row i's target is
    column first_positive + i; every other column is a negative (Bk > Bq: extra negatives).

    symmetric=True (square D, first_positive 0) averages the row-wise and the column-wise
    losses. reduction "none" returns the (Bq,) per-row losses.
    backend: "reference" computes it with torch's cross entropy; any other name uses the fused
    native op (rcl_ops::info_nce: losses and their derivative in one pass, in float64) where it is
    loaded for the distances' device and they are float32 or float64, and torch ops elsewhere.
    """
    where = "residual_contrastive_loss"
    if not isinstance(distances, torch.Tensor) or not distances.is_floating_point():
        got = distances.dtype if isinstance(distances, torch.Tensor) else type(distances).__name__
        raise TypeError(f"{where}: distances must be a floating-point (B, B) tensor, got {got}")
    if distances.dim() != 2 or distances.shape[1] < max(2, first_positive + distances.shape[0]):
        raise ValueError(
            f"{where}: distances must be a (B, B) matrix with B >= 2, or (Bq, Bk) with Bk >= first_positive + Bq "
            f"(extra columns are negatives), got shape {tuple(distances.shape)}"
        )
    if distances.shape[0] == 0:
        raise ValueError(f"{where}: distances has no rows (shape {tuple(distances.shape)}): the loss needs a query")
    if symmetric and (distances.shape[0] != distances.shape[1] or first_positive):
        raise ValueError(f"{where}: symmetric=True needs a square (B, B) matrix, got shape {tuple(distances.shape)}")
    if backend != "reference" and _fused_loss_serves(distances):
        loss = torch.ops.rcl_ops.info_nce(distances, float(temperature), symmetric, first_positive)[0]
    else:
        logits = -distances / temperature
        target = torch.arange(first_positive, first_positive + logits.shape[0], device=logits.device)
        loss = F.cross_entropy(logits, target, reduction="none")
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.t(), target, reduction="none"))
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return check_loss(loss, distances, temperature, where)


def _fused_loss_serves(distances: torch.Tensor) -> bool:
    """Whether the native library's fused InfoNCE op runs on ``distances``: float32 or float64, on a
    device whose native backend ("cpu" or "cuda") is loaded."""
    return distances.dtype in (torch.float32, torch.float64) and distances.device.type in available_backends(
        distances.device
    )


SKETCHES = {"emd": emd_sketch, "mmd": mmd_sketch, "bd": bd_sketch}
# The distance options that shape the sketch; the others (eps, bandwidth, unbiased) apply when pairing.
SKETCH_OPTIONS = {"emd": ("num_quantiles", "backend"), "mmd": ("value_range", "num_bins"), "bd": ("backend",)}


class ResidualContrastiveLoss(nn.Module):
    """Residual contrastive loss of RCL (Eq. 5): InfoNCE with a negative statistical distance.

    forward(q, k): q (Bq, ...) and k (Bk, ...) residual batches, Bk >= Bq >= 1, Bk >= 2: k[i]
    is q[i]'s positive (the other crop of image i), every other key a negative (keys beyond Bq
    are extra negatives). D = distance(q, k) is (Bq, Bk); the loss is the cross entropy of the
    logits -D / temperature, row i's target column i, reduced by ``reduction`` ("mean", "sum"
    or "none" for (Bq,)).

    distance: "emd", "mmd", "bd" or a callable (q, k) -> (Bq, Bk); ``distance_kwargs`` go to
    the distance function (e.g. num_quantiles=, bandwidth=, eps=, backend=, value_range=).
    symmetric: also use each column as a query (k[j] against all q), and average (Bq = Bk).

    gather_distributed: under torch.distributed, the keys of every rank are negatives of every
    query: key sketches are all-gathered (K floats per residual, not M), with a backward that
    sums the gathered gradient over ranks; rank r's targets are offset by r Bk. With the default
    reduction "mean" (over this rank's queries) and DDP's gradient averaging, W ranks with batch
    B give the loss (mean over ranks) and gradients of one process with batch W B. MMD without
    value_range: the grid spans the min/max over all ranks (an all-reduce) and the default
    bandwidth is the pooled std over all ranks, as one process would compute them. Every rank
    must pass q and k of the same sizes: one all-gather of six integers per step checks it (and
    NaN/Inf on any rank), and every rank raises a ValueError where they differ.

    queue_size=Q: the sketches of the last Q keys (after this rank's, or with
    gather_distributed all ranks', keys of each training-mode forward) are extra negatives,
    detached, FIFO; kept in ``state_dict`` (``queue`` returns them). Needs a fixed sketch
    layout: EMD with num_quantiles=K (or exact with a constant M), MMD with value_range.
    With gather_distributed, reduction "sum" gives 1/W of one process's gradients under DDP.
    """

    @checked_options("self", "distance", "distance_kwargs", where="ResidualContrastiveLoss")
    def __init__(
        self,
        distance: str | Callable[..., torch.Tensor] = "emd",
        temperature: float = 0.1,
        symmetric: bool = False,
        reduction: str = "mean",
        gather_distributed: bool = False,
        queue_size: int = 0,
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
        if (gather_distributed or queue_size) and not isinstance(distance, str):
            raise ValueError(f"{where}: gather_distributed and queue_size need a named distance (emd, mmd, bd)")
        if (gather_distributed or queue_size) and symmetric:
            raise ValueError(
                f"{where}: symmetric=True is not supported with gather_distributed or queue_size "
                "(the columns would need every rank's queries)"
            )
        if distance == "mmd" and (gather_distributed or queue_size) and distance_kwargs.get("method") == "direct":
            raise ValueError(
                f"{where}: gather_distributed and queue_size pair MMD sketches: use method='grid' or 'auto'"
            )
        if distance == "mmd" and queue_size and distance_kwargs.get("value_range") is None:
            raise ValueError(
                f"{where}: queue_size with distance 'mmd' needs value_range=(lo, hi): queued binned weights pair "
                "only on one fixed grid, and the batch's own range changes every step"
            )
        self.temperature = temperature
        self.symmetric = symmetric
        self.reduction = reduction
        self.gather_distributed = gather_distributed
        self.queue_size = queue_size
        self.distance_kwargs = distance_kwargs
        self._queue: Sketch | None = None  # (Q, S) ring of detached key sketches once full
        self._queue_next = 0  # the ring slot the next key goes to
        self._queue_filled = 0

    @property
    def _loss_backend(self) -> str:
        """The distance's backend, which also picks the cross entropy's: "reference" keeps the whole
        loss in torch ops (residual_contrastive_loss)."""
        return self.distance_kwargs.get("backend", "auto")

    def extra_repr(self) -> str:
        options = "".join(f", {key}={value!r}" for key, value in self.distance_kwargs.items())
        return (
            f"distance={self.distance_name!r}, temperature={self.temperature}, "
            f"symmetric={self.symmetric}, reduction={self.reduction!r}, "
            f"gather_distributed={self.gather_distributed}, queue_size={self.queue_size}{options}"
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        where = "ResidualContrastiveLoss"
        for name, x in (("q", q), ("k", k)):
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                raise TypeError(f"{where}: {name} must be a (B, ...) tensor")
        if k.shape[0] < q.shape[0]:
            raise ValueError(
                f"{where}: q has batch size {q.shape[0]} but k has {k.shape[0]}; "
                "row i of q and row i of k must be two crops of the same image (extra keys are negatives)"
            )
        if k.shape[0] < 2 or q.shape[0] < 1:
            raise ValueError(f"{where}: a batch of {q.shape[0]} has no negatives; use a batch of at least 2")
        if self.gather_distributed or self.queue_size:
            distances, first_positive = self._sketch_distances(q, k)
            return residual_contrastive_loss(
                distances, self.temperature, False, self.reduction, first_positive, backend=self._loss_backend
            )
        distances = self.distance_fn(q, k, **self.distance_kwargs)
        if not isinstance(distances, torch.Tensor) or distances.shape != (q.shape[0], k.shape[0]):
            got = tuple(distances.shape) if isinstance(distances, torch.Tensor) else type(distances).__name__
            raise ValueError(f"{where}: the distance must return a ({q.shape[0]}, {k.shape[0]}) tensor, got {got}")
        return residual_contrastive_loss(
            distances, self.temperature, self.symmetric, self.reduction, backend=self._loss_backend
        )

    def _sketch_distances(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(Bq, W Bk + queued) distances from sketches, and the column of q[0]'s positive."""
        where = "ResidualContrastiveLoss"
        check_batches(q, k, where, across_ranks=self.gather_distributed)
        options = dict(self.distance_kwargs)
        pair_options = {
            key: v for key, v in options.items() if key == "backend" or key not in SKETCH_OPTIONS[self.distance_name]
        }
        sketch_options = {key: options[key] for key in SKETCH_OPTIONS[self.distance_name] if key in options}
        if self.distance_name == "mmd":
            bandwidths = self._bandwidths(q, k, pair_options.pop("bandwidth", None), where)
            if options.get("value_range") is None:
                lo, hi = global_value_range(q, k)
                # The span the fused grid op uses: at least 1e-3 of the smallest bandwidth.
                sketch_options["value_range"] = (lo, lo + max(hi - lo, 1e-3 * bandwidths.min().item()))
        sketch = SKETCHES[self.distance_name]
        sketch_q, sketch_k = sketch(q, **sketch_options), sketch(k, **sketch_options)
        rank, _ = world()
        if self.gather_distributed:
            sketch_k = sketch_k.with_values(all_gather_rows(sketch_k.values))
        first_positive = rank * k.shape[0] if self.gather_distributed else 0
        keys = sketch_k
        if self._queue is not None and self._queue_filled:
            queued = self._queue.with_values(self._queue.values[: self._queue_filled].to(sketch_k.values.device))
            check_same_layout(queued, sketch_k, "ResidualContrastiveLoss (queue_size)")
            keys = Sketch.cat([sketch_k, queued])
        if self.distance_name == "mmd":
            unbiased, method = pair_options.get("unbiased", False), pair_options.get("method", "auto")
            distances = pair_mmd_sketches(sketch_q, keys, bandwidths, unbiased, method, "pairwise_mmd")
        else:
            distances = self.distance_fn(sketch_q, keys, **pair_options)
        if self.queue_size and self.training:
            self._enqueue(sketch_k.detach())
        return distances, first_positive

    @staticmethod
    def _bandwidths(q: torch.Tensor, k: torch.Tensor, bandwidth: tuple[float, ...] | None, where: str) -> torch.Tensor:
        """The MMD bandwidths as a float64 tensor (no host sync): the option, or the pooled std over
        every rank's values."""
        if bandwidth is None:
            return check_default_bandwidth(global_pooled_std(q, k), where)
        return torch.tensor(bandwidth, dtype=torch.float64, device=q.device)

    def _enqueue(self, keys: Sketch) -> None:
        """Write the key sketches into the ring of the last queue_size ones, oldest overwritten first."""
        values = keys.values[-self.queue_size :]
        if self._queue is None:
            self._queue = keys.with_values(values.new_zeros((self.queue_size, values.shape[1])))
        check_same_layout(self._queue, keys, "ResidualContrastiveLoss (queue_size)")
        slots = (self._queue_next + torch.arange(values.shape[0])) % self.queue_size
        self._queue.values[slots.to(values.device)] = values.to(self._queue.values.dtype)
        self._queue_next = (self._queue_next + values.shape[0]) % self.queue_size
        self._queue_filled = min(self.queue_size, self._queue_filled + values.shape[0])

    @property
    def queue(self) -> Sketch | None:
        """The queued key sketches, oldest first (None before the first enqueue)."""
        if self._queue is None:
            return None
        values = self._queue.values
        if self._queue_filled == self.queue_size:
            values = torch.roll(values, -self._queue_next, dims=0)
        return self._queue.with_values(values[: self._queue_filled])

    def get_extra_state(self) -> dict:
        queue = self.queue
        if queue is None:
            return {}
        layout = {f: getattr(queue, f) for f in ("distance", "num_values", "dtype", "num_quantiles", "value_range")}
        return {"queue_values": queue.values.detach().cpu(), "queue_layout": layout}

    def set_extra_state(self, state: dict) -> None:
        where = "ResidualContrastiveLoss"
        self._queue, self._queue_next, self._queue_filled = None, 0, 0
        if not state:
            return
        saved = Sketch(values=state["queue_values"], **state["queue_layout"])
        if not self.queue_size or saved.distance != self.distance_name or len(saved) > self.queue_size:
            raise ValueError(
                f"{where}: the state holds a queue of {saved.distance} sketches ({len(saved)} of them), but this "
                f"loss has distance {self.distance_name!r} and queue_size {self.queue_size}"
            )
        options = self.distance_kwargs
        layout = {
            "emd": {"num_quantiles": options.get("num_quantiles")},
            "mmd": {"value_range": options.get("value_range"), "num_bins": options.get("num_bins") or DEFAULT_NUM_BINS},
            "bd": {},
        }[self.distance_name]
        check_sketch_options(saved, "the state's queue", where, **layout)
        if len(saved):
            self._enqueue(saved)
