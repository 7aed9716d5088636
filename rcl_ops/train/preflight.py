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
from .contrast_check import CHECK_BATCHES
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


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C; its message says where and how to resume."""


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
    available = available_memory(device)
    check_sizes(config, available, device)
    estimate = estimate_memory(config)
    if available is not None and estimate.total_bytes > available:
        raise RunError(
            f"{estimate.describe(config)}, but only {gib(available)} is free on {device}; lower --width "
            "or --depth (or --batch-size, --crop-size)"
        )


# Where the free memory is unknown: more than any machine has, and little enough that the meta-device
# estimate's int64 sizes cannot overflow.
UNKNOWN_MEMORY_LIMIT = 2**50


def size_floors(config: TrainConfig) -> list[tuple[int, str]]:
    """Lower bounds, in bytes, of what a run allocates, each with the options it grows with: the crops of a
    pre-training and a fine-tuning batch, the contrast check's fixed crop pairs (two crops, noisy and clean, of
    each of --batch-size images, at least CHECK_BATCHES batches), the first layer's outputs, the widest layer's
    weights in their copies. Python ints: exact for any value, where the meta-device estimate's int64 sizes
    overflow (a crop of 10**23) or its channel lists never end (a depth of 10**6)."""
    raw, packed = config.modality == "raw", config.raw_input == "packed"
    channels, size, batch = (1 if raw else 3), config.crop_size, config.batch_size
    width = config.width or DEFAULT_WIDTH[config.model]
    depth = config.depth or DEFAULT_DEPTH[config.model]
    side = size // 2 if packed else size  # the network's input
    pairs = max(config.density_batches, CHECK_BATCHES)
    crops = f"--crop-size {size}"
    floors = [
        (2 * batch * channels * size**2, f"--batch-size {batch} (2 crops each) and {crops}: a pre-training batch"),
        (
            config.finetune_batch_size * channels * size**2,
            f"--finetune-batch-size {config.finetune_batch_size} and {crops}: a fine-tuning batch",
        ),
        (
            2 * pairs * batch * (channels + 3) * size**2,
            f"--density-batches {config.density_batches} (at least {CHECK_BATCHES} for the contrast check), "
            f"--batch-size {batch} and {crops}: the fixed crop pairs",
        ),
        (2 * batch * width * side**2, f"--width {width}, --batch-size {batch} and {crops}: the first layer's outputs"),
    ]
    widest = width * 2**depth if config.model == "unet" else width  # the U-Net's deepest level
    layers = 1 if config.model == "unet" else depth - 2
    floors.append((WEIGHT_COPIES * 9 * widest**2 * layers, f"--width {width} and --depth {depth}: the weights"))
    if "moco" in config.methods:  # its ResNet-FCN: --depth stages of width * 2^stage channels
        stages, fcn_width = max(1, config.depth or 3), config.width or 32
        floors.append(
            (
                WEIGHT_COPIES * 9 * (fcn_width * 2 ** (stages - 1)) ** 2,
                f"--width {fcn_width} and --depth {stages}: MoCo's ResNet-FCN's weights",
            )
        )
    return [(BYTES_PER_VALUE * values, what) for values, what in floors]


def check_sizes(config: TrainConfig, available: int | None, device: torch.device) -> None:
    """RunError naming the options when a lower bound of ``size_floors`` alone exceeds the free memory, before
    anything is allocated or built."""
    need, what = max(size_floors(config))
    limit = UNKNOWN_MEMORY_LIMIT if available is None else available
    if need > limit:
        free = f"only {gib(available)} is free on {device}" if available is not None else "more than any machine has"
        raise RunError(f"{what} alone need {gib(need)}, but {free}; lower them")


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
    """A byte count in GiB for messages: 0.0805 GiB, 22.7 GiB, 3,810 GiB, 1.2e+40 GiB."""
    try:
        value = num_bytes / GIB
    except OverflowError:  # beyond a float
        return f"more than 2^{num_bytes.bit_length() - 1} bytes"
    return f"{value:.3g} GiB" if value < 1000 or value >= 1e15 else f"{value:,.0f} GiB"


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
