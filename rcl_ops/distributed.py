"""Collectives for negatives from every rank: an all-gather with the right gradient, and the
global statistics the MMD grid needs. Without an initialised process group (or with one rank)
each function is the identity on this process's data."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._checks import check_all_finite, find_non_finite, host_checks_on, non_finite_message
from .ops import pooled_std, value_statistics


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


def check_batches(q: torch.Tensor, k: torch.Tensor, where: str, across_ranks: bool) -> None:
    """q and k finite where the NaN/Inf check is on, and, ``across_ranks`` under a process group of
    W > 1 ranks, of the same sizes on every rank (the gather and the targets' offsets assume it):
    one all-gather of six integers per rank, and a ValueError on every rank naming each rank's sizes,
    or the rank and batch index of a NaN or Inf (a rank that raised alone would leave the others
    waiting in the next collective)."""
    size = world()[1]
    if not across_ranks or size == 1 or torch.compiler.is_compiling():
        check_all_finite({"q": q, "k": k}, where)
        return
    found = find_non_finite({"q": q, "k": k}) if host_checks_on(q.device.type, where) else None
    bad = (-1, -1) if found is None else (("q", "k").index(found[0]), found[1][0])
    mine = torch.tensor([q.shape[0], q[0].numel(), k.shape[0], k[0].numel(), *bad], device=q.device)
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine)
    ranks = torch.stack(parts).tolist()
    if any(row[:4] != ranks[0][:4] for row in ranks):
        sizes = "; ".join(
            f"rank {r} passes k of {bk} residuals ({mk} values each) and q of {bq} ({mq} values each)"
            for r, (bq, mq, bk, mk, *_) in enumerate(ranks)
        )
        raise ValueError(f"{where} (gather_distributed): every rank must pass q and k of the same sizes: {sizes}")
    for r, (*_, tensor, index) in enumerate(ranks):
        if tensor >= 0:
            raise ValueError(f"{where}: rank {r}: {non_finite_message(('q', 'k')[tensor], [index], q.device.type)}")


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
    1 where it is 0): each rank's value_statistics all-gathered and pooled as default_bandwidth
    pools q's and k's. Every rank passes tensors of the same shapes."""
    counts, stats = zip(*(value_statistics(t) for t in tensors))
    stats = torch.stack(stats)
    size = world()[1]
    if size > 1:
        parts = [torch.empty_like(stats) for _ in range(size)]
        dist.all_gather(parts, stats)
        stats = torch.cat(parts)
    return pooled_std(list(counts) * size, stats)
