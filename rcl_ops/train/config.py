"""Trainer configuration: one dataclass, the presets (presets.py), and config files (TOML or JSON).

Precedence, lowest first: the dataclass defaults, the preset (``--preset``), the config file
(``--config``), then command-line flags. Every field is a command-line flag
(``batch_size`` -> ``--batch-size``), documented by its ``help`` metadata.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import BACKEND_NAMES
from .config_checks import (
    check_encoders,
    check_ranges,
    check_shapes,
    check_sidd,
    check_types,
    label_count,
)
from .data import DENOISING_TASK, MODALITIES, TASKS, canonical_task
from .evaluate import SCHEDULES
from .images import BUNDLED_SETS, DATA_FORMATS
from .methods import DEFAULT_TEMPERATURES, ENCODER_KINDS, METHODS, canonical_method, variant, variants
from .models import MODELS, RAW_INPUTS, UNET_OUTPUTS
from .presets import EXPERIMENT_PRESETS, PRESETS


def _option(default, help: str, group: str, **extra):
    """A dataclass field with a help string and an argparse group."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "group": group, **extra})
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass
class TrainConfig:
    """Everything one experiment needs; see ``rcl-train --help`` for each option."""

    # data
    data_dir: str | None = _option(
        None,
        "folder of clean PNG/JPEG/BMP/TIFF images (any sizes; searched recursively) from which the noisy "
        "observations are simulated; with train/ and test/ subfolders those "
        "are the split, otherwise a seeded split by --test-fraction. Default: the 17 scikit-image sample images "
        "bundled with scikit-image (no download; --bundled-images rgb: the 7 colour ones)",
        "data",
    )
    data_format: str = _option(
        "clean",
        "clean (clean images; the noise is simulated) or sidd (paired real noisy/clean sRGB images in the SIDD "
        "layout under --data-dir: each *NOISY*.PNG next to its *GT*.PNG twin, e.g. "
        "Data/0001_001_S6_00100_00060_3200_L/0001_NOISY_SRGB_010.PNG; the user supplies the data). With sidd "
        "the noisy photographs are the observations, so --sigma-* and --noise-seed do not apply and n2n "
        "(which needs a second noisy shot) is not available",
        "data",
        choices=DATA_FORMATS,
    )
    bundled_images: str = _option(
        "all",
        "without --data-dir, which bundled scikit-image sample images: all 17 (7 RGB, 10 grey replicated to "
        "RGB) or rgb (the 7 colour ones: astronaut, chelsea, coffee, rocket, immunohistochemistry, retina, "
        "hubble_deep_field)",
        "data",
        choices=tuple(BUNDLED_SETS),
    )
    tile_size: int | None = _option(
        None,
        "after the train/test split, cut every image into non-overlapping NxN tiles (remainders dropped, an "
        "image smaller than N kept whole), each a separate image with its own noise level: more distinct "
        "images per batch (the contrastive loss's negatives) from a few large photographs. Tiles of one "
        "photograph share its content, so they are not independent samples of scenes: the paired intervals "
        "average each photograph's tiles and count photographs (x seeds), not tiles",
        "data",
    )
    test_fraction: float = _option(0.25, "share of the images held out as the test set", "data")
    split_seed: int = _option(0, "seed of the train/test split", "data")
    max_images: int | None = _option(
        None,
        "use only the first N images (a folder's sorted by path, the bundled ones in their listed order; "
        "with train/ and test/ subfolders the first N of each), e.g. for smoke tests",
        "data",
    )
    modality: str = _option(
        "rgb",
        "rgb, or raw: RGGB Bayer mosaics with noise added after mosaicing, "
        "RAW residual x - mosaic(f(x)) and the RAW consistency loss (Eq. 11)",
        "data",
        choices=MODALITIES,
    )
    raw_input: str = _option(
        "planes",
        "how the networks take a RAW mosaic: planes (three sparse colour planes at full resolution) or packed "
        "(the paper's footnote 3: the 2x2 RGGB pattern as 4 channels at half resolution; the head gives 12 "
        "channels, pixel-shuffled to the full-resolution RGB image)",
        "data",
        choices=RAW_INPUTS,
    )
    crop_size: int = _option(128, "side of the random training crops (two per image for RCL)", "data")
    sigma_min: float = _option(0.0, "smallest noise std at full-scale intensity, in 8-bit units (/255)", "data")
    sigma_max: float = _option(
        20.0,
        "largest noise std, in 8-bit units: sqrt(lambda_shot), sqrt(lambda_read) "
        "~ U(a, b) per image (Eq. 16-17) with b = sigma_max / (255 sqrt 2)",
        "data",
    )
    noise_seed: int = _option(
        0,
        "seed of the per-image noise levels and noisy observations (shared by all methods and training seeds)",
        "data",
    )

    # model
    model: str = _option(
        "unet",
        "restoration network: unet (see --unet-output) or dncnn (predicts the residual, Sec. 4.4)",
        "model",
        choices=MODELS,
    )
    unet_output: str = _option(
        "residual",
        "what the U-Net predicts: residual (a global skip, f(x) = x - head(features), the RAW input's bilinear "
        "demosaic in place of x: it starts within a hair of the identity, and the proxy evaluation's fresh head "
        "starts at exactly the identity) or image (f(x) = head(features), no path from input to output: it must "
        "learn the identity first, which a few hundred steps do not do)",
        "model",
        choices=UNET_OUTPUTS,
    )
    width: int | None = _option(
        None, "channels of the first U-Net level / of every DnCNN layer (default 32 for unet, 64 for dncnn)", "model"
    )
    depth: int | None = _option(
        None, "U-Net downsamplings / DnCNN conv layers (default 4 for unet, 17 for dncnn)", "model"
    )

    # pre-training
    methods: list[str] = _option(
        ["rcl", "n2n", "n2s", "oracle"],
        "pre-training methods to compare: rcl (with --distance), rcl-emd, rcl-mmd, rcl-bd, n2n (noise2noise), "
        "n2s (noise2self), consistency (control: RCL with alpha 0, the consistency loss alone, once per encoder), "
        "contrast / contrast-emd / -mmd / -bd (control: RCL's contrastive term alone, no consistency loss), "
        "m2m (mosaic2mosaic, RAW: pairs of noisy mosaics under sensor shifts), moco (MoCo "
        "v2-style instance contrast of a ResNet-FCN's encoder; its decoder is what the proxy evaluation "
        "fine-tunes; RGB), pixcl (pixel-level contrast of a U-Net in the manner of VADeR/PixContrast; RGB), "
        "oracle (supervised pre-training on each --tasks task, evaluated on that task), sl-<task> (supervised "
        "pre-training on one task, evaluated on every task: sl-denoise is the paper's 'SL (Den)', sl-jdd its "
        "'SL (JDD)'), random (no pre-training)",
        "pre-training",
        nargs="+",
    )
    distance: str = _option(
        "emd",
        "statistical distance of the residual contrastive loss for method 'rcl'",
        "pre-training",
        choices=("emd", "mmd", "bd"),
    )
    temperature: float | None = _option(
        None,
        "InfoNCE temperature tau (Eq. 5). Default: per distance, "
        + ", ".join(f"{d.upper()} {t:g}" for d, t in DEFAULT_TEMPERATURES.items())
        + " (the paper follows SimCLR without a value): the distances' units differ (EMD in intensity units, "
        "MMD and BD unitless), and these are where an ideal denoiser's residuals (the true noise) score a lower "
        "L_contrast than the image content an untrained image-predicting U-Net leaves in its residuals, measured "
        "on the quick and small presets' data (README)",
        "pre-training",
    )
    alpha: float = _option(
        1e-3, "weight of the contrastive term: alpha * L_contrast + L_consistency (Eq. 10)", "pre-training"
    )
    consistency_weight: float = _option(1.0, "weight of the consistency loss (Eq. 9 / Eq. 11)", "pre-training")
    symmetric: bool = _option(False, "symmetric contrastive loss (rows and columns)", "pre-training")
    distance_backend: str = _option(
        "auto",
        "rcl_ops backend of the distances (auto: the fastest available on --device)",
        "pre-training",
        choices=BACKEND_NAMES,
    )
    emd_quantiles: int | None = _option(
        None, "compare K quantiles per residual in EMD (default: all values, exact)", "pre-training"
    )
    contrast_reduction: str = _option(
        "sum",
        "how L_contrast combines the B queries of a batch: sum (Algorithm 1, line 8: 'sum up L_contrast for "
        "a batch') or mean. With sum, alpha weighs B times more",
        "pre-training",
        choices=("sum", "mean"),
    )
    distance_scale: str = _option(
        "8bit",
        "intensity scale of the residuals the distances see: unit ([0, 1], as the images) or 8bit (x255, as "
        "PSNR's Eq. 12). The paper does not say; EMD grows with the scale, so with --temperature it sets how "
        "sharply the contrastive loss separates positives (BD and the pooled-std-bandwidth MMD barely change). "
        "On the unit scale at temperature 0.1 every EMD logit gap is ~0.1 and the true noise scores worse than an "
        "untrained network's residuals (measured): 8bit is the default",
        "pre-training",
        choices=("unit", "8bit"),
    )
    consistency_reduction: str = _option(
        "mean",
        "how L_consistency combines feature values: mean (the mean squared difference, independent of crop "
        "size) or sum (the squared L2 norm of Eq. 9 per crop, averaged over crops; Eq. 11's L1 norm for RAW). "
        "Eq. 9 writes a norm without saying whether it is squared or normalised",
        "pre-training",
        choices=("mean", "sum"),
    )
    encoders: list[str] = _option(
        ["random"],
        "frozen encoder(s) g_e of the consistency loss (Eq. 9); each RCL method runs once per encoder: "
        "random (a fixed randomly initialised ResNet-50, seeded by --encoder-seed: a random-feature "
        "perceptual loss), self (pre-trained without labels on the noisy training images by instance "
        "discrimination, as Sec. 3.4 allows; cached under --output-dir/encoder_cache/ and reused), file (the "
        "weights in --encoder-weights, e.g. torchvision's ImageNet ResNet-50, as in the paper). Ignored for RAW "
        "data (Eq. 11 needs no encoder)",
        "pre-training",
        nargs="+",
        choices=ENCODER_KINDS,
    )
    encoder_weights: str | None = _option(
        None,
        "ResNet-50 state dict (.pth/.pt/.safetensors, torchvision names, e.g. ImageNet weights) for the "
        "encoder 'file' of --encoders; results record its name and sha256",
        "pre-training",
    )
    encoder_stages: int = _option(
        1, "the encoder layer: ResNet-50 stages used by g_e after the stem (1-4; 1 = layer1's output)", "pre-training"
    )
    encoder_seed: int = _option(
        0, "seed of the random encoder, and of the self-pre-trained one's initialisation and crops", "pre-training"
    )
    encoder_pretrain_steps: int = _option(
        500, "steps of the self-supervised encoder's pre-training (--encoders self)", "pre-training"
    )
    encoder_pretrain_lr: float = _option(
        1e-3, "Adam learning rate of the self-supervised encoder's pre-training", "pre-training"
    )
    raw_max_shift: float = _option(
        0.5,
        "RAW consistency (Eq. 11): T translates f(x) by a random sub-pixel "
        "offset up to this many pixels (Keys cubic interpolation)",
        "pre-training",
    )
    n2s_grid: int = _option(
        4, "noise2self masking lattice spacing (one of grid^2 phases masked per step)", "pre-training"
    )
    pretrain_steps: int = _option(20000, "optimisation steps of pre-training", "pre-training")
    batch_size: int = _option(64, "distinct images per pre-training batch (two crops each)", "pre-training")
    lr: float = _option(1e-3, "Adam learning rate (constant)", "pre-training")
    adam_beta1: float = _option(0.9, "Adam beta1", "pre-training")
    adam_beta2: float = _option(0.999, "Adam beta2", "pre-training")
    adam_eps: float = _option(1e-7, "Adam epsilon", "pre-training")

    # proxy evaluation
    tasks: list[str] = _option(
        ["denoise", "sr2"],
        "downstream tasks. RGB: denoise, sr2 / sr4 (x2 / x4 super-resolution of the clean image), jdensr2 "
        "(joint denoising and x2 SR: noise on the low-resolution image). RAW: jdd (joint demosaicing and "
        "denoising; 'denoise' means jdd), jdemsr2 (joint demosaicing and x2 SR of a clean mosaic), jddsr2 "
        "(all three). The target is the clean RGB image; SR inputs are brought to the target grid (bicubic)",
        "proxy evaluation",
        nargs="+",
    )
    num_labelled: int | None = _option(
        None,
        "labelled training images for fine-tuning the new last layer (default: all training images)",
        "proxy evaluation",
    )
    finetune_steps: int = _option(
        2000,
        "fine-tuning steps of the new last layer (L1 loss); 0 skips the proxy evaluation and reports only the "
        "pre-trained networks as they are (the '0 labels' row, always reported)",
        "proxy evaluation",
    )
    finetune_batch_size: int = _option(32, "crops per fine-tuning batch", "proxy evaluation")
    finetune_lr: float = _option(
        1e-3, "Adam learning rate of fine-tuning (its peak with --finetune-schedule cosine)", "proxy evaluation"
    )
    finetune_schedule: str = _option(
        "cosine",
        "learning-rate schedule of fine-tuning: cosine (annealed to 0 over --finetune-steps, so the result "
        "settles) or constant",
        "proxy evaluation",
        choices=SCHEDULES,
    )
    eval_crop: int | None = _option(
        None, "evaluate on the central NxN window of each test image (default: whole images)", "proxy evaluation"
    )
    labels: list[str] = _option(
        [],
        "label-efficiency study (Tables 3 and 5) at these numbers of labelled training images: N, P% of "
        "them, or all. At each level, on the denoising task, with the same seeds and nested labelled "
        "subsets: SL (the network trained from scratch, every layer, L1) and RCL+SL (every RCL network "
        "fine-tuned the same way after pre-training); the 0-labels row is the as-is score. "
        "Default: none (no study)",
        "label efficiency",
        nargs="+",
    )
    sl_steps: int = _option(2000, "training steps of SL and RCL+SL in the label-efficiency study", "label efficiency")
    sl_lr: float = _option(
        1e-3, "Adam learning rate of SL and RCL+SL (its peak with --finetune-schedule cosine)", "label efficiency"
    )
    seeds: list[int] = _option(
        [0, 1, 2, 3, 4],
        "training seeds (model init, crops, masks); the table reports the mean over them",
        "proxy evaluation",
        nargs="+",
    )

    # run
    output_dir: str = _option("runs", "folder that receives one sub-folder per run", "run")
    run_name: str | None = _option(None, "name of the run folder (default: preset name and a timestamp)", "run")
    resume: bool = _option(
        False,
        "continue the run --run-name (default: the newest run in --output-dir): "
        "finished (method, seed) results are reused and pre-training resumes from its "
        "last readable checkpoint; options that change results must be the run's",
        "run",
    )
    device: str = _option("auto", "auto (cuda when available), cpu, cuda or cuda:N", "run")
    threads: int | None = _option(
        None,
        "CPU threads for torch (default: torch's choice). The count changes the float summation order and so "
        "the results: the run records it, --resume keeps it and refuses a different one",
        "run",
    )
    deterministic: bool = _option(True, "torch.use_deterministic_algorithms (bit-reproducible runs)", "run")
    checkpoint_every: int = _option(500, "save a pre-training checkpoint every N steps (and at the end)", "run")
    log_every: int = _option(10, "log losses every N steps", "run")
    tensorboard: bool = _option(
        False, "also write TensorBoard logs (needs the tensorboard package); CSV logs are always written", "run"
    )
    progress: bool = _option(True, "show progress bars", "run")
    ignore_contrast_check: bool = _option(
        False,
        "run an RCL pre-training even when its check fails (before pre-training, on a batch of the training data: "
        "does the true noise score a lower L_contrast than the network at step 0? If not, the contrastive term "
        "does not reward denoising and the run is refused without this flag)",
        "run",
    )
    plots: bool = _option(True, "write the residual-distance density plot (Fig. 2) and sample image grids", "run")
    density_batches: int = _option(8, "crop-pair batches used for the Fig. 2 densities", "run")
    grid_images: int = _option(3, "test images shown in the sample grids", "run")
    preset: str | None = _option(
        None,
        "quick (a smoke-level demo of the whole pipeline on a CPU in a few minutes, three seeds), small (the "
        "most faithful setting a 2-core CPU runs in about 30 minutes, three seeds), gpu-small (the paper's batch "
        "64 and crops 128 on the bundled images, about 4 minutes on one H100/H200, three seeds), paper (the "
        "paper's settings, for a GPU), sidd (Table 5 on SIDD-layout real noisy data in --data-dir, for a GPU), or "
        "one paper table's experiment, table1-quick ... table5-full (as rcl-train experiment runs them)",
        "run",
        choices=("quick", "small", "gpu-small", "paper", "sidd", *EXPERIMENT_PRESETS),
    )
    config: str | None = _option(None, "TOML or JSON file of options (keys as the long flags, with - or _)", "run")

    def validate(self) -> TrainConfig:
        """Check every option's type and range; return self (ValueError naming the option and what it
        allows otherwise). Methods, tasks and seeds are de-duplicated, 'rcl' made 'rcl-<distance>'.
        What depends on the machine (device, backend, memory, files) is checked by
        ``preflight.check_machine`` before a run starts."""
        check_types(self)
        check_ranges(self)
        self.methods = list(dict.fromkeys(canonical_method(m, self.distance, self.modality) for m in self.methods))
        self.tasks = list(dict.fromkeys(canonical_task(t, self.modality) for t in self.tasks))
        self.seeds = list(dict.fromkeys(self.seeds))
        self.encoders = list(dict.fromkeys(self.encoders))
        self.labels = list(dict.fromkeys(self.labels))
        for spec in self.labels:
            label_count(spec, 1)  # ValueError naming the bad value
        denoising = DENOISING_TASK[self.modality]
        if self.labels and denoising not in self.tasks:
            raise ValueError(f"--labels runs the label-efficiency study on {denoising}: add {denoising} to --tasks")
        check_encoders(self)
        for name, values in (("methods", self.methods), ("tasks", self.tasks), ("seeds", self.seeds)):
            if not values:
                choices = f"; choose from {TASKS}" if name == "tasks" else ""
                raise ValueError(f"--{name} needs at least one {name[:-1]}{choices}")
        if self.data_format == "sidd":
            check_sidd(self)
        check_shapes(self)
        contrastive = [m for m in self.methods if METHODS[m].family == "rcl"]
        if contrastive and self.batch_size < 2:
            raise ValueError(
                f"--batch-size must be >= 2 for {contrastive} (the other images of a batch are the "
                f"negatives of the contrastive loss), got {self.batch_size}"
            )
        for method in self.methods:
            if METHODS[method].check_options is not None:
                METHODS[method].check_options(self)
        return self

    def variant_keys(self) -> list[str]:
        """The keys of what is pre-trained, in order (``methods.variants``): 'rcl-emd+random', 'n2n', ..."""
        return [v.key for v in variants(self)]

    def oracle_only(self, key: str) -> bool:
        """Whether variant key ``key`` is a supervised pre-training that is there only as the Oracle of its task
        ('oracle' in --methods, 'sl-<task>' not)."""
        return variant(key).method.task is not None and key not in self.methods

    def evaluation_tasks(self, key: str) -> list[str]:
        """The tasks a variant key is proxy-evaluated on: every task, except for a supervised pre-training that
        is there only as the Oracle of its own task."""
        return [variant(key).method.task] if self.oracle_only(key) else list(self.tasks)


