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

A run folder is claimed before anything is written there (``claim_run_dir``): a new run creates it exclusively
(or takes an empty one) and holds its lock (run_lock.py) while it runs; a folder that holds anything else, a
run folder without its config.json included, is refused, and so is a --resume of a run that a live process
still trains. Runs named by their start time that start in the same second get folders of their own (-2, -3).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from .config import TrainConfig, config_to_dict
from .config_checks import flag
from .files import DamagedFileError, read_json, write_json_atomically
from .preflight import RunError
from .run_lock import LOCK_NAME, RunLock, lock_holder, take_lock

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
        holder = lock_holder(run_dir)
        if holder is not None:
            raise RunError(_still_training(run_dir, holder))
        return run_dir, saved
    run_dir = output / (config.run_name or f"{config.preset or 'run'}-{timestamp()}")
    problem = _occupied(run_dir) if config.run_name is not None and run_dir.exists() else None
    if problem is not None:  # said now, before the data is prepared; claim_run_dir checks again under the lock
        raise RunError(problem)
    return run_dir, None


def timestamp() -> str:
    """The start time in the name of a run without --run-name: 20270101-120000."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _occupied(run_dir: Path, locked: bool = False) -> str | None:
    """Why a new run cannot use the existing ``run_dir`` (None: it is an empty folder). ``locked``: this
    process holds its lock."""
    if not run_dir.is_dir():
        return f"{run_dir} is a file, not a run folder; choose another --run-name"
    holder = None if locked else lock_holder(run_dir)
    if holder is not None:
        return _in_use(run_dir, holder)
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)
    if "config.json" in entries:
        return f"run folder {run_dir} already holds a run; pass --resume to continue it or choose another --run-name"
    shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "")
    if {"checkpoints", "results"} & set(entries):  # folders of a run of rcl-train, whose config.json is gone
        return (
            f"run folder {run_dir} looks like a run of rcl-train whose config.json is missing (it holds {shown}): "
            "without its configuration it cannot be resumed, and it is not replaced; move it away or choose "
            "another --run-name"
        )
    if entries:
        return (
            f"run folder {run_dir} holds files that are not a run of rcl-train ({shown}); they are not replaced: "
            "choose another --run-name, or empty the folder"
        )
    return None


def _in_use(run_dir: Path, holder: str) -> str:
    return f"run folder {run_dir} is in use by {holder} (a run in progress); choose another --run-name"


def _still_training(run_dir: Path, holder: str) -> str:
    return (
        f"--resume: the run in {run_dir} is still being trained by {holder}; wait for it to end (or stop it) "
        "before resuming it"
    )


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


# Runs named by their start time that start in the same second take the name with -2, -3, ... up to this.
MAX_SAME_SECOND = 100


def claim_run_dir(run_dir: Path, config: TrainConfig, say: Callable[[str], None]) -> tuple[Path, RunLock]:
    """The run folder this process writes into, and its lock (held until ``RunLock.release``).

    --resume: ``run_dir`` locked (RunError while a live process trains there). A new run: ``run_dir`` created
    exclusively (an existing empty folder is taken) and locked, then its config.json written; RunError when it
    holds anything but the lock file or another process holds it. A run without --run-name whose folder name is
    taken (another run started in the same second) takes the next free ``<name>-2``, ``<name>-3``, ...
    """
    if config.resume:
        return run_dir, take_lock(run_dir, say, lambda holder: _still_training(run_dir, holder))
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create the output folder {run_dir.parent}: {error}") from error
    for index in range(1, MAX_SAME_SECOND + 1):
        candidate = run_dir if index == 1 else run_dir.with_name(f"{run_dir.name}-{index}")
        try:
            candidate.mkdir()
        except FileExistsError:
            if config.run_name is None:
                continue
            if not candidate.is_dir():
                raise RunError(_occupied(candidate)) from None
        except OSError as error:
            raise RunError(f"cannot create the run folder {candidate}: {error}") from error
        return candidate, _claim_new(candidate, config, say)
    raise RunError(f"the run folders {run_dir} to {candidate} all exist; pass --run-name")


def _claim_new(run_dir: Path, config: TrainConfig, say: Callable[[str], None]) -> RunLock:
    """Lock the new run's folder, check under the lock that it holds nothing else, and write config.json."""
    had_lock_file = (run_dir / LOCK_NAME).exists()
    lock = take_lock(run_dir, say, lambda holder: _in_use(run_dir, holder))
    try:
        problem = _occupied(run_dir, locked=True)
        if problem is not None:
            if not had_lock_file:  # leave a folder that is not ours as it was
                lock.path.unlink(missing_ok=True)
            raise RunError(problem)
        write_json_atomically(run_dir / "config.json", config_to_dict(config))
    except BaseException:
        lock.release()
        raise
    return lock
