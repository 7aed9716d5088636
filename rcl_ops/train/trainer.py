"""The experiment: pre-train each method, proxy-evaluate it on each task, write the table and plots.

Run folder layout (``<output_dir>/<run_name>/``)::

    config.json                  resolved configuration
    metrics.csv                  every logged loss (long format); tensorboard/ when enabled
    checkpoints/<method>/seed<s>/pretrain_last.safetensors   resumable pre-training state
    checkpoints/<method>/seed<s>/pretrain_previous.safetensors  the one before, if the last is damaged
    checkpoints/<method>/seed<s>/pretrained.safetensors      pre-trained weights
    checkpoints/<method>/seed<s>/finetuned_<task>.safetensors  proxy-evaluated weights
    results/<method>_seed<s>.json  per-run scores (reused by --resume)
    results.json, results.md     the table (Table 1 shape) and every number behind it
    figures/                     residual_distance_density.png (Fig. 2), samples_<task>.png

Every file but the append-only metrics.csv is written to a temporary file and renamed, so a kill never
leaves a truncated one; on --resume a damaged file is named, and a damaged checkpoint falls back to the
previous one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

import rcl_ops

from . import distributed
from .baselines import MoCoObjective, PixelContrastObjective, ResNetFCN
from .config import TrainConfig, config_to_dict, flag, label_count
from .contrast_check import (
    CHECK_BATCHES,
    check_contrast,
    check_sentence,
    crop_pair_batches,
    distance_matrices_of,
    reference_scores,
)
from .data import DENOISING_TASK, CropSampler, make_records, records_multiple, task_input
from .diagnostics import gradient_norm_ratio, summarise_history
from .encoder_pretraining import self_supervised_encoder
from .evaluate import (
    ProxySettings,
    TestScores,
    evaluate_naive,
    evaluate_restorer,
    proxy_evaluate,
    train_supervised,
)
from .files import DamagedFileError, atomic_path, read_json, write_json_atomically
from .images import DataError, check_image_sizes, load_split
from .losses import (
    DEFAULT_TEMPERATURES,
    DISTANCE_SCALES,
    FeatureConsistencyLoss,
    Mosaic2MosaicObjective,
    Noise2NoiseObjective,
    Noise2SelfObjective,
    RawConsistencyLoss,
    RCLObjective,
    SupervisedObjective,
    contrastive_loss,
    fraction_positive,
    is_rcl_objective,
    rcl_distance,
    residual_distance_gaps,
    split_run_key,
    supervised_task,
    uses_consistency_loss,
)
from .models import ResNet50Encoder, configured_model, file_sha256, load_encoder_weights, state_sha256
from .preflight import RunError, check_machine, resolve_device
from .seeding import derive_seed, seeded_generator

# Options that change no number a run produces: they may differ when resuming. (--threads is not one:
# the thread count changes the summation order of CPU kernels and, through training, the results.)
RUN_MANAGEMENT_OPTIONS = {
    "resume",
    "progress",
    "tensorboard",
    "output_dir",
    "run_name",
    "preset",
    "config",
    "checkpoint_every",
    "log_every",
    "plots",
    "grid_images",
    "device",
}


def progress_bar(enabled: bool, description: str) -> Callable:
    """A function wrapping an iterable in a tqdm bar (or returning it unchanged when disabled)."""
    if not enabled:
        return lambda iterable, **_: iterable
    from tqdm.auto import tqdm

    return lambda iterable, **kwargs: tqdm(iterable, desc=description, leave=False, dynamic_ncols=True, **kwargs)


class RunLogger:
    """Appends (time, method, seed, phase, step, metric, value) rows to metrics.csv, and to TensorBoard
    when ``tensorboard`` is True.

    With ``resume`` the existing file is kept, less a torn last row (a kill during a write); the first row
    this process logs for a (method, seed, phase) replaces the file's rows of that phase from its step
    on, which the interrupted process logged after its last checkpoint, so no step is logged twice.
    """

    COLUMNS = ("wall_time", "method", "seed", "phase", "step", "metric", "value")

    def __init__(self, run_dir: Path, tensorboard: bool, resume: bool = False):
        self.path = run_dir / "metrics.csv"
        # (method, seed, phase) -> the largest step logged before this process, until it logs that phase
        self._logged_before: dict[tuple[str, str, str], int] = {}
        if resume and self.path.exists():
            complete = 0
            for row in self._rows():
                key, step = (row[1], row[2], row[3]), int(row[4])
                self._logged_before[key] = max(step, self._logged_before.get(key, step))
                complete += 1
            with self.path.open(newline="") as handle:
                lines = sum(1 for _ in handle)
            if lines != complete + 1:  # a torn or garbled row, or a missing header
                self._rewrite(lambda row: True)
        else:
            self._rewrite(lambda row: False)
        self._file = self.path.open("a", newline="")
        self._csv = csv.writer(self._file)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RunError("--tensorboard needs the tensorboard package (pip install tensorboard)") from error
            self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def _rows(self) -> Iterator[list[str]]:
        """The file's complete, well-formed data rows (none when it is missing or lacks its header); a
        last line without its line break is torn, whatever it holds."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            if handle.readline().rstrip("\r\n") != ",".join(self.COLUMNS):
                return
            for line in handle:
                row = next(csv.reader([line]), [])
                if line.endswith("\n") and len(row) == len(self.COLUMNS) and row[4].isdigit() and _is_number(row[6]):
                    yield row

    def _rewrite(self, keep: Callable[[list[str]], bool]) -> None:
        """Replace the file by its header and the complete rows that ``keep`` accepts."""
        rows = [row for row in self._rows() if keep(row)]
        with atomic_path(self.path) as temporary, temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.COLUMNS)
            writer.writerows(rows)

    def log(self, method: str, seed: int, phase: str, step: int, values: dict[str, float]) -> None:
        key = (method, str(seed), phase)
        if self._logged_before.pop(key, -1) >= step:
            self._file.close()
            self._rewrite(lambda row: (row[1], row[2], row[3]) != key or int(row[4]) < step)
            self._file = self.path.open("a", newline="")
            self._csv = csv.writer(self._file)
        now = time.time()
        for metric, value in values.items():
            self._csv.writerow((f"{now:.3f}", method, seed, phase, step, metric, f"{float(value):.6g}"))
            if self._writer is not None:
                self._writer.add_scalar(f"{method}/seed{seed}/{phase}/{metric}", float(value), step)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# checkpoints (safetensors): model tensors, optimizer tensors, the sampling generator's state;
