"""Collectives for negatives from every rank: an all-gather with the right gradient, and the
global statistics the MMD grid needs. Without an initialised process group (or with one rank)
each function is the identity on this process's data."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherRows(torch.autograd.Function):
    """Forward: the (W B, ...) rows of every rank, rank order. Backward: the gradient of the
    gathered rows summed over ranks (every rank's loss uses every rank's rows), then this
    rank's B rows. A backward that returned only the local gradient (or a mean) would drop
    (or scale by 1/W) the gradient that other ranks' queries send to these rows."""

    @staticmethod
    def forward(ctx, rows):
        rank, size = world()
        parts = [torch.empty_like(rows) for _ in range(size)]
        dist.all_gather(parts, rows.contiguous())
        ctx.rank, ctx.rows = rank, rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W ranks -> (W B, ...) in rank order, differentiable (see _AllGatherRows).
    Every rank must pass the same shape."""
    if world()[1] == 1:
        return rows
    return _AllGatherRows.apply(rows)


def global_value_range(*tensors: torch.Tensor) -> tuple[float, float]:
    """(min, max) of the values of ``tensors`` over all ranks (one all-reduce, one host sync)."""
    with torch.no_grad():
        lo = torch.stack([t.detach().min() for t in tensors]).min().double()
        hi = torch.stack([t.detach().max() for t in tensors]).max().double()
        extremes = torch.stack([-lo, hi])
        if world()[1] > 1:
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        neg_lo, hi = extremes.tolist()
        return -neg_lo, hi


def global_pooled_std(*tensors: torch.Tensor) -> torch.Tensor:
    """The standard deviation of all values of ``tensors`` over all ranks (float64 (1,), detached;
    1 where it is 0), from per-rank counts, means and sums of squared deviations (Chan's
    combination: no float cancellation of raw sums of squares)."""
    with torch.no_grad():
        values = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        mean = values.mean()
        count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
        stats = torch.stack([count, mean, (values - mean).square().sum()])
        if world()[1] > 1:
            parts = [torch.empty_like(stats) for _ in range(world()[1])]
            dist.all_gather(parts, stats)
            stats = torch.stack(parts)
        else:
            stats = stats.unsqueeze(0)
        counts, means, squares = stats.unbind(1)
        total = counts.sum()
        pooled_mean = (counts * means).sum() / total
        variance = (squares.sum() + (counts * (means - pooled_mean).square()).sum()) / total
        std = variance.sqrt()
        return torch.where(std > 0, std, torch.ones_like(std)).reshape(1)
