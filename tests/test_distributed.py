"""Negatives from every rank (gather_distributed) and the key queue of ResidualContrastiveLoss.

The equivalence test spawns 2 gloo processes (CPU) that train a small conv net under DDP with
per-rank batch B; one process with batch 2 B must give the same loss and parameter gradients."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rcl_ops
from rcl_ops.sketch import Sketch

WORLD = 2
BATCH = 3  # per rank
# (distance, options): every distance, the two EMD layouts, MMD on the all-reduced and on a fixed
# grid, and a queue (two steps, so the second pairs against the first step's keys).
CASES = [
    ("emd", {}),
    ("emd", {"num_quantiles": 16}),
    ("mmd", {"bandwidth": 0.5, "num_bins": 256}),
    ("mmd", {"num_bins": 256, "unbiased": True}),
    ("mmd", {"value_range": (-3.0, 3.0), "num_bins": 256, "queue_size": 8}),
    ("bd", {}),
    ("emd", {"num_quantiles": 16, "queue_size": 5}),
]
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of step ``step``: two crops' inputs, (WORLD * BATCH, 3, 6, 6) float64 each."""
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(WORLD * BATCH, 3, 6, 6, generator=generator, dtype=torch.float64)
    noise = 0.3 * torch.randn(2, *images.shape, generator=generator, dtype=torch.float64)
    return images + noise[0], images * 1.2 + noise[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Conv2d(3, 3, 3, padding=1).double()


def _run(distance: str, options: dict, rank: int, world: int, wrap=lambda m: m):
    """Loss values (one per step; the mean over ranks) and the last step's parameter gradients."""
    options = dict(options)
    loss_fn = rcl_ops.ResidualContrastiveLoss(distance, temperature=0.5, gather_distributed=True, **options)
    model = _model()
    trained = wrap(model)
    losses = []
    for step in range(STEPS):
        per_rank = WORLD * BATCH // world
        first, second = (x[rank * per_rank : (rank + 1) * per_rank] for x in _data(step))
        inputs = torch.cat([first, second])
        residuals = inputs - trained(inputs)
        model.zero_grad()
        loss = loss_fn(residuals[: len(first)], residuals[len(first) :])
        loss.backward()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value)
    return torch.stack(losses), [p.grad.clone() for p in model.parameters()], loss_fn.state_dict()


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for distance, options in CASES:
            losses, grads, state = _run(
                distance, options, rank, world, lambda m: torch.nn.parallel.DistributedDataParallel(m)
            )
            results.append((losses, grads, state))
        if rank == 0:
            torch.save(results, path)
        dist.barrier()  # both ranks finished (and rank 0's results are on disk)
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing gloo down: in 2 of about 8 full-suite runs rank 1 aborted in gloo's teardown
    # at exit ("terminate called without an active exception", SIGABRT) after every number was computed
    # and checked, with and without a barrier before destroy_process_group (never in 14 runs of this file
    # alone, under load or not). What this test checks is the numbers; the teardown is gloo's.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dist") / "results.pt")
    mp.spawn(_worker, args=(WORLD, _free_port(), path), nprocs=WORLD, join=True)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{d}-{'-'.join(o)}" for d, o in CASES])
def test_two_processes_match_one_process_with_the_global_batch(two_process_results, case):
    distance, options = CASES[case]
    losses, grads, state = _run(distance, options, rank=0, world=1)
    got_losses, got_grads, got_state = two_process_results[case]
    torch.testing.assert_close(got_losses, losses, rtol=1e-9, atol=1e-12)
    for got, want in zip(got_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    if options.get("queue_size"):
        torch.testing.assert_close(got_state["_extra_state"]["queue_values"], state["_extra_state"]["queue_values"])


@pytest.mark.parametrize("distance", ["emd", "bd", "mmd"])
def test_sketch_path_matches_the_fused_loss_in_one_process(distance):
    """gather_distributed without a process group is the plain loss (MMD: its grid and bandwidth)."""
    q, k = (torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    plain = rcl_ops.ResidualContrastiveLoss(distance)(q, k)
    gathered = rcl_ops.ResidualContrastiveLoss(distance, gather_distributed=True)(q, k)
    torch.testing.assert_close(gathered, plain, rtol=1e-9, atol=0)
    want = torch.autograd.grad(plain, (q, k))
    got = torch.autograd.grad(gathered, (q, k))
    # MMD's sketch backward differentiates the binned field numerically (tests/test_sketch.py).
    tolerance = {"rtol": 1e-3, "atol": 1e-6} if distance == "mmd" else {"rtol": 1e-9, "atol": 0.0}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)


def test_extra_keys_are_negatives():
    q, k = torch.randn(3, 20), torch.randn(5, 20)
    loss = rcl_ops.ResidualContrastiveLoss("bd", reduction="none")(q, k)
    distances = rcl_ops.pairwise_bd(q, k)
    want = torch.nn.functional.cross_entropy(-distances / 0.1, torch.arange(3), reduction="none")
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="symmetric=True needs a square"):
        rcl_ops.ResidualContrastiveLoss("bd", symmetric=True)(q, k)


def test_queue_is_fifo_detached_and_round_trips_through_state_dict():
    loss_fn = rcl_ops.ResidualContrastiveLoss("emd", num_quantiles=4, queue_size=5)
    batches = [torch.randn(2, 10, requires_grad=True) for _ in range(4)]
    for x in batches[:3]:
        loss_fn(x.detach(), x)
    queue = loss_fn.queue
    assert isinstance(queue, Sketch) and len(queue) == 5 and not queue.values.requires_grad
    want = torch.cat([rcl_ops.emd_sketch(x, num_quantiles=4).values for x in batches[:3]])[-5:]
    torch.testing.assert_close(queue.values, want)  # the oldest key was dropped
    # The queued keys are negatives without gradient: the gradient reaches only this step's keys.
    x = batches[3]
    loss_fn(x.detach(), x).backward()
    assert x.grad is not None and all(b.grad is None for b in batches[:3])
    state = loss_fn.state_dict()
    restored = rcl_ops.ResidualContrastiveLoss("emd", num_quantiles=4, queue_size=5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.queue.values, loss_fn.queue.values)
    q, k = torch.randn(2, 10), torch.randn(2, 10)
    torch.testing.assert_close(restored.eval()(q, k), loss_fn.eval()(q, k))
    assert len(loss_fn.queue) == 5  # eval mode does not enqueue


def test_queue_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs value_range"):
        rcl_ops.ResidualContrastiveLoss("mmd", queue_size=4)
    with pytest.raises(ValueError, match="queue_size must be a non-negative int"):
        rcl_ops.ResidualContrastiveLoss("emd", queue_size=-1)
    with pytest.raises(ValueError, match="symmetric=True is not supported"):
        rcl_ops.ResidualContrastiveLoss("emd", queue_size=4, symmetric=True)
    loss_fn = rcl_ops.ResidualContrastiveLoss("emd", queue_size=4)  # exact EMD: the sketch size is M
    loss_fn(torch.randn(2, 10), torch.randn(2, 10))
    with pytest.raises(ValueError, match="pass num_quantiles=K"):
        loss_fn(torch.randn(2, 12), torch.randn(2, 12))
    with pytest.raises(ValueError, match="queue of emd sketches"):
        rcl_ops.ResidualContrastiveLoss("bd", queue_size=4).load_state_dict(loss_fn.state_dict())
