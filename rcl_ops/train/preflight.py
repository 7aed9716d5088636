"""Checks that depend on the machine, run before a run folder is created: packages, device, distance
backend, thread count and whether the network fits in memory. (The options themselves are checked by
``TrainConfig.validate``, the data when it is loaded.)"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import select_backend
from .config import TrainConfig
from .methods import METHODS
from .models import DEFAULT_DEPTH, DEFAULT_WIDTH, ResNet50Encoder, configured_model, layer_output_count

BYTES_PER_VALUE = 4  # float32 weights and activations
# Copies of the network's weights alive at once: the seed's initial network and its saved state, the
# network being trained, its gradients, Adam's two moments, the fine-tuning copy, a checkpoint being
# serialised.
WEIGHT_COPIES = 8
GIB = 2**30


class RunError(RuntimeError):
    """A run that cannot start: an existing run folder without --resume, nothing to resume, changed
    options on resume, a damaged run file, a missing package, or a machine that cannot run it."""


def require_packages(config: TrainConfig) -> None:
    """Fail before any training if a package this run needs is missing (RunError naming them)."""
    needed = {"skimage": "scikit-image", "safetensors": "safetensors"}
    if config.progress:
        needed["tqdm"] = "tqdm"
    if config.plots:
        needed.update({"matplotlib": "matplotlib", "scipy": "scipy"})
    if config.tensorboard:
        needed["tensorboard"] = "tensorboard"
    missing = sorted(pip for module, pip in needed.items() if importlib.util.find_spec(module) is None)
    if missing:
        raise RunError(
            f"this run needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)} "
            "(or pass --no-progress / --no-plots where they are optional)"
        )


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; RunError for a CUDA device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_machine(config: TrainConfig, device: torch.device) -> None:
    """RunError unless this machine can run ``config`` on ``device``: packages, thread count, the
    distance backend and the memory the network needs."""
    require_packages(config)
    cpus = os.cpu_count()
    if config.threads is not None and cpus is not None and config.threads > cpus:
        raise RunError(f"--threads {config.threads} exceeds the {cpus} CPUs of this machine")
    # every RCL objective (controls included) computes the distances, so do the figures
    if any(METHODS[m].family == "rcl" for m in config.methods) or config.plots:
        try:
            select_backend(config.distance_backend, device, where="--distance-backend")
        except (ValueError, RuntimeError) as error:
            raise RunError(str(error)) from error
    estimate = estimate_memory(config)
    available = available_memory(device)
    if available is not None and estimate.total_bytes > available:
        raise RunError(
            f"{estimate.describe(config)}, but only {gib(available)} is free on {device}; lower --width "
            "or --depth (or --batch-size, --crop-size)"
        )


@dataclass
class MemoryEstimate:
    """A rough account of the memory a run needs for training: the network's weights in all their
    copies, and the activations of the larger of a pre-training and a fine-tuning batch."""

    parameters: int
    weight_bytes: int
    activation_bytes: int
    crops: int
    padded_size: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def describe(self, config: TrainConfig) -> str:
        width = config.width or DEFAULT_WIDTH[config.model]
        depth = config.depth or DEFAULT_DEPTH[config.model]
        padded = (
            f" (padded to {self.padded_size}x{self.padded_size}, a multiple of 2^depth)"
            if self.padded_size != config.crop_size
            else ""
        )
        return (
            f"--model {config.model} --width {width} --depth {depth} needs about {gib(self.total_bytes)}: "
            f"{self.parameters:.3g} parameters take {gib(self.weight_bytes)} as weights, gradients, "
            f"Adam state and copies, and the activations of {self.crops} crops of {config.crop_size}x"
            f"{config.crop_size}{padded} about {gib(self.activation_bytes)}"
        )


def estimate_memory(config: TrainConfig) -> MemoryEstimate:
    """Count parameters and layer outputs on the meta device: nothing is allocated or computed, so it is
    instant even for a network that could never be built."""
    raw = config.modality == "raw"
    channels, size = (1 if raw else 3), config.crop_size
    rcl_on_rgb = not raw and any(METHODS[m].consistency for m in config.methods)
    with torch.device("meta"):
        model = configured_model(config)
        parameters = sum(p.numel() for p in model.parameters())
        pretrain_crops = 2 * config.batch_size  # two crops of each image
        pretraining = layer_output_count(model.train(), torch.empty(pretrain_crops, channels, size, size))
        frozen = 0
        if rcl_on_rgb:  # the consistency loss runs the encoder on x and f(x)
            encoder = ResNet50Encoder(config.encoder_stages)
            frozen = sum(p.numel() for p in encoder.parameters())
            pretraining += 2 * layer_output_count(encoder, torch.empty(pretrain_crops, 3, size, size))
        finetuning = layer_output_count(model.eval(), torch.empty(config.finetune_batch_size, channels, size, size))
    multiple = 2 ** (config.depth or DEFAULT_DEPTH["unet"]) if config.model == "unet" else 1
    return MemoryEstimate(
        parameters=parameters,
        weight_bytes=BYTES_PER_VALUE * (WEIGHT_COPIES * parameters + frozen),
        activation_bytes=BYTES_PER_VALUE * max(pretraining, finetuning),
        crops=pretrain_crops if pretraining >= finetuning else config.finetune_batch_size,
        padded_size=-(-size // multiple) * multiple,
    )


def gib(num_bytes: int) -> str:
    """A byte count in GiB for messages: 0.0805 GiB, 22.7 GiB, 3,810 GiB."""
    value = num_bytes / GIB
    return f"{value:.3g} GiB" if value < 1000 else f"{value:,.0f} GiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes still free for this process on ``device``: the GPU's free memory, or on the CPU the smaller
    of the kernel's MemAvailable and what the cgroup limit leaves; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None