# step and optimizer hyper-parameters in the metadata.

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
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=meta)


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


def make_objective(
    method: str, config: TrainConfig, encoder: nn.Module | None, gather_distributed: bool = False, world_size: int = 1
) -> nn.Module:
    """The pre-training objective of ``method`` (a canonical name, e.g. 'rcl-emd', 'n2s');
    ``gather_distributed``: the contrastive loss takes its negatives from every rank (of
    ``world_size``)."""
    raw = config.modality == "raw"
    if is_rcl_objective(method):
        # the consistency-only control keeps the first RCL method's distance for its diagnostics
        distance = rcl_distance(method) or contrast_distance(config)
        contrastive = contrastive_loss(
            distance,
            temperature_of(config, distance),
            config.symmetric,
            config.distance_backend,
            config.emd_quantiles,
            gather_distributed=gather_distributed,
            reduction=config.contrast_reduction,
        )
        if not uses_consistency_loss(method):
            consistency = None  # the contrastive-only control
        elif raw:
            consistency = RawConsistencyLoss(config.raw_max_shift, config.consistency_reduction)
        else:
            consistency = FeatureConsistencyLoss(encoder, config.consistency_reduction)
        scale = DISTANCE_SCALES[config.distance_scale]
        # A sum over this rank's queries, averaged over ranks by DDP, is 1/W of the sum over the
        # global batch that one process would take: alpha makes up for it.
        alpha = config.alpha * (world_size if gather_distributed and config.contrast_reduction == "sum" else 1)
        alpha = 0.0 if method == "consistency" else alpha
        weight = 0.0 if consistency is None else config.consistency_weight
        return RCLObjective(contrastive, consistency, alpha, weight, raw, scale)
    if method == "n2n":
        return Noise2NoiseObjective(raw)
    if method == "n2s":
        return Noise2SelfObjective(config.n2s_grid, raw)
    if method == "m2m":
        return Mosaic2MosaicObjective()
    if method == "moco":
        return MoCoObjective()
    if method == "pixcl":
        return PixelContrastObjective()
    if supervised_task(method) is not None:
        return SupervisedObjective(supervised_task(method))
    raise ValueError(f"method {method!r} has no pre-training objective")


def initial_network(config: TrainConfig, seed: int) -> nn.Module:
    """Seed ``seed``'s initial network, drawn from the global random state seeded by (seed, "init")."""
    torch.manual_seed(derive_seed(seed, "init"))
    return configured_model(config)


def contrast_distance(config: TrainConfig) -> str:
    """The distance of the run's first method with a contrastive term (--distance if none): the one of the
    Fig. 2 densities and of the consistency-only control's diagnostics."""
    return next(filter(None, map(rcl_distance, config.methods)), config.distance)


def temperature_of(config: TrainConfig, distance: str) -> float:
    """--temperature, or the distance's default (``DEFAULT_TEMPERATURES``)."""
    return DEFAULT_TEMPERATURES[distance] if config.temperature is None else config.temperature


