"""Multi-process pre-training under ``torchrun --nproc-per-node N`` (DDP; gloo on CPU, nccl on GPU).

Every rank draws the same global batch of N x --batch-size images from the shared, seeded crop
sampler and keeps its own shard (rank r: images r B .. (r + 1) B - 1), so a run on N ranks sees
the data of one process with batch N B, and one saved sampler state resumes every rank. The
contrastive loss gathers the key sketches of all ranks (gather_distributed), DDP averages the
gradients. Rank 0 alone writes the run folder (config, logs, checkpoints, results) and runs the
proxy evaluation; on --resume it reads the checkpoint and broadcasts the training state.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedState:
    """This process's place in the run: rank and world size (0 and 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = DistributedState()


def start(device: torch.device) -> tuple[DistributedState, torch.device]:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT): nccl for CUDA, gloo for CPU; on CUDA each rank takes the
    GPU of its LOCAL_RANK. Without torchrun (WORLD_SIZE unset or 1): the single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return DistributedState(dist.get_rank(), dist.get_world_size()), device


def barrier(run: DistributedState) -> None:
    """Wait for every rank (a no-op in one process). Before stop on the success path: a rank
    that tears gloo down while another still talks to it can abort the other."""
    if run.active:
        dist.barrier()


def stop(run: DistributedState) -> None:
    if run.active and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value, run: DistributedState):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not run.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, run: DistributedState) -> nn.Module:
    """The model DDP-wrapped (gradients averaged over ranks), or itself for one process."""
    return nn.parallel.DistributedDataParallel(model) if run.active else model


def shard(batch, run: DistributedState):
    """This rank's B of the global batch's N B rows (every tensor field of a dataclass batch)."""
    if not run.active:
        return batch
    rows = next(t for t in dataclasses.astuple(batch) if t is not None).shape[0] // run.world_size

    def own(t):
        return None if t is None else t[run.rank * rows : (run.rank + 1) * rows]

    return dataclasses.replace(batch, **{f.name: own(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def mean_over_ranks(value: torch.Tensor, run: DistributedState) -> torch.Tensor:
    """The mean of a scalar over ranks (the global batch's loss with a per-rank mean loss)."""
    if not run.active:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / run.world_size


def share_training_state(model: nn.Module, optimizer, generator: torch.Generator, saved, run: DistributedState):
    """Rank 0's restored checkpoint metadata, model, optimizer and sampler states on every rank."""
    if not run.active:
        return saved
    state = None
    if run.is_main:
        state = {
            "saved": saved,
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
        }
    state = broadcast(state, run)
    if not run.is_main:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
    return state["saved"]
