"""The rows of the results tables: per method, the mean and std over seeds of its scores on each task (the
proxy evaluation, or the pre-trained network as it is), and the task input's own scores."""

from __future__ import annotations

import math
import statistics

from .config import TrainConfig
from .evaluate import TestScores
from .methods import METHODS, method_title, spec_of, supervised_method

INPUT_TITLES = {
    "denoise": "noisy",
    "sr2": "bicubic",
    "sr4": "bicubic",
    "jdensr2": "bicubic of noisy",
    "jdd": "bilinear demosaic",
    "jdemsr2": "bilinear demosaic",
    "jddsr2": "bilinear demosaic",
}


def mean_std(values: list[float]) -> dict:
    """Mean, std (NaN when a value is not finite, e.g. an infinite PSNR) and count of ``values``."""
    std = 0.0
    if len(values) > 1:
        std = statistics.stdev(values) if all(math.isfinite(v) for v in values) else math.nan
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def input_row(config: TrainConfig, naive: dict[str, TestScores]) -> dict:
    return {
        "method": "input",
        "title": "Input (" + ", ".join(dict.fromkeys(INPUT_TITLES[t] for t in config.tasks)) + ")",
        "tasks": {
            t: {"psnr": mean_std([naive[t].mean_psnr]), "ssim": mean_std([naive[t].mean_ssim])} for t in config.tasks
        },
    }


def task_runs(runs: list[dict], method: str, task: str, key: str) -> list[dict]:
    """The runs holding ``method``'s scores on ``task`` under ``key`` ("tasks" or "as_is"); the Oracle of a
    task is the supervised pre-training on that task ('sl-<task>')."""
    spec = spec_of(method)
    source = supervised_method(task).name if spec is not None and spec.per_task else method
    return [r for r in runs if r["method"] == source and task in r.get(key, {})]


def _row(method: str, title: str, tasks: list[str], runs: list[dict], key: str) -> dict | None:
    scores = {}
    for task in tasks:
        mine = task_runs(runs, method, task, key)
        if mine:
            scores[task] = {
                "psnr": mean_std([r[key][task]["psnr"] for r in mine]),
                "ssim": mean_std([r[key][task]["ssim"] for r in mine]),
            }
    if not scores:
        return None
    mine = [r for t in scores for r in task_runs(runs, method, t, key)]
    return {
        "method": method,
        "title": title,
        "seeds": sorted({r["seed"] for r in mine}),
        "tasks": scores,
        "pretrain_seconds": statistics.fmean(r.get("pretrain", {}).get("seconds", 0.0) for r in mine),
    }


def method_rows(config: TrainConfig, runs: list[dict], key: str) -> list[dict]:
    """One row per method: mean and std over seeds of the scores under ``key`` ("tasks": proxy
    evaluation, "as_is": the pre-trained network itself); a task a method was not evaluated on is left
    out of its row. The Oracle row takes each task from the supervised pre-training on that task; an
    'SL (<task>)' row leaves its own task to the Oracle row when there is one."""
    rows = []
    per_task = [name for name in config.methods if METHODS[name].per_task]
    for method in config.variant_keys():
        if config.oracle_only(method):
            continue
        task_of_its_own = spec_of(method).task if per_task else None
        tasks = [t for t in config.tasks if t != task_of_its_own]
        row = _row(method, method_title(method), tasks, runs, key)
        if row is not None:
            rows.append(row)
    for name in per_task:
        row = _row(name, method_title(name), list(config.tasks), runs, key)
        if row is not None:
            rows.append(row)
    return rows


def flag_below_input(rows: list[dict]) -> list[dict]:
    """``rows``: the input row, then method rows; each method row gets ``below_input``, the tasks on which its
    mean PSNR is below the input row's (a network that scores below its own input ranks nothing there)."""
    reference = rows[0]["tasks"]
    for row in rows[1:]:
        row["below_input"] = [
            task
            for task, scores in row["tasks"].items()
            if task in reference and scores["psnr"]["mean"] < reference[task]["psnr"]["mean"]
        ]
    return rows
