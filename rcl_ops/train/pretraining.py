"""The pre-training loop, the same for every method: Adam on the method's ``Objective`` (losses.py), its
hooks called at fixed points, checkpoints every --checkpoint-every steps, resumable, and DDP under torchrun."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .checkpoints import restore_pretraining, save_pretraining_checkpoint
from .config import TrainConfig
from .data import CropSampler
from .diagnostics import summarise_history
from .losses import Objective
from .models import configured_model, non_finite_tensors
from .run_log import RunLogger, progress_bar
from .seeding import derive_seed


@dataclass
class Position:
    """Where a run is, for the line an interruption (Ctrl-C) prints: the run folder once claimed, the stage, its
    variant and seed, and the step in progress."""

    run_dir: Path | None = None
    stage: str = ""
    tag: str = ""
    step: int | None = None

    def at(self, stage: str, tag: str = "", step: int | None = None) -> None:
        self.stage, self.tag, self.step = stage, tag, step

    def interrupted(self) -> str:
        """'interrupted at step 3 of pre-training n2n/seed0; resume with --resume --run-name ...'."""
        if self.run_dir is None:
            return "interrupted before the run folder was created; nothing was written"
        where = " ".join(filter(None, [self.stage, self.tag]))
        if self.step is not None:
            where = f"at step {self.step} of {where}"
        else:
            where = f"during {where}" if where else "before training started"
        resume = f"--resume --run-name {self.run_dir.name} --output-dir {self.run_dir.parent}"
        return f"interrupted {where}; resume with {resume}"


@dataclass(frozen=True)
class RunContext:
    """What every stage of a run shares: its device, where messages go (``say``), the metrics log (rank 0's;
    None elsewhere), whether to show progress bars, this process's place among the ranks, and where the run is
    (``position``, kept up to date by the stages)."""

    device: torch.device
    say: Callable[[str], None] = print
    logger: RunLogger | None = None
    progress: bool = False
    ranks: distributed.DistributedState = distributed.SINGLE
    position: Position = field(default_factory=Position)

    def log(self, key: str, seed: int, phase: str, step: int, values: dict[str, float]) -> None:
        """One row of metrics.csv (rank 0 only)."""
        if self.logger is not None:
            self.logger.log(key, seed, phase, step, values)

    def bar(self, description: str) -> Callable:
        return progress_bar(self.progress, description)


def initial_network(config: TrainConfig, seed: int) -> nn.Module:
    """Seed ``seed``'s initial network, drawn from the global random state seeded by (seed, "init")."""
    torch.manual_seed(derive_seed(seed, "init"))
    return configured_model(config)


def pretrain(
    model: nn.Module,
    objective: Objective,
    sampler: CropSampler,
    config: TrainConfig,
    context: RunContext,
    checkpoint_dir: Path,
    key: str,
    seed: int,
) -> dict:
    """Optimise ``objective`` for ``config.pretrain_steps`` steps with Adam; checkpoint into
    ``checkpoint_dir`` every ``config.checkpoint_every`` steps and at the end, and with --resume start from
    the newest readable checkpoint there. Logged as variant ``key``, ``seed``. Returns {"steps", "seconds",
    "final_loss", "resumed_from", "diagnostics"}. Under torchrun (``context.ranks``): DDP, each rank its
    shard of the global batch, rank 0 reads and writes the checkpoints (rcl_ops/train/distributed.py)."""
    loop = _Loop.start(model, objective, sampler, config, context, checkpoint_dir, f"{key}/seed{seed}")
    ranks, start, last_loss, history = context.ranks, loop.start_step, loop.start_loss, loop.history
    started = time.perf_counter()
    steps = context.bar(f"pre-train {loop.tag}")(
        range(start, config.pretrain_steps), initial=start, total=config.pretrain_steps
    )
    for step in steps:
        done = step + 1
        context.position.at("pre-training", loop.tag, done)
        logging = ranks.is_main and (done == 1 or done % config.log_every == 0 or done == config.pretrain_steps)
        loss, parts = loop.step(logging, done)
        if not ranks.is_main:
            continue
        last_loss = loss
        if logging:
            values = {"loss": last_loss, **{name: float(value) for name, value in parts.items()}}
            context.log(key, seed, "pretrain", done, values)
            history.append({"step": done, **values})
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{last_loss:.4g}")
        if done % config.checkpoint_every == 0 or done == config.pretrain_steps:
            loop.save({"step": done, "loss": last_loss, "history": history})
    broken = non_finite_tensors(model)  # the loss is checked before each update: this is the last update's check
    if broken:
        raise FloatingPointError(
            f"pre-training left non-finite weights ({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}) "
            f"after its last update, step {config.pretrain_steps}; try {objective.divergence_advice}"
        )
    return {
        "steps": config.pretrain_steps,
        "seconds": time.perf_counter() - started,
        "final_loss": last_loss,
        "resumed_from": start,
        "diagnostics": summarise_history(history),
    }


