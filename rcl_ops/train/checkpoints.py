"""Checkpoints (safetensors): model tensors, optimizer tensors, the sampling generator's state and an
objective's own state; step and optimizer hyper-parameters in the metadata. Pre-training keeps the last two
(pretrain_last, pretrain_previous), so a damaged last one falls back to the one before."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .files import DamagedFileError, WriteError, atomic_path
from .preflight import RunError

PRETRAIN_LAST = "pretrain_last.safetensors"
PRETRAIN_PREVIOUS = "pretrain_previous.safetensors"


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    metadata: dict | None = None,
    extra: nn.Module | None = None,
) -> None:
    """Write model (and optimizer/generator, and ``extra``: a stateful objective's momentum encoders and
    queues) state to ``path`` atomically as safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {f"model.{key}": value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if extra is not None:
        tensors.update({f"extra.{key}": value.detach().cpu().contiguous() for key, value in extra.state_dict().items()})
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, entries in state["state"].items():
            for name, value in entries.items():
                value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
        meta["optimizer_param_groups"] = json.dumps(state["param_groups"])
    if generator is not None:
        tensors["generator_state"] = generator.get_state()
    try:
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata=meta)
    except SafetensorError as error:  # safetensors' own error for a failing write (a full disk)
        raise WriteError(path, error) from error


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    extra: nn.Module | None = None,
) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns the decoded metadata. DamagedFileError naming the
    file when it cannot be read or does not fit ``model``/``optimizer``/``generator``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise DamagedFileError(path, f"{type(error).__name__}: {error}") from error
    try:
        model.load_state_dict({key[6:]: value for key, value in tensors.items() if key.startswith("model.")})
        if extra is not None:
            extra.load_state_dict({key[6:]: value for key, value in tensors.items() if key.startswith("extra.")})
        if optimizer is not None:
            state: dict = {}
            for key, value in tensors.items():
                if key.startswith("optimizer."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            optimizer.load_state_dict({"state": state, "param_groups": meta.pop("optimizer_param_groups")})
        if generator is not None:
            generator.set_state(tensors["generator_state"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise DamagedFileError(path, f"its contents do not fit this run: {type(error).__name__}: {error}") from error
    return meta


def save_pretraining_checkpoint(
    checkpoint_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    meta: dict,
    extra: nn.Module | None = None,
) -> None:
    """Save the pre-training state as pretrain_last, keeping the one it replaces as pretrain_previous."""
    last = checkpoint_dir / PRETRAIN_LAST
    if last.exists():
        os.replace(last, checkpoint_dir / PRETRAIN_PREVIOUS)
    save_checkpoint(last, model, optimizer, generator, meta, extra)


def restore_pretraining(
    checkpoint_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    say: Callable[[str], None],
    extra: nn.Module | None = None,
) -> dict | None:
    """Load the newest readable pre-training checkpoint; returns its metadata, or None if there is none.

    A damaged pretrain_last is named through ``say``, renamed to ``*.damaged`` (so the next save does
    not keep it as the fallback) and pretrain_previous loaded instead; RunError naming the damaged files
    when no checkpoint is readable.
    """
    damaged: list[DamagedFileError] = []
    for path in (checkpoint_dir / PRETRAIN_LAST, checkpoint_dir / PRETRAIN_PREVIOUS):
        if not path.exists():
            continue
        try:
            meta = load_checkpoint(path, model, optimizer, generator, extra)
            if not isinstance(meta.get("step"), int):
                raise DamagedFileError(path, "its metadata holds no step")
        except DamagedFileError as error:
            damaged.append(error)
            continue
        for error in damaged:
            error.path.replace(error.path.with_suffix(".damaged"))
            say(f"{error}; moved aside as {error.path.with_suffix('.damaged').name}, resuming from {path.name}")
        return meta
    if damaged:
        names = " and ".join(str(error.path) for error in damaged)
        raise RunError(
            f"{'; '.join(map(str, damaged))}. No readable pre-training checkpoint is left: delete {names} "
            "to restart this pre-training from step 0"
        )
    return None