def config_fields() -> list[dataclasses.Field]:
    """The dataclass fields of TrainConfig, in declaration order."""
    return list(dataclasses.fields(TrainConfig))


def read_config_file(path: str | Path) -> dict:
    """Options from a TOML (``.toml``) or JSON file; keys may use - or _, nested tables are flattened."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = _parse_config_file(path)
    if not isinstance(raw, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        raise ValueError(
            f"config file {path} must hold a table of options (a JSON object), not {kind.get(type(raw), 'null')}"
        )
    flat: dict = {}
    for key, value in raw.items():
        if isinstance(value, dict):  # a [section] table
            flat.update(value)
        else:
            flat[key] = value
    options = {key.replace("-", "_"): value for key, value in flat.items()}
    known = {f.name for f in config_fields()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown option(s) {unknown}")
    if "preset" in options and not (isinstance(options["preset"], str) and options["preset"] in PRESETS):
        raise ValueError(f"config file {path}: preset must be one of {sorted(PRESETS)}, got {options['preset']!r}")
    return options


def _parse_config_file(path: Path):
    """The value a .toml or .json file holds; ValueError naming the file when it does not parse."""
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"config file {path}: expected a .toml or .json file")
    kind, parse = "JSON", json.loads
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError as error:  # Python < 3.11
            raise ValueError("reading TOML config files needs Python >= 3.11; use a JSON file") from error
        kind, parse = "TOML", tomllib.loads
    try:
        return parse(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {path} is not valid {kind}: it is not UTF-8 text ({error})") from error
    except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ValueError(f"config file {path} is not valid {kind}: {error}") from error


def build_config(preset: str | None = None, config_file: str | None = None, **overrides) -> TrainConfig:
    """TrainConfig from defaults < preset < config file < ``overrides``, validated."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    if config_file is not None:
        file_values = read_config_file(config_file)
        preset_in_file = file_values.pop("preset", None)
        if preset is None and preset_in_file is not None:
            return build_config(preset_in_file, config_file, **overrides)
        values.update(file_values)
    values.update(overrides)
    values["preset"], values["config"] = preset, config_file
    return TrainConfig(**values).validate()


def config_to_dict(config: TrainConfig) -> dict:
    """A JSON-ready dict of the configuration."""
    return dataclasses.asdict(config)