@dataclass
class _Loop:
    """One pre-training's state: the model (``trained``: DDP-wrapped under torchrun), the objective, the
    sampler, the optimizer, and where it starts (a restored checkpoint's step, loss and logged history)."""

    model: nn.Module
    trained: nn.Module
    objective: Objective
    sampler: CropSampler
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    context: RunContext
    checkpoint_dir: Path
    tag: str
    start_step: int = 0
    start_loss: float = math.nan
    history: list = field(default_factory=list)

    @classmethod
    def start(cls, model, objective, sampler, config, context, checkpoint_dir, tag) -> _Loop:
        """The optimizer over the model's and the objective's own parameters, restored from the newest
        readable checkpoint with --resume (rank 0 reads it, every rank gets it)."""
        # An objective with state of its own (momentum encoders, queues, projection heads: MoCo, PixCL)
        # starts afresh from the model, trains its own heads with the model and is checkpointed with it.
        objective.start(model, sampler.generator)
        parameters = [*model.parameters(), *objective.extra_parameters()]
        optimizer = torch.optim.Adam(
            parameters, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps
        )
        saved = None
        if config.resume and context.ranks.is_main:

            def say(message: str) -> None:
                context.say(f"  {tag}: {message}")

            state = objective.checkpoint_state()
            saved = restore_pretraining(checkpoint_dir, model, optimizer, sampler.generator, say, state)
        saved = distributed.share_training_state(model, optimizer, sampler.generator, saved, context.ranks)
        trained = distributed.wrap(model, context.ranks)
        loop = cls(model, trained, objective, sampler, optimizer, config, context, checkpoint_dir, tag)
        if saved is not None:
            loop.start_step, loop.start_loss = saved["step"], float(saved.get("loss", math.nan))
            loop.history = [row for row in saved.get("history", []) if row.get("step", math.inf) <= loop.start_step]
        model.train()
        return loop

    def step(self, logging: bool, done: int) -> tuple[float, dict]:
        """Optimisation step number ``done``: the global batch's loss and the logged parts (with the
        objective's diagnostics when ``logging``). FloatingPointError when the loss is not finite."""
        ranks, config = self.context.ranks, self.config
        batch = distributed.shard(self.sampler.sample(config.batch_size * ranks.world_size), ranks)
        loss, parts = self.objective(self.trained, batch.to(self.context.device), self.sampler.generator)
        global_loss = distributed.mean_over_ranks(loss.detach(), ranks)  # the loss of the global batch
        if not torch.isfinite(global_loss):
            raise FloatingPointError(
                f"pre-training loss became {float(global_loss)} at step {done}; try {self.objective.divergence_advice}"
            )
        # Extra backward passes that leave the training gradient unchanged; in one process only (under DDP
        # they would run rank 0's graph alone, outside DDP's gradient reduction).
        if logging and not ranks.active:
            parts.update(self.objective.step_diagnostics(self.model))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.objective.after_step(self.model)
        return float(global_loss), parts

    def save(self, meta: dict) -> None:
        state = self.objective.checkpoint_state()
        save_pretraining_checkpoint(
            self.checkpoint_dir, self.model, self.optimizer, self.sampler.generator, meta, state
        )
