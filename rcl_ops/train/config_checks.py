"""The checks of ``TrainConfig.validate``: types, ranges and the options that must fit each other, each
error naming the option (``flag``) and what it allows."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .data import NOISY_TASKS
from .methods import METHODS

if TYPE_CHECKING:
    from .config import TrainConfig


def check_ranges(config: TrainConfig) -> None:
    """Every numeric option within its range (``INTEGER_RANGES``, ``FLOAT_RANGES``), and the free-form ones."""
    for name, (low, high) in INTEGER_RANGES.items():
        value = getattr(config, name)
        if value is not None and not low <= value <= high:
            allowed = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            why = f" ({RANGE_REASONS[name]})" if name in RANGE_REASONS else ""
            raise ValueError(f"{flag(name)} must be {allowed}{why}, got {value}")
    for seed in config.seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"--seeds must be in [0, {MAX_SEED}], got {seed}")
    for name, (low, high, closed) in FLOAT_RANGES.items():
        if getattr(config, name) is not None:
            _check_float(name, getattr(config, name), low, high, closed)
    check_learning_rates(config)
    if config.sigma_min > config.sigma_max:
        raise ValueError(f"need --sigma-min <= --sigma-max, got {config.sigma_min} > {config.sigma_max}")
    if config.device != "auto":
        try:
            device_type = torch.device(config.device).type
        except RuntimeError:
            device_type = None
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    if config.run_name is not None and (
        Path(config.run_name).name != config.run_name or config.run_name in ("", ".", "..")
    ):
        raise ValueError(f"--run-name must be a folder name (no path separators), got {config.run_name!r}")
    if not config.output_dir:
        raise ValueError("--output-dir must not be empty")


FLOAT32_MAX = 3.4028234663852886e38
# The Adam optimisers of the trainer and the beta1 each runs with (the self-supervised encoder's: torch's default).
ADAM_BETA1 = {"lr": "adam_beta1", "finetune_lr": "adam_beta1", "sl_lr": "adam_beta1", "encoder_pretrain_lr": 0.9}


def check_learning_rates(config: TrainConfig) -> None:
    """Each learning rate at most FLOAT32_MAX * (1 - beta1): Adam's first update moves a weight by up to
    lr / (1 - beta1) (its bias correction; a ratio that only shrinks after), a float32 step that must be finite
    (torch refuses a larger one with "value cannot be converted to type float without overflow")."""
    for name, beta in ADAM_BETA1.items():
        beta1 = getattr(config, beta) if isinstance(beta, str) else beta
        rate = getattr(config, name)
        if rate / (1 - beta1) > FLOAT32_MAX:  # as torch.optim.Adam computes its step size
            which = f"--adam-beta1 {beta1:g}" if isinstance(beta, str) else f"its beta1 {beta1:g}"
            raise ValueError(
                f"{flag(name)} must be at most {FLOAT32_MAX * (1 - beta1):.2g} (Adam's first update moves a weight by "
                f"up to lr / (1 - {which}), which must fit in a float32, at most {FLOAT32_MAX:.2g}), got {rate:g}"
            )


def check_encoders(config: TrainConfig) -> None:
    if not config.encoders:
        raise ValueError("--encoders needs at least one encoder")
    if "file" in config.encoders and config.encoder_weights is None:
        paper = " (--preset paper uses ImageNet weights, as the paper did)" if config.preset == "paper" else ""
        raise ValueError(
            f"--encoders file needs --encoder-weights resnet50.pth{paper}; without weights pass "
            "--encoders random explicitly for a random-feature consistency loss"
        )
    if config.encoder_weights is not None and "file" not in config.encoders:
        raise ValueError("--encoder-weights is given but --encoders does not include file; add file to --encoders")


def check_sidd(config: TrainConfig) -> None:
    """--data-format sidd: real sRGB noisy/clean pairs, one noisy shot per scene, no simulated noise."""
    if config.data_dir is None:
        raise ValueError("--data-format sidd needs --data-dir: a folder of SIDD-layout noisy/clean pairs")
    if config.modality == "raw":
        raise ValueError("--data-format sidd holds sRGB images: use --modality rgb")
    second_draw = [m for m in config.methods if METHODS[m].second_draw]
    if second_draw:
        raise ValueError(
            f"--data-format sidd has one noisy shot per scene: remove {', '.join(second_draw)} from --methods"
        )
    supervised = [METHODS[m].task for m in config.methods if METHODS[m].task is not None]
    simulated = [t for t in [*config.tasks, *supervised] if t in NOISY_TASKS and t != "denoise"]
    if simulated:
        raise ValueError(
            f"the tasks {simulated} (of --tasks or an sl-<task> method) simulate noise, which --data-format "
            "sidd does not: remove them"
        )


def check_shapes(config: TrainConfig) -> None:
    """Crop, tile, network and quantile sizes that fit each other."""
    raw = config.modality == "raw"
    if config.raw_input == "packed" and not raw:
        raise ValueError("--raw-input packed packs RGGB mosaics: use it with --modality raw")
    if (config.tasks != ["denoise"] or raw) and config.crop_size % 2:
        raise ValueError(f"--crop-size must be even for the tasks {config.tasks} and raw data, got {config.crop_size}")
    if config.model == "dncnn" and config.depth is not None and config.depth < 2:
        raise ValueError(f"--depth of a dncnn must be >= 2 (its first and last conv layers), got {config.depth}")
    if config.model == "unet" and config.depth is not None:
        _check_unet_depth(config.depth, config.crop_size, config.raw_input == "packed")
    if config.tile_size is not None and config.tile_size < config.crop_size:
        raise ValueError(
            f"--tile-size must be at least --crop-size {config.crop_size} (a crop lies inside one tile), "
            f"got {config.tile_size}"
        )
    values_per_residual = (1 if raw else 3) * config.crop_size**2
    if config.emd_quantiles is not None and config.emd_quantiles > values_per_residual:
        raise ValueError(
            f"--emd-quantiles must be at most the {values_per_residual} values of a residual "
            f"(channels x --crop-size^2), got {config.emd_quantiles}"
        )


def _check_unet_depth(depth: int, crop_size: int, packed: bool) -> None:
    """Each U-Net level halves its input: a side of n pixels reaches 1 after ceil(log2 n) levels (padded to a
    multiple of 2^depth), and a deeper level would only halve padding, on a crop padded to twice its size or more
    per level (the network's sizes, width * 2^level channels, grow without bound with it)."""
    side = crop_size // 2 if packed else crop_size  # a packed mosaic enters the network at half resolution
    deepest = (side - 1).bit_length()  # ceil(log2(side))
    if depth > deepest:
        what = f"{side}x{side} packed mosaic" if packed else f"{side}x{side} crop"
        raise ValueError(
            f"--depth {depth} is too deep for --crop-size {crop_size}: each U-Net level halves its input, and a "
            f"{what} reaches 1x1 after {deepest} levels; use --depth <= {deepest} or a larger --crop-size"
        )


def label_count(spec: str, num_train: int) -> int:
    """The number of labelled images a --labels value means among ``num_train``: 'N', 'P%' (at least 1)
    or 'all'; ValueError for anything else, DataError-free (the caller checks N against the data)."""
    text = str(spec).strip().lower()
    try:
        if text == "all":
            return num_train
        if text.endswith("%"):
            share = float(text[:-1])
            if math.isfinite(share) and 0 < share <= 100:
                return max(1, round(share / 100 * num_train))
        elif int(text) >= 1:
            return int(text)
    except ValueError:
        pass
    raise ValueError(f"--labels values must be a count >= 1, a share such as 30% (in (0, 100]) or all, got {spec!r}")


MAX_SEED = 2**63 - 1
MAX_SIGMA = 255.0  # 8-bit units: a noise std as large as the whole intensity range
MIN_TEMPERATURE = 1e-6  # 1e-300 made the logits -D / temperature infinite and the first loss NaN

# Smallest and largest value of every integer option (None-able ones are checked when set); the
# combinations (n2s grid vs crop, DnCNN depth, rcl batch) are checked in TrainConfig.validate.
INTEGER_RANGES: dict[str, tuple[int, float]] = {
    "crop_size": (2, math.inf),
    "split_seed": (0, MAX_SEED),
    "max_images": (1, math.inf),
    "tile_size": (8, math.inf),
    "noise_seed": (0, MAX_SEED),
    "width": (1, math.inf),
    "depth": (1, math.inf),
    "emd_quantiles": (1, math.inf),
    "encoder_stages": (1, 4),
    "encoder_seed": (0, MAX_SEED),
    "encoder_pretrain_steps": (1, math.inf),
    "sl_steps": (1, math.inf),
    "n2s_grid": (2, math.inf),
    "pretrain_steps": (0, math.inf),
    "batch_size": (1, math.inf),
    "num_labelled": (1, math.inf),
    "finetune_steps": (0, math.inf),
    "finetune_batch_size": (1, math.inf),
    "eval_crop": (7, math.inf),
    "threads": (1, math.inf),
    "checkpoint_every": (1, math.inf),
    "log_every": (1, math.inf),
    "density_batches": (1, math.inf),
    "grid_images": (0, math.inf),
}

RANGE_REASONS = {
    "eval_crop": "the SSIM window is 7x7",
    "sigma_max": "0 is no noise at all: the noisy input would be the clean image, whose PSNR is infinite, so no score "
    "or interval could be computed",
}

# (low, high, closed): closed says which ends are allowed, e.g. "[)" for Adam's betas.
FLOAT_RANGES: dict[str, tuple[float, float, str]] = {
    "test_fraction": (0.0, 1.0, "()"),
    "sigma_min": (0.0, MAX_SIGMA, "[]"),
    "sigma_max": (0.0, MAX_SIGMA, "(]"),
    "temperature": (MIN_TEMPERATURE, math.inf, "[)"),
    "alpha": (0.0, math.inf, "[)"),
    "consistency_weight": (0.0, math.inf, "[)"),
    "raw_max_shift": (0.0, 1.0, "[]"),
    "lr": (0.0, math.inf, "()"),
    "encoder_pretrain_lr": (0.0, math.inf, "()"),
    "adam_beta1": (0.0, 1.0, "[)"),
    "adam_beta2": (0.0, 1.0, "[)"),
    "adam_eps": (0.0, math.inf, "()"),
    "finetune_lr": (0.0, math.inf, "()"),
    "sl_lr": (0.0, math.inf, "()"),
}


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def _check_float(name: str, value: float, low: float, high: float, closed: str) -> None:
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if math.isfinite(value) and above and below:
        return
    if high == math.inf:
        allowed = f"a finite number {'>=' if closed[0] == '[' else '>'} {low:g}"
    else:
        allowed = f"in {closed[0]}{low:g}, {high:g}{closed[1]}"
    why = f" ({RANGE_REASONS[name]})" if name in RANGE_REASONS else ""
    raise ValueError(f"{flag(name)} must be {allowed}{why}, got {value}")


def check_types(config: TrainConfig) -> None:
    """Each option holds its declared type (config files are not parsed by argparse) and one of its
    choices; ints are accepted for floats (TOML ``lr = 1``) and converted."""
    for f in dataclasses.fields(config):
        scalar, is_list, optional = field_type(f, type(config))
        value = getattr(config, f.name)
        if value is None and optional:
            continue
        if is_list and not isinstance(value, list):
            raise ValueError(f"{flag(f.name)} must be a list of {scalar.__name__}, got {value!r}")
        items = value if is_list else [value]
        for item in items:
            exact = isinstance(item, scalar) and (scalar is bool or not isinstance(item, bool))
            widened = scalar is float and isinstance(item, int) and not isinstance(item, bool)
            if not (exact or widened):
                raise ValueError(f"{flag(f.name)} must be of type {scalar.__name__}, got {item!r}")
            if "choices" in f.metadata and item not in f.metadata["choices"]:
                raise ValueError(f"{flag(f.name)} must be one of {', '.join(f.metadata['choices'])}, got {item!r}")
        if scalar is float and not is_list:
            setattr(config, f.name, float(value))


def field_type(f: dataclasses.Field, owner: type) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_optional) of field ``f`` of the dataclass ``owner`` (TrainConfig)."""
    hint = typing.get_type_hints(owner)[f.name]
    optional = False
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional
