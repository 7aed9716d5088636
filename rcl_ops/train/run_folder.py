"""The run folder: where a run writes (``<output_dir>/<run_name>/``), whether a --resume may continue the run
saved there, and its creation with config.json. Layout::

    config.json                  resolved configuration
    metrics.csv                  every logged loss (long format); tensorboard/ when enabled
    checkpoints/<key>/seed<s>/pretrain_last.safetensors   resumable pre-training state
    checkpoints/<key>/seed<s>/pretrain_previous.safetensors  the one before, if the last is damaged
    checkpoints/<key>/seed<s>/pretrained.safetensors      pre-trained weights
    checkpoints/<key>/seed<s>/finetuned_<task>.safetensors  proxy-evaluated weights
    results/<key>_seed<s>.json   per-variant scores (reused by --resume)
    results/labels/<protocol>_n<count>_seed<s>.json  the label study's scores
    results.json, results.md     the table (Table 1 shape) and every number behind it
    figures/                     residual_distance_density.png (Fig. 2), samples_<task>.png

(<key>: a pre-trained variant, e.g. rcl-emd+random: methods.Variant.) Every file but the append-only
metrics.csv is written to a temporary file and renamed, so a kill never leaves a truncated one; on --resume a
damaged file is named, and a damaged checkpoint falls back to the previous one.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from .config import TrainConfig, config_to_dict
from .config_checks import flag
from .files import DamagedFileError, read_json, write_json_atomically
from .preflight import RunError

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