def pretrain(
    model: nn.Module,
    objective: nn.Module,
    sampler: CropSampler,
    config: TrainConfig,
    device: torch.device,
    checkpoint_dir: Path,
    log: Callable[[int, dict[str, float]], None],
    progress: Callable,
    resume: bool,
    say: Callable[[str], None] = print,
    run: distributed.DistributedRun = distributed.SINGLE,
) -> dict:
    """Optimise ``objective`` for ``config.pretrain_steps`` steps with Adam; checkpoint into
    ``checkpoint_dir`` every ``config.checkpoint_every`` steps and at the end, and with ``resume`` start
    from the newest readable checkpoint there. Returns {"steps", "seconds", "final_loss", "resumed_from"}.
    Under torchrun (``run``): DDP, each rank its shard of the global batch, rank 0 reads and writes
    the checkpoints (rcl_ops/train/distributed.py)."""
    # A stateful objective (momentum encoders, queues, projection heads: MoCo, PixCL) starts afresh from
    # the model, trains its own heads with the model and is checkpointed with it.
    stateful = objective if hasattr(objective, "start") else None
    parameters = list(model.parameters())
    if stateful is not None:
        stateful.start(model, sampler.generator)
        parameters += list(stateful.extra_parameters())
    optimizer = torch.optim.Adam(
        parameters, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps
    )
    start, last_loss, history = 0, math.nan, []
    restore = resume and run.is_main
    saved = restore_pretraining(checkpoint_dir, model, optimizer, sampler.generator, say, stateful) if restore else None
    saved = distributed.share_training_state(model, optimizer, sampler.generator, saved, run)
    trained = distributed.wrap(model, run)
    if saved is not None:
        start, last_loss = saved["step"], float(saved.get("loss", math.nan))
        history = [row for row in saved.get("history", []) if row.get("step", math.inf) <= start]
    rcl = isinstance(objective, RCLObjective)
    model.train()
    started = time.perf_counter()
    steps = progress(range(start, config.pretrain_steps), initial=start, total=config.pretrain_steps)
    for step in steps:
        done = step + 1
        logging = run.is_main and (done == 1 or done % config.log_every == 0 or done == config.pretrain_steps)
        batch = distributed.shard(sampler.sample(config.batch_size * run.world_size), run).to(device)
        if rcl:
            terms = objective.compute(trained, batch, sampler.generator)
            loss, parts = terms.loss, dict(terms.parts)
        else:
            loss, parts = objective(trained, batch, sampler.generator)
        global_loss = distributed.mean_over_ranks(loss.detach(), run)  # the loss of the global batch
        if not torch.isfinite(global_loss):
            advice = "a lower --lr or a larger --temperature" if rcl else "a lower --lr"
            raise FloatingPointError(f"pre-training loss became {float(global_loss)} at step {done}; try {advice}")
        # Extra backward passes that leave the training gradient unchanged; in one process only
        # (under DDP they would run rank 0's graph alone, outside DDP's gradient reduction).
        if rcl and logging and run.world_size == 1 and objective.alpha > 0 and objective.consistency is not None:
            parts.update(gradient_norm_ratio(terms.contrast, terms.consistency, model.parameters()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if stateful is not None:
            stateful.after_step(model)
        if not run.is_main:
            continue
        last_loss = float(global_loss)
        if logging:
            values = {"loss": last_loss, **{name: float(value) for name, value in parts.items()}}
            log(done, values)
            history.append({"step": done, **values})
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{last_loss:.4g}")
        if done % config.checkpoint_every == 0 or done == config.pretrain_steps:
            save_pretraining_checkpoint(
                checkpoint_dir,
                model,
                optimizer,
                sampler.generator,
                {"step": done, "loss": last_loss, "history": history},
                stateful,
            )
    return {
        "steps": config.pretrain_steps,
        "seconds": time.perf_counter() - started,
        "final_loss": last_loss,
        "resumed_from": start,
        "diagnostics": summarise_history(history),
    }


def _scores_dict(scores: TestScores) -> dict:
    return {
        "psnr": scores.mean_psnr,
        "ssim": scores.mean_ssim,
        "psnr_per_image": scores.psnr,
        "ssim_per_image": scores.ssim,
    }


def locate_run(config: TrainConfig) -> tuple[Path, dict | None]:
    """The run folder of ``config`` and, with --resume, the configuration saved there; creates nothing.
    RunError when there is nothing to resume or a new run's folder already holds a run."""
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise RunError(f"--output-dir {output} is a file, not a folder")
    if config.resume:
        if config.run_name is not None:
            run_dir = output / config.run_name
        else:
            runs = (
                sorted((p for p in output.glob("*") if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime)
                if output.is_dir()
                else []
            )
            if not runs:
                raise RunError(f"--resume: no run to resume in {output}")
            run_dir = runs[-1]
        saved_path = run_dir / "config.json"
        if not saved_path.exists():
            raise RunError(f"--resume: {saved_path} does not exist, so there is no run to resume there")
        try:
            saved = read_json(saved_path)
        except DamagedFileError as error:
            raise RunError(f"--resume: {error}; without its configuration the run cannot be resumed") from error
        if not isinstance(saved, dict):
            raise RunError(f"--resume: {saved_path} is damaged (not a JSON object of options)")
        return run_dir, saved
    name = config.run_name or f"{config.preset or 'run'}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = output / name
    if (run_dir / "config.json").exists():
        raise RunError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it or choose another --run-name"
        )
    return run_dir, None


def check_resumable(config: TrainConfig, saved: dict, run_dir: Path) -> None:
    """RunError naming every option that changes results and differs from the run's saved configuration."""
    if saved.get("threads") is None:  # a run made before the thread count was recorded: nothing to compare
        saved = {**saved, "threads": config.threads}
    current = config_to_dict(config)
    changed = sorted(k for k in current if k not in RUN_MANAGEMENT_OPTIONS and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{flag(k)} {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        why = (
            " (the thread count changes the float summation order, and so the results)" if "threads" in changed else ""
        )
        raise RunError(
            f"--resume: these options differ from the run in {run_dir}: {details}{why}; resume with the run's "
            "values (see its config.json) or start a new run with another --run-name"
        )


def create_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Make the run folder and write its config.json (RunError when the folder cannot be made)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create the run folder {run_dir}: {error}") from error
    write_json_atomically(run_dir / "config.json", config_to_dict(config))


@contextlib.contextmanager
def torch_settings(threads: int | None, deterministic: bool, device: torch.device):
    """Apply the run's thread count and determinism, and restore torch's previous settings afterwards."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


def run_experiment(config: TrainConfig, echo: Callable[[str], None] | None = print) -> dict:
    """Run the whole protocol for ``config``; returns the summary also written to results.json.

    ``echo`` receives one progress line per finished stage (None: silent).
    """
    config.validate()
    run, device = distributed.start(resolve_device(config.device))
    try:
        if run.is_main:
            run_dir, saved = locate_run(config)
            # The thread count changes CPU results: a run records the count it used, and a resume keeps it.
            threads = config.threads or (saved or {}).get("threads") or torch.get_num_threads()
            config = dataclasses.replace(config, threads=threads)
            if saved is not None:
                check_resumable(config, saved, run_dir)
        run_dir, config = distributed.broadcast((run_dir, config) if run.is_main else None, run)
        check_machine(config, device)
        say = (echo or (lambda message: None)) if run.is_main else (lambda message: None)
        with torch_settings(config.threads, config.deterministic, device):
            summary = Experiment(config, device, run_dir, say, run).run()
        distributed.barrier(run)  # every rank done before the group is torn down
        return summary
    finally:
        distributed.stop(run)


class Experiment:
    """One run of the protocol: data and noise are prepared once, then for every seed and method the
    network is pre-trained from the seed's shared initialisation and proxy-evaluated on every task.

    Everything that can fail on the options or the data (images, encoder weights, objectives) is set up
    before the run folder is created, so a run that cannot start leaves nothing behind."""

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        run_dir: Path,
        say: Callable[[str], None],
        run: distributed.DistributedRun = distributed.SINGLE,
    ):
        self.config, self.device, self.run_dir, self.say, self.dist = config, device, run_dir, say, run
        self.started = time.perf_counter()
        self.raw = config.modality == "raw"
        train_images, test_images = load_split(
            config.data_dir,
            config.test_fraction,
            config.split_seed,
            config.max_images,
            config.data_format,
            config.bundled_images,
            config.tile_size,
        )
        check_image_sizes(train_images, config.crop_size, "training crop")
        check_image_sizes(
            test_images,
            8,
            "minimum size of a test image (the 7x7 SSIM window on an image cropped to even size)",
            "remove them from the test images or replace them by larger ones",
        )
        if config.batch_size * run.world_size > len(train_images):
            raise DataError(
                f"--batch-size {config.batch_size}{f' x {run.world_size} ranks' if run.active else ''} needs at "
                "least that many distinct training images (the other "
                f"images of a batch are a crop's negatives), but there are {len(train_images)}; lower --batch-size "
                "or pass a larger --data-dir (--preset quick fits the bundled sample images)"
            )
        if config.num_labelled is not None and config.num_labelled > len(train_images):
            raise DataError(
                f"--num-labelled {config.num_labelled} exceeds the {len(train_images)} training images; "
                "lower --num-labelled"
            )
        noise = (config.modality, config.sigma_min, config.sigma_max, config.noise_seed)
        self.run_keys = config.run_keys()
        # the tasks whose inputs are needed: the evaluated ones and those of supervised pre-training
        input_tasks = list(dict.fromkeys([*config.tasks, *filter(None, map(supervised_task, self.run_keys))]))
        multiple = records_multiple(input_tasks)
        self.train = make_records(
            train_images, *noise, second_draw="n2n" in config.methods, burst="m2m" in config.methods, multiple=multiple
        )
        self.test = make_records(test_images, *noise, second_draw=False, multiple=multiple)
        for record in self.train + self.test:
            record.task_inputs = {
                task: task_input(task, record, config.modality, config.noise_seed) for task in input_tasks
            }
        if run.active and any(m in ("moco", "pixcl") for m in config.methods):
            raise RunError("moco and pixcl keep momentum encoders and queues per process: run them without torchrun")
        label_order = np.random.default_rng(config.split_seed).permutation(len(self.train)).tolist()
        self.label_order = [self.train[i] for i in label_order]  # nested labelled subsets: its first N
        self.labelled = self.label_order[: config.num_labelled or len(self.train)]
        self.label_levels = sorted({label_count(spec, len(self.train)) for spec in config.labels})
        if self.label_levels and self.label_levels[-1] > len(self.train):
            raise DataError(
                f"--labels {self.label_levels[-1]} exceeds the {len(self.train)} training images; lower it or use all"
            )
        self.encoders: dict[str, nn.Module] = {}
        self.encoder_records: dict[str, dict] = {}
        for kind in dict.fromkeys(k for k in (split_run_key(key)[1] for key in self.run_keys) if k is not None):
            encoder, self.encoder_records[kind] = self._build_encoder(kind)
            self.encoders[kind] = encoder.to(device)
        self.objectives = {}
        for key in self.run_keys:
            method, encoder_kind = split_run_key(key)
            if method != "random":
                self.objectives[key] = make_objective(
                    method, config, self.encoders.get(encoder_kind), run.active, run.world_size
                )
        self.naive = {  # the evaluation is rank 0's
            task: evaluate_naive(self.test, task, config.modality, config.eval_crop, config.grid_images)
            for task in (config.tasks if run.is_main else [])
        }
        self.examples: dict[str, dict[str, list]] = {task: {"Input": self.naive[task].examples} for task in self.naive}
        self.density_distance = contrast_distance(config)
        self.densities: dict[str, np.ndarray] = {}
        self.crop_pairs = crop_pair_batches(
            self.train,
            config.crop_size,
            config.batch_size,
            max(config.density_batches, CHECK_BATCHES),
            config.split_seed,
            self.raw,
        )
        self.contrast_checks = self._check_contrast()  # before the run folder: a refusal leaves nothing behind
        self.proxy_settings = ProxySettings(
            config.finetune_steps,
            config.finetune_batch_size,
            config.crop_size,
            config.finetune_lr,
            (config.adam_beta1, config.adam_beta2),
            config.adam_eps,
            config.finetune_schedule,
        )
        if not config.resume and run.is_main:
            create_run_dir(run_dir, config)
        self.logger = RunLogger(run_dir, config.tensorboard, resume=config.resume) if run.is_main else None
        say(
            f"rcl-train: run folder {run_dir}; {len(self.train)} training / {len(self.test)} test images; "
            f"device {device}; torch {torch.__version__}"
        )

    def run(self) -> dict:
        """Every (seed, method), then the summary, table and figures."""
        from . import report

        config, results, label_results = self.config, [], []
        try:
            for seed_index, seed in enumerate(config.seeds):
                initial = initial_network(config, seed)
                initial_state = {key: value.clone() for key, value in initial.state_dict().items()}
                if seed_index == 0 and config.plots and self.dist.is_main:
                    initial.to(self.device)
                    self.densities["init"] = self._gaps(initial)
                    self.densities["noise"] = self._gaps(None)
                for method in self.run_keys:
                    try:
                        results.append(self._run_method(method, seed, initial_state, first_seed=seed_index == 0))
                    except FloatingPointError as error:
                        raise self._diverged(f"{method}/seed{seed}", error) from error
                # The label study is rank 0's, like the proxy evaluation (the others wait at the
                # next seed's pre-training).
                label_protocols = (
                    ["sl", *(k for k in self.run_keys if is_rcl_objective(split_run_key(k)[0]))]
                    if self.dist.is_main
                    else []
                )
                for protocol in label_protocols:
                    for count in self.label_levels:
                        try:
                            label_results.append(self._label_run(protocol, seed, count, initial_state))
                        except FloatingPointError as error:
                            raise self._diverged(f"{protocol}/seed{seed}/{count} labels", error) from error
        finally:
            if self.logger is not None:
                self.logger.close()
        if not self.dist.is_main:
            return {}
        environment = self._environment()
        environment["contrast_checks"] = {
            distance: {str(seed): check for (d, seed), check in self.contrast_checks.items() if d == distance}
            for distance in dict.fromkeys(d for d, _ in self.contrast_checks)
        }
        summary = report.summarise(config, results, self.naive, environment, label_results)
        report.write_summary(self.run_dir, summary)
        if config.plots and summary["label_efficiency"]:
            report.plot_label_efficiency(self.run_dir / "figures" / "label_efficiency.png", summary["label_efficiency"])
        if config.plots:
            figures = self.run_dir / "figures"
            report.plot_densities(figures / "residual_distance_density.png", self.densities, self.density_distance)
            for task in config.tasks:
                report.plot_samples(figures / f"samples_{task}.png", self.examples[task], task)
        return summary

    def _diverged(self, what: str, error: FloatingPointError) -> RunError:
        return RunError(
            f"{what}: {error}. The run folder {self.run_dir} keeps what finished, but a --resume would diverge "
            "again at the same step: start a new run (another --run-name) with the changed option"
        )

    def _label_run(self, protocol: str, seed: int, count: int, initial_state: dict) -> dict:
        """SL (``protocol`` 'sl': from the seed's initial weights) or RCL+SL (an RCL run key: from its
        pre-trained weights) on the first ``count`` labelled images, every layer trained; denoising scores
        on the test images (or a finished result reused)."""
        config, tag = self.config, f"{protocol}/seed{seed}/{count} labels"
        result_path = self.run_dir / "results" / "labels" / f"{protocol}_n{count}_seed{seed}.json"
        if config.resume and result_path.exists():
            try:
                result = read_json(result_path)
                if isinstance(result, dict) and "psnr_per_image" in result:
                    return result
                raise DamagedFileError(result_path, "it lacks the per-image scores")
            except DamagedFileError as error:
                self.say(f"  {tag}: {error}; computing this result again")
        model = configured_model(config)
        model.load_state_dict(initial_state)
        if protocol != "sl":
            load_checkpoint(self.run_dir / "checkpoints" / protocol / f"seed{seed}" / "pretrained.safetensors", model)
        settings = dataclasses.replace(self.proxy_settings, steps=config.sl_steps, lr=config.sl_lr)

        def log_step(step: int, loss: float) -> None:
            if step % config.log_every == 0 or step == config.sl_steps:
                self.logger.log(protocol, seed, f"sl-{count}", step, {"l1": loss})

        generator = seeded_generator(seed, "supervised", str(count))
        task = DENOISING_TASK[config.modality]
        seconds = train_supervised(
            model, task, self.label_order[:count], settings, generator, self.device, self.raw, log_step
        )
        scores = evaluate_restorer(model, self.test, task, self.device, config.eval_crop)
        result = {"protocol": protocol, "seed": seed, "labels": count, "seconds": seconds, **_scores_dict(scores)}
        self.say(f"  {tag}: {task} PSNR {scores.mean_psnr:.2f} dB, SSIM {scores.mean_ssim:.4f} ({seconds:.1f} s)")
        write_json_atomically(result_path, result)
        return result

    def _build_encoder(self, kind: str) -> tuple[nn.Module, dict]:
        """The frozen encoder g_e of ``kind`` and the record of its weights (kind, file name, sha256)."""
        config = self.config
        encoder = ResNet50Encoder(config.encoder_stages, config.encoder_seed)
        record: dict = {"kind": kind, "stages": config.encoder_stages}
        if kind == "random":
            record.update(seed=config.encoder_seed, file=None)
        elif kind == "self":
            generator = seeded_generator(config.encoder_seed, "self-supervised encoder")
            encoder, details = self_supervised_encoder(self.train, config, self.device, generator, self.say)
            record.update(seed=config.encoder_seed, **details)
        elif kind == "file":
            try:
                load_encoder_weights(encoder, config.encoder_weights)
            except (OSError, ValueError) as error:
                raise RunError(f"--encoder-weights: {error}") from error
            path = Path(config.encoder_weights)
            record.update(file=path.name, path=str(path.resolve()), file_sha256=file_sha256(path))
        record["state_sha256"] = state_sha256(encoder)
        return encoder, record

    def _initial_model(self, method: str, seed: int, initial_state: dict) -> nn.Module:
        """The network ``method`` starts from: the seed's shared initialisation of --model, or for moco a
        ResNet-FCN (--width, --depth stages) initialised from the seed."""
        config = self.config
        if method == "moco":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "init", "resnet-fcn"))
                return ResNetFCN(config.width or 32, max(1, config.depth or 3), self.raw)
        model = configured_model(config)
        model.load_state_dict(initial_state)
        return model

    def _gaps(self, model: nn.Module | None) -> np.ndarray:
        """Fig. 2's gaps d(r(x_i), r(x'_j)) - d(r(x_i), r(x'_i)), j != i, on the fixed crop pairs."""
        config = self.config
        matrices = distance_matrices_of(
            model,
            self.crop_pairs[: config.density_batches],
            self.density_distance,
            DISTANCE_SCALES[config.distance_scale],
            config.distance_backend,
            self.raw,
            self.device,
        )
        return torch.cat([residual_distance_gaps(d) for d in matrices]).numpy() if matrices else np.empty(0)

    def _check_contrast(self) -> dict[tuple[str, int], dict]:
        """``check_contrast`` of every seed's initial network for each distance of the run's methods with a
        contrastive term, keyed (distance, seed); RunError when the contrastive term does not reward
        denoising, unless --ignore-contrast-check."""
        config, checks = self.config, {}
        first_key = {}  # distance -> the first run key that contrasts with it (its objective has the settings)
        for key in self.run_keys:
            first_key.setdefault(rcl_distance(split_run_key(key)[0]), key)
        first_key.pop(None, None)
        for distance, key in first_key.items() if self.crop_pairs else ():
            contrastive = self.objectives[key].contrastive
            options = (
                self.crop_pairs,
                lambda q, k, c=contrastive: c.distance_fn(q, k, **c.distance_kwargs),
                DISTANCE_SCALES[config.distance_scale],
                contrastive.temperature,
                contrastive.symmetric,
                self.raw,
                self.device,
            )
            references = reference_scores(*options)  # the true noise and the blur: the same for every seed
            for seed in config.seeds:
                with torch.random.fork_rng(devices=[]):  # the run draws each seed's network again later
                    model = initial_network(config, seed)
                checks[(distance, seed)] = check_contrast(model, *options, references=references)
        failing = [
            f"{d.upper()} seed {seed}: {check_sentence(check)}"
            for (d, seed), check in checks.items()
            if not check["rewards_denoising"]
        ]
        if failing and not config.ignore_contrast_check:
            raise RunError(
                "the contrastive term does not reward denoising under these settings, so RCL pre-training would "
                "optimise the wrong thing: " + "; ".join(failing) + ". Change --distance-scale / --temperature "
                "(defaults: 8bit and per distance)"
                + (" or --unet-output (default residual)" if config.unet_output == "image" else "")
                + ", or pass --ignore-contrast-check to run anyway"
            )
        for line in failing:
            self.say(f"WARNING (--ignore-contrast-check): {line}")
        return checks

    def _run_method(self, method: str, seed: int, initial_state: dict, first_seed: bool) -> dict:
        """Pre-train ``method`` from ``initial_state`` and proxy-evaluate it (or reuse a finished result)."""
        config, tag = self.config, f"{method}/seed{seed}"
        result_path = self.run_dir / "results" / f"{method}_seed{seed}.json"
        checkpoint_dir = self.run_dir / "checkpoints" / method / f"seed{seed}"
        samples_path = checkpoint_dir / "samples.npz"
        reused = None
        if self.dist.is_main and config.resume and result_path.exists() and (not first_seed or samples_path.exists()):
            try:
                reused = self._reuse_result(method, result_path, samples_path if first_seed else None, tag)
            except DamagedFileError as error:
                self.say(f"  {tag}: {error}; computing this result again")
        if distributed.broadcast(reused is not None, self.dist):
            return reused

        model = self._initial_model(method, seed, initial_state).to(self.device)
        tasks = config.evaluation_tasks(method)
        result: dict = {"method": method, "seed": seed}
        encoder_kind = split_run_key(method)[1]
        if encoder_kind is not None:
            result["encoder"] = self.encoder_records[encoder_kind]
        distance = rcl_distance(split_run_key(method)[0])
        if (distance, seed) in self.contrast_checks and config.pretrain_steps > 0:
            result["contrast_check"] = check = self.contrast_checks[(distance, seed)]
            self.say(f"  {tag}: {check_sentence(check)}")
        if method != "random" and config.pretrain_steps > 0:
            sampler = CropSampler(
                self.train,
                config.crop_size,
                seeded_generator(seed, "pretrain"),
                self.raw,
                task=supervised_task(method),
                burst=method == "m2m",
            )
            result["pretrain"] = pretrain(
                model,
                self.objectives[method].to(self.device),
                sampler,
                config,
                self.device,
                checkpoint_dir,
                lambda step, values: self.logger.log(method, seed, "pretrain", step, values),
                progress_bar(config.progress, f"pre-train {tag}"),
                config.resume,
                lambda message: self.say(f"  {tag}: {message}"),
                self.dist,
            )
        if not self.dist.is_main:
            return result  # the run folder and the proxy evaluation are rank 0's
        if "pretrain" in result:
            self.say(
                f"  {tag}: pre-trained {config.pretrain_steps} steps in {result['pretrain']['seconds']:.1f} s, "
                f"final loss {result['pretrain']['final_loss']:.4g}"
            )
        save_checkpoint(checkpoint_dir / "pretrained.safetensors", model, metadata={"method": method, "seed": seed})

        samples: dict[str, np.ndarray] = {}
        if first_seed and config.plots and "pretrain" in result:
            gaps = self._gaps(model)
            self.densities[method] = samples["density"] = gaps
            result["density"] = {
                "distance": self.density_distance,
                "positive_closer_init": fraction_positive(torch.from_numpy(self.densities["init"])),
                "positive_closer_after": fraction_positive(torch.from_numpy(gaps)),
                "positive_closer_true_noise": fraction_positive(torch.from_numpy(self.densities["noise"])),
            }
        model.eval()  # the network as pre-trained, no layer replaced: the "0 labels" row
        result["as_is"] = {
            task: _scores_dict(evaluate_restorer(model, self.test, task, self.device, config.eval_crop))
            for task in tasks
        }
        result["tasks"] = {}
        for task in tasks if config.finetune_steps > 0 else ():

            def log_finetune(step: int, loss: float, task: str = task) -> None:
                if step % config.log_every == 0 or step == config.finetune_steps:
                    self.logger.log(method, seed, f"finetune-{task}", step, {"l1": loss})

            tuned, scores, seconds = proxy_evaluate(
                model,
                task,
                self.labelled,
                self.test,
                self.proxy_settings,
                seeded_generator(seed, "finetune", task),
                self.device,
                self.raw,
                config.eval_crop,
                config.grid_images if first_seed else 0,
                log_finetune,
                progress_bar(config.progress, f"fine-tune {tag} {task}"),
            )
            save_checkpoint(
                checkpoint_dir / f"finetuned_{task}.safetensors",
                tuned,
                metadata={"method": method, "seed": seed, "task": task},
            )
            result["tasks"][task] = {**_scores_dict(scores), "finetune_seconds": seconds}
            if first_seed:
                self.examples[task][method] = scores.examples
                for index, (_, output, _) in enumerate(scores.examples):
                    samples[f"{task}.{index}"] = output.numpy()
            self.say(
                f"  {tag}: {task} PSNR {scores.mean_psnr:.2f} dB, SSIM {scores.mean_ssim:.4f} "
                f"(fine-tuned head in {seconds:.1f} s)"
            )
        if first_seed:
            with atomic_path(samples_path) as temporary:
                np.savez_compressed(temporary, **samples)
        for phase, key in (("proxy", "tasks"), ("as-is", "as_is")):
            if result[key]:
                scores_row = {f"{t}_{k}": v[k] for t, v in result[key].items() for k in ("psnr", "ssim")}
                self.logger.log(method, seed, phase, 0, scores_row)
        write_json_atomically(result_path, result)  # last: its presence marks the (method, seed) finished
        return result

    def _reuse_result(self, method: str, result_path: Path, samples_path: Path | None, tag: str) -> dict:
        """A finished (method, seed)'s saved result, and for the first seed its figure data from
        ``samples_path``; DamagedFileError naming a file that cannot be read."""
        result = read_json(result_path)
        tasks = self.config.evaluation_tasks(method)
        proxy_tasks = tasks if self.config.finetune_steps > 0 else []
        if (
            not isinstance(result, dict)
            or not set(proxy_tasks) <= set(result.get("tasks", {}))
            or not set(tasks) <= set(result.get("as_is", {}))
        ):
            raise DamagedFileError(result_path, f"it lacks the scores of the tasks {tasks}")
        if samples_path is not None:
            _load_samples(samples_path, method, self.examples, self.densities)
        self.say(f"  {tag}: reused finished result")
        return result

    def _environment(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "device": str(self.device),
            "torch": torch.__version__,
            "rcl_ops": rcl_ops.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "distance_backends_available": rcl_ops.available_backends(self.device),
            "encoders": self.encoder_records,
            "num_train_images": len(self.train),
            "num_test_images": len(self.test),
            "num_labelled": len(self.labelled),
            "train_images": [r.name for r in self.train],
            "test_images": [r.name for r in self.test],
            "wall_seconds": time.perf_counter() - self.started,
            "command": " ".join(sys.argv),
        }


def _load_samples(path: Path, method: str, examples: dict, densities: dict) -> None:
    """Restore a finished run's Fig. 2 gaps and sample outputs (for --resume); DamagedFileError naming
    ``path`` (and nothing restored) when it cannot be read."""
    try:
        with np.load(path) as archive:
            stored = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DamagedFileError(path, f"{type(error).__name__}: {error}") from error
    if "density" in stored:
        densities[method] = stored["density"]
    for task, task_examples in examples.items():
        reference = task_examples.get("Input", [])
        outputs = []
        for index, (inputs, _, target) in enumerate(reference):
            key = f"{task}.{index}"
            if key in stored:
                outputs.append((inputs, torch.from_numpy(stored[key]), target))
        if outputs:
            task_examples[method] = outputs
