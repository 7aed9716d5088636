"""Reporting: the results table (Table 1 shape, markdown + JSON), the residual-distance density plot
(Fig. 2) and sample image grids (input / outputs / clean)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, config_to_dict, label_count
from .data import DENOISING_TASK, TASK_TITLES, photograph_of
from .evaluate import TestScores
from .files import atomic_path, write_json_atomically, write_text_atomically
from .losses import CONTROL_PREFIX, DEFAULT_TEMPERATURES, SUPERVISED_PREFIX, method_title, split_run_key

INPUT_TITLES = {
    "denoise": "noisy",
    "sr2": "bicubic",
    "sr4": "bicubic",
    "jdensr2": "bicubic of noisy",
    "jdd": "bilinear demosaic",
    "jdemsr2": "bilinear demosaic",
    "jddsr2": "bilinear demosaic",
}


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _input_row(config: TrainConfig, naive: dict[str, TestScores]) -> dict:
    return {
        "method": "input",
        "title": "Input (" + ", ".join(dict.fromkeys(INPUT_TITLES[t] for t in config.tasks)) + ")",
        "tasks": {
            t: {"psnr": _mean_std([naive[t].mean_psnr]), "ssim": _mean_std([naive[t].mean_ssim])} for t in config.tasks
        },
    }


def task_runs(runs: list[dict], method: str, task: str, key: str) -> list[dict]:
    """The runs holding ``method``'s scores on ``task`` under ``key`` ("tasks" or "as_is"); the Oracle of a
    task is the supervised pre-training on that task ('sl-<task>')."""
    source = SUPERVISED_PREFIX + task if method == "oracle" else method
    return [r for r in runs if r["method"] == source and task in r.get(key, {})]


def _row(method: str, title: str, tasks: list[str], runs: list[dict], key: str) -> dict | None:
    scores = {}
    for task in tasks:
        mine = task_runs(runs, method, task, key)
        if mine:
            scores[task] = {
                "psnr": _mean_std([r[key][task]["psnr"] for r in mine]),
                "ssim": _mean_std([r[key][task]["ssim"] for r in mine]),
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


def _method_rows(config: TrainConfig, runs: list[dict], key: str) -> list[dict]:
    """One row per method: mean and std over seeds of the scores under ``key`` ("tasks": proxy
    evaluation, "as_is": the pre-trained network itself); a task a method was not evaluated on is left
    out of its row. The Oracle row takes each task from the supervised pre-training on that task; an
    'SL (<task>)' row leaves its own task to the Oracle row when there is one."""
    rows = []
    for method in config.run_keys():
        if config.oracle_only(method):
            continue
        tasks = list(config.tasks)
        if method.startswith(SUPERVISED_PREFIX) and "oracle" in config.methods:
            tasks = [t for t in tasks if SUPERVISED_PREFIX + t != method]
        row = _row(method, method_title(method), tasks, runs, key)
        if row is not None:
            rows.append(row)
    if "oracle" in config.methods:
        row = _row("oracle", method_title("oracle"), list(config.tasks), runs, key)
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


def _diagnostic_rows(config: TrainConfig, runs: list[dict]) -> list[dict]:
    """Per RCL method, the pre-training diagnostics averaged over seeds, and whether any seed's
    contrastive loss ended at chance."""
    rows = []
    for method in config.run_keys():
        summaries = [r["pretrain"]["diagnostics"] for r in runs if r["method"] == method and "pretrain" in r]
        summaries = [d for d in summaries if "at_chance" in d]
        if not summaries:
            continue
        row = {"method": method, "title": method_title(method), "seeds_at_chance": 0, "n": len(summaries)}
        for key in (
            "contrast_per_query_first",
            "contrast_per_query_end",
            "contrast_chance_last",
            "retrieval_top1_first",
            "retrieval_top1_end",
            "grad_norm_ratio_first",
            "grad_norm_ratio_last",
        ):
            values = [d[key] for d in summaries if key in d]
            row[key] = statistics.fmean(values) if values else math.nan
        row["seeds_at_chance"] = sum(bool(d["at_chance"]) for d in summaries)
        rows.append(row)
    return rows


# Below this ratio of gradient norms (alpha * L_contrast against L_consistency, at the end of pre-training)
# the contrastive term moves the network by at most about 1% of what the consistency term does.
NEGLIGIBLE_GRAD_RATIO = 0.01
SMALL_GRAD_RATIO = 0.1


def contrast_verdict(row: dict) -> str:
    """One plain sentence, from a diagnostics row, on whether the contrastive term did anything in
    pre-training: at chance (it taught nothing), a negligible gradient (the consistency term alone
    drives training), or a gradient that matters; with the loss and retrieval against chance."""
    chance = row["contrast_chance_last"]
    ratio = row["grad_norm_ratio_last"]
    evidence = (
        f"L_contrast per query {row['contrast_per_query_first']:.3f} -> {row['contrast_per_query_end']:.3f} "
        f"(chance ln B = {chance:.3f}), top-1 retrieval {row['retrieval_top1_first']:.2f} -> "
        f"{row['retrieval_top1_end']:.2f} (chance {math.exp(-chance):.2f}), gradient-norm ratio "
        f"alpha*L_contrast / L_consistency {ratio:.2e} at the end"
    )
    if row["seeds_at_chance"]:
        verdict = (
            f"NO: its loss ended at chance in {row['seeds_at_chance']} of {row['n']} seed(s), so the contrastive "
            "term taught the network nothing there"
        )
    elif not ratio >= NEGLIGIBLE_GRAD_RATIO:
        verdict = (
            f"HARDLY: its gradient is {ratio:.1%} of the consistency term's, so the consistency loss alone "
            "drives pre-training and the contrastive term changes the updates by about that share at most"
        )
    elif ratio < SMALL_GRAD_RATIO:
        verdict = (
            f"A LITTLE: its gradient is {ratio:.1%} of the consistency term's, a small correction to updates that "
            "the consistency loss drives (whether it helps the scores, only a run with --alpha 0 on the same "
            "seeds can tell)"
        )
    else:
        verdict = (
            f"YES, it shapes the updates: its gradient is {ratio:.0%} of the consistency term's (whether that "
            "helps the scores, only a run with --alpha 0 on the same seeds can tell)"
        )
    return f"{row['title']}: {verdict}; {evidence}."


def label_efficiency(
    config: TrainConfig, runs: list[dict], label_results: list[dict], num_train: int, names: list[str]
) -> dict:
    """The label-efficiency study (Tables 3 and 5): per protocol ('sl' or an RCL run key) and number of
    labels, PSNR/SSIM mean and std over seeds; the RCL networks as is at 0 labels; and per level, each
    RCL+SL against SL as a paired PSNR difference over the test images ``names``' photographs x seeds
    (_paired_psnr; with Table 5's 30%-vs-all comparison when both levels were run)."""
    if not label_results:
        return {}
    protocols = list(dict.fromkeys(r["protocol"] for r in label_results))
    levels = sorted({r["labels"] for r in label_results})

    def pick(protocol: str, count: int) -> list[dict]:
        return [r for r in label_results if r["protocol"] == protocol and r["labels"] == count]

    table = {
        protocol: {
            str(count): {
                "psnr": _mean_std([r["psnr"] for r in pick(protocol, count)]),
                "ssim": _mean_std([r["ssim"] for r in pick(protocol, count)]),
            }
            for count in levels
            if pick(protocol, count)
        }
        for protocol in protocols
    }
    zero = {}
    for protocol in protocols[1:]:
        task = DENOISING_TASK[config.modality]
        as_is = [r["as_is"][task] for r in runs if r["method"] == protocol and task in r.get("as_is", {})]
        if as_is:
            zero[protocol] = {
                "psnr": _mean_std([a["psnr"] for a in as_is]),
                "ssim": _mean_std([a["ssim"] for a in as_is]),
            }

    def versus(protocol: str, count: int, baseline_count: int) -> dict | None:
        mine = {r["seed"]: r["psnr_per_image"] for r in pick(protocol, count)}
        theirs = {r["seed"]: r["psnr_per_image"] for r in pick("sl", baseline_count)}
        paired = _paired_psnr(mine, theirs, names)
        if paired is None:
            return None
        interval = paired["paired_psnr"]
        return {
            "protocol": protocol,
            "labels": count,
            "sl_labels": baseline_count,
            **paired,
            "sentence": f"RCL+SL [{method_title(protocol)}] with {count} labels vs SL with {baseline_count}: "
            f"{interval['mean']:+.2f} dB paired PSNR difference, {interval_text(interval)}{_noise_note(interval)}",
        }

    comparisons = [versus(p, count, count) for p in protocols[1:] for count in levels]
    if "30%" in config.labels and "all" in config.labels:  # Table 5: fine-tuning on 30% against SL on all
        comparisons += [versus(p, label_count("30%", num_train), num_train) for p in protocols[1:]]
    return {
        "levels": levels,
        "protocols": protocols,
        "table": table,
        "zero_labels": zero,
        "comparisons": [c for c in comparisons if c is not None],
    }


def _label_table(study: dict) -> list[str]:
    protocols = study["protocols"]
    header = ["# Labels"] + [("SL" if p == "sl" else f"RCL+SL [{method_title(p)}]") + " PSNR / SSIM" for p in protocols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    zero = ["0", "-"] + [
        f"{mean_std_cell(study['zero_labels'][p]['psnr'], 2)} / {mean_std_cell(study['zero_labels'][p]['ssim'], 4)}"
        if p in study["zero_labels"]
        else "-"
        for p in protocols[1:]
    ]
    lines.append("| " + " | ".join(zero) + " |")
    for count in study["levels"]:
        cells = [str(count)]
        for protocol in protocols:
            entry = study["table"][protocol].get(str(count))
            cells.append(f"{mean_std_cell(entry['psnr'], 2)} / {mean_std_cell(entry['ssim'], 4)}" if entry else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summarise(
    config: TrainConfig,
    runs: list[dict],
    naive: dict[str, TestScores],
    environment: dict,
    label_results: list[dict] = (),
) -> dict:
    """Aggregate per-(method, seed) results into table rows (mean and std over seeds, flagged where below the
    input) for the proxy evaluation and for the pre-trained networks as they are, the pre-training
    diagnostics, plain-words comparisons of every RCL variant with every baseline, as measured, and of each
    RCL variant with its controls. ``environment['test_images']``: the test images' names, in the order of
    every per-image score list (their photographs are the units of the intervals)."""
    input_row = _input_row(config, naive)
    rows = flag_below_input([input_row, *_method_rows(config, runs, "tasks")]) if config.finetune_steps > 0 else []
    as_is_rows = flag_below_input([input_row, *_method_rows(config, runs, "as_is")])
    diagnostics = _diagnostic_rows(config, runs)
    names = environment["test_images"]
    comparisons = compare(rows, config.tasks, runs, "tasks", naive, names)
    as_is_comparisons = compare(as_is_rows, config.tasks, runs, "as_is", naive, names)
    return {
        "config": config_to_dict(config),
        "environment": environment,
        "tasks": list(config.tasks),
        "rows": rows,
        "as_is_rows": as_is_rows,
        "diagnostics": diagnostics,
        "contrast_verdicts": [contrast_verdict(row) for row in diagnostics if row["method"].startswith("rcl-")],
        "comparisons": comparisons,
        "as_is_comparisons": as_is_comparisons,
        "control_comparisons": (
            control_comparisons(rows, comparisons) if rows else control_comparisons(as_is_rows, as_is_comparisons)
        ),
        "label_efficiency": label_efficiency(config, runs, list(label_results), environment["num_train_images"], names),
        "label_runs": list(label_results),
        "runs": runs,
    }


def paired_difference(differences: list[float], confidence: float = 0.95) -> dict:
    """Mean of paired per-image differences and its two-sided t interval (n - 1 degrees of freedom);
    the interval is NaN for fewer than two images. ``could_be_noise``: the interval contains 0."""
    from scipy import stats

    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n, "could_be_noise": True}
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "n": n,
        "could_be_noise": bool(mean - half <= 0 <= mean + half),
    }


def photographs_seeds_interval(differences: dict[int, list[float]], names: list[str], confidence: float = 0.95) -> dict:
    """Paired differences {seed: one per test image, in the order of ``names``} -> d[s, p], the mean over
    photograph p's images (tiles) at seed s, an (S, P) table; the estimate is its grand mean (every photograph
    and seed weighs the same). SE_p = std_p(mean_s d) / sqrt(P), SE_s = std_s(mean_p d) / sqrt(S); with P, S >= 2
    the t interval is mean ± t(df) sqrt(SE_p^2 + SE_s^2), df = min(P, S) - 1 (conservative: the interaction
    counts twice); with only one of P, S >= 2, that factor's SE alone (df = its count - 1); with neither, NaN.
    ``could_be_noise``: no interval, or it contains 0."""
    from scipy import stats

    photographs = [photograph_of(name) for name in names]
    members = {p: [i for i, q in enumerate(photographs) if q == p] for p in dict.fromkeys(photographs)}
    table = []
    for seed, values in differences.items():
        if len(values) != len(names):
            raise ValueError(f"{len(names)} test image names for {len(values)} per-image differences (seed {seed})")
        table.append([statistics.fmean(values[i] for i in indices) for indices in members.values()])
    d = np.array(table, dtype=np.float64).reshape(len(differences), len(members))
    num_seeds, num_photographs = d.shape
    errors = {
        "photographs": d.mean(axis=0).std(ddof=1) / math.sqrt(num_photographs) if num_photographs > 1 else None,
        "seeds": d.mean(axis=1).std(ddof=1) / math.sqrt(num_seeds) if num_seeds > 1 else None,
    }
    mean, half, df = float(d.mean()), math.nan, None
    if all(e is not None for e in errors.values()):
        basis, df = "photographs x seeds", min(num_photographs, num_seeds) - 1
        half = stats.t.ppf(0.5 + confidence / 2, df) * math.hypot(*errors.values())
    elif errors["seeds"] is not None:
        basis, df = "seeds only (one photograph)", num_seeds - 1
        half = stats.t.ppf(0.5 + confidence / 2, df) * errors["seeds"]
    elif errors["photographs"] is not None:
        basis, df = "photographs only (one seed)", num_photographs - 1
        half = stats.t.ppf(0.5 + confidence / 2, df) * errors["photographs"]
    else:
        basis = "none (one photograph, one seed)"
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "n_photographs": num_photographs,
        "n_seeds": num_seeds,
        "df": df,
        "basis": basis,
        "could_be_noise": df is None or bool(mean - half <= 0 <= mean + half),
    }


def interval_text(paired: dict) -> str:
    """'95% CI [-0.40, +0.12] over 2 photographs x 3 seeds' (or over the one factor that varies, saying which;
    or 'no interval (one photograph, one seed)'), from photographs_seeds_interval."""
    photographs, seeds = paired["n_photographs"], paired["n_seeds"]
    if paired["df"] is None:
        return "no interval (one photograph, one seed)"
    if photographs > 1 and seeds > 1:
        over = f"{photographs} photographs x {seeds} seeds"
    else:
        over = f"{seeds} seeds" if seeds > 1 else f"{photographs} photographs"
        over += f", {paired['basis']}"
    return f"95% CI [{paired['low']:+.2f}, {paired['high']:+.2f}] over {over}"


def _noise_note(paired: dict) -> str:
    """' (could be noise...)' after interval_text where photographs_seeds_interval says it could be."""
    if paired["df"] is None:
        return " (could be noise)"
    return " (could be noise: the interval contains 0)" if paired["could_be_noise"] else ""


def _paired_psnr(mine: dict[int, list[float]], theirs: dict[int, list[float]], names: list[str]) -> dict | None:
    """Per-image PSNR of two methods ({seed: one per test image}) paired on the seeds both have:
    {'paired_psnr': photographs_seeds_interval of mine - theirs, 'paired_psnr_per_image': paired_difference
    of each image's difference averaged over those seeds (tiles taken as independent), 'seeds'}; None
    without a shared seed."""
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    differences = {s: [a - b for a, b in zip(mine[s], theirs[s])] for s in seeds}
    paired = photographs_seeds_interval(differences, names)
    per_image = [statistics.fmean(differences[s][i] for s in seeds) for i in range(len(names))]
    return {"paired_psnr": paired, "paired_psnr_per_image": paired_difference(per_image), "seeds": seeds}


def _per_image_psnr(runs: list[dict], key: str, method: str, task: str) -> dict[int, list[float]]:
    """{seed: per-image PSNR} of ``method``'s runs on ``task`` under ``key`` ("tasks" or "as_is")."""
    return {r["seed"]: r[key][task]["psnr_per_image"] for r in task_runs(runs, method, task, key)}


def compare(
    rows: list[dict], tasks: list[str], runs: list[dict], key: str, naive: dict[str, TestScores], names: list[str]
) -> list[dict]:
    """Per (RCL variant, baseline, task): the difference of the mean PSNR/SSIM, and the paired PSNR difference
    (_paired_psnr, over the test images ``names``' photographs x the seeds both have) with its 95% t interval,
    and a sentence saying it, whichever way it goes."""
    by_method = {row["method"]: row for row in rows}
    comparisons = []
    for method, row in by_method.items():
        if not method.startswith("rcl-"):
            continue
        for baseline in [m for m in by_method if not m.startswith("rcl-")]:
            for task in tasks:
                if task in row["tasks"] and task in by_method[baseline]["tasks"]:
                    mine = _per_image_psnr(runs, key, method, task)
                    theirs = (
                        {seed: naive[task].psnr for seed in mine}
                        if baseline == "input"
                        else _per_image_psnr(runs, key, baseline, task)
                    )
                    paired = _paired_psnr(mine, theirs, names)
                    if paired is not None:
                        comparisons.append(_comparison(row, by_method[baseline], task, paired))
    return comparisons


def _comparison(row: dict, other: dict, task: str, paired: dict) -> dict:
    """compare()'s entry for ``row`` against ``other`` on ``task``, given their _paired_psnr."""
    d_psnr = row["tasks"][task]["psnr"]["mean"] - other["tasks"][task]["psnr"]["mean"]
    d_ssim = row["tasks"][task]["ssim"]["mean"] - other["tasks"][task]["ssim"]["mean"]
    verdict = (
        "beats"
        if d_psnr > 0 and d_ssim > 0
        else ("does not beat" if d_psnr <= 0 and d_ssim <= 0 else "is mixed against")
    )
    interval = paired["paired_psnr"]
    return {
        "method": row["method"],
        "baseline": other["method"],
        "task": task,
        "psnr_difference": d_psnr,
        "ssim_difference": d_ssim,
        **paired,
        "sentence": f"{row['title']} {verdict} {other['title']} on {TASK_TITLES[task]}: {d_psnr:+.2f} dB PSNR, "
        f"{d_ssim:+.4f} SSIM; paired PSNR difference {interval['mean']:+.2f} dB, {interval_text(interval)}"
        f"{_noise_note(interval)}",
    }


def control_keys(key: str) -> dict[str, str]:
    """The controls of RCL run key 'rcl-<d>[+<encoder>]': {'consistency': 'consistency[+<encoder>]' (alpha 0:
    the consistency loss alone, same encoder), 'contrast': 'contrast-<d>' (the contrastive term alone)}."""
    method, encoder = split_run_key(key)
    return {
        "consistency": "consistency" + (f"+{encoder}" if encoder else ""),
        "contrast": CONTROL_PREFIX + method.removeprefix("rcl-"),
    }


# What an RCL row against each control asks: the term the control leaves out.
CONTROL_QUESTIONS = {"consistency": "contrastive", "contrast": "consistency"}


def control_comparisons(rows: list[dict], comparisons: list[dict]) -> list[dict]:
    """From compare()'s entries over ``rows``, each RCL row against its own controls (control_keys) per task:
    does the term the control leaves out help? 'yes' (the paired interval above 0), 'no (it hurts)' (below 0)
    or 'could be noise', in a sentence."""
    titles = {row["method"]: row["title"] for row in rows}
    found = []
    for entry in comparisons:
        controls = control_keys(entry["method"])
        control = next((kind for kind, key in controls.items() if key == entry["baseline"]), None)
        if control is None:
            continue
        paired = entry["paired_psnr"]
        answer = "could be noise" if paired["could_be_noise"] else ("yes" if paired["low"] > 0 else "no (it hurts)")
        term = CONTROL_QUESTIONS[control]
        found.append(
            {
                **{k: entry[k] for k in ("method", "baseline", "task", "paired_psnr", "seeds")},
                "term": term,
                "answer": answer,
                "sentence": f"Does the {term} term help ({titles[entry['method']]} vs {titles[entry['baseline']]}, "
                f"{TASK_TITLES[entry['task']]}, same seeds)? {paired['mean']:+.2f} dB, {interval_text(paired)}: "
                f"{answer}",
            }
        )
    return found


def mean_std_cell(stats: dict, digits: int) -> str:
    """'mean' or 'mean ± std' (more than one value) of a _mean_std entry, to ``digits`` decimals."""
    text = f"{stats['mean']:.{digits}f}"
    if stats["n"] > 1:
        text += f" ± {stats['std']:.{digits}f}"
    return text


BELOW_INPUT = " (below input)"


def _score_table(rows: list[dict], tasks: list[str]) -> list[str]:
    """The markdown table of ``rows`` (mean ± std cells; a PSNR below the input row's marked BELOW_INPUT), and
    a line saying what the mark means when a row has one."""
    header = ["Method"]
    for task in tasks:
        header += [f"{TASK_TITLES[task]} PSNR", f"{TASK_TITLES[task]} SSIM"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["title"]]
        for task in tasks:
            scores = row["tasks"].get(task)
            flag = BELOW_INPUT if task in row.get("below_input", ()) else ""
            cells += (
                [mean_std_cell(scores["psnr"], 2) + flag, mean_std_cell(scores["ssim"], 4)] if scores else ["-", "-"]
            )
        lines.append("| " + " | ".join(cells) + " |")
    if any(row.get("below_input") for row in rows):
        lines += [
            "",
            f"Rows marked{BELOW_INPUT} score below the input itself (the Input row) on that task: there, the row "
            "ranks nothing.",
        ]
    return lines


def _diagnostics_table(rows: list[dict]) -> list[str]:
    lines = [
        "| Method | L_contrast per query: start -> end (chance ln B) | top-1 retrieval: start -> end "
        "(chance 1/B) | grad-norm ratio alpha*L_contrast / L_consistency: start -> end | at chance |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        chance = row["contrast_chance_last"]
        flag = f"**AT CHANCE** ({row['seeds_at_chance']}/{row['n']} seeds)" if row["seeds_at_chance"] else "no"
        lines.append(
            f"| {row['title']} | {row['contrast_per_query_first']:.3f} -> {row['contrast_per_query_end']:.3f} "
            f"({chance:.3f}) | {row['retrieval_top1_first']:.2f} -> {row['retrieval_top1_end']:.2f} "
            f"({math.exp(-chance):.2f}) | {row['grad_norm_ratio_first']:.2e} -> {row['grad_norm_ratio_last']:.2e} "
            f"| {flag} |"
        )
    return lines


def _contrast_check_lines(checks: dict[str, dict[str, dict]]) -> list[str]:
    """Per distance, the pre-training check (mean over seeds): L_contrast per query of the true noise, of the
    networks at step 0 and of an over-smoothing denoiser, on the same crop pairs of the training data."""
    lines = []
    for distance, by_seed in checks.items():
        if not by_seed:
            continue
        mean = {key: statistics.fmean(c[key] for c in by_seed.values()) for key in ("ideal", "step0", "oversmoothing")}
        yes = sum(bool(c["rewards_denoising"]) for c in by_seed.values())
        chance = next(iter(by_seed.values()))["chance"]
        lines.append(
            f"- Check before pre-training ({distance.upper()}, training crops, mean over {len(by_seed)} seed(s)): "
            f"L_contrast per query of an ideal denoiser (the true noise) {mean['ideal']:.3f}, of the network at "
            f"step 0 {mean['step0']:.3f}, of an over-smoothing denoiser (Gaussian blur) {mean['oversmoothing']:.3f} "
            f"(chance {chance:.3f}): the contrastive term rewards denoising in {yes} of {len(by_seed)} seed(s)"
            + (
                "; it rewards the blur's residual (noise + image edges) even more"
                if mean["oversmoothing"] < mean["ideal"]
                else ""
            )
            + "."
        )
    return lines


def format_table(summary: dict) -> str:
    """The markdown results: a header describing the run, the proxy-evaluation table (rows: methods;
    columns: PSNR/SSIM per downstream task), the as-is ("0 labels") table, the pre-training diagnostics,
    and the measured comparisons."""
    config, env, tasks = summary["config"], summary["environment"], summary["tasks"]
    data = config["data_dir"] or "scikit-image sample images"
    seeds = config["seeds"]
    noise = (
        "real noisy/clean pairs (SIDD layout)"
        if config.get("data_format") == "sidd"
        else f"noise sigma in [{config['sigma_min']:g}, {config['sigma_max']:g}]/255"
    )
    lines = [
        f"Data: {data}, {env['num_train_images']} train / {env['num_test_images']} test images "
        f"({env['num_labelled']} labelled), {config['modality'].upper()}, {noise}; {config['model']} "
        f"(width {config['width'] or 'default'}, depth {config['depth'] or 'default'}), crops {config['crop_size']}, "
        f"{config['pretrain_steps']} pre-training + {config['finetune_steps']} fine-tuning steps, "
        f"mean{' ± std' if len(seeds) > 1 else ''} over {len(seeds)} seed(s); device {env['device']}, "
        f"{env['wall_seconds']:.0f} s.",
    ]
    if any(m.startswith("rcl-") for m in config["methods"]):
        temperature = config["temperature"]
        if temperature is None:
            temperature = "per distance: " + ", ".join(f"{d.upper()} {t:g}" for d, t in DEFAULT_TEMPERATURES.items())
        lines.append(
            f"RCL conventions: L_contrast {config['contrast_reduction']} over the batch (alpha {config['alpha']:g}, "
            f"temperature {temperature}), distances on the {config['distance_scale']} intensity scale, "
            f"L_consistency {config['consistency_reduction']}, g_e = ResNet-50 stem + {config['encoder_stages']} "
            "stage(s)."
        )
    for record in env.get("encoders", {}).values():
        source = f"file {record['file']}" if record.get("file") else f"seed {record.get('seed')}"
        digest = record.get("file_sha256") or record["state_sha256"]
        lines.append(f"g_e '{record['kind']}': {source}, sha256 {digest[:16]}...")
    if summary["rows"]:
        lines += ["", "Proxy evaluation (last layer re-initialised and fine-tuned with L1, rest frozen):", ""]
        lines += _score_table(summary["rows"], tasks)
    lines += ["", "As pre-trained, no layer replaced (0 labels):", ""]
    lines += _score_table(summary["as_is_rows"], tasks)
    if summary["diagnostics"]:
        lines += ["", "RCL pre-training diagnostics (mean over seeds; end = mean of the last quarter of logged steps):"]
        lines += ["", *_diagnostics_table(summary["diagnostics"])]
        lines += _contrast_check_lines(env.get("contrast_checks", {}))
        lines += ["", "Did the contrastive term do anything?"]
        lines += [f"- {verdict}" for verdict in summary["contrast_verdicts"]]
    study = summary.get("label_efficiency")
    if study:
        lines += [
            "",
            f"Label efficiency on {TASK_TITLES[DENOISING_TASK[config['modality']]]} (SL: from scratch; RCL+SL: "
            "every layer fine-tuned after RCL; 0 labels: as pre-trained; the same seeds and nested labelled subsets "
            "in every column):",
            "",
        ]
        lines += _label_table(study)
    lines += _comparison_lines(summary)
    return "\n".join(lines)


def _comparison_lines(summary: dict) -> list[str]:
    """results.md's comparisons: each RCL row against its controls, then every measured comparison, and how
    the intervals are computed."""
    config, lines = summary["config"], []
    controls = summary.get("control_comparisons", [])
    if controls:
        evaluation = "proxy evaluation" if summary["rows"] else "as pre-trained"
        lines += [
            "",
            f"Does each RCL term help? Each RCL row against its controls ({evaluation}; consistency only: alpha 0; "
            "contrastive only: no consistency term), paired on the same seeds:",
        ]
        lines += [f"- {c['sentence']}" for c in controls]
    comparisons = [c["sentence"] for c in summary["comparisons"]]
    comparisons += [f"as is: {c['sentence']}" for c in summary["as_is_comparisons"]]
    comparisons += [c["sentence"] for c in (summary.get("label_efficiency") or {}).get("comparisons", [])]
    if comparisons:
        tiles = f" (its {config['tile_size']}x{config['tile_size']} tiles)" if config.get("tile_size") else ""
        lines += ["", "Measured on this run:"]
        lines += [f"- {sentence}" for sentence in comparisons]
        lines.append(
            f"- Intervals: per seed and photograph, the paired PSNR difference is averaged over the photograph's "
            f"test images{tiles}; the estimate is the mean over photographs and seeds, and its 95% t interval "
            "combines the spread over photographs and over seeds, sqrt(SE_photographs^2 + SE_seeds^2) with "
            "min(photographs, seeds) - 1 degrees of freedom (conservative), or uses the one of the two that "
            "varies. results.json keeps the per-image interval (tiles taken as independent, usually narrower) as "
            "paired_psnr_per_image."
        )
        if len(config["seeds"]) == 1:
            lines.append(
                "- One seed only: no spread over seeds (no ± std, intervals over photographs alone), so "
                "differences of a few tenths of a dB may be noise."
            )
    return lines


def write_summary(run_dir: Path, summary: dict) -> None:
    """results.json (every number) and results.md (the table)."""
    write_json_atomically(run_dir / "results.json", summary)
    write_text_atomically(run_dir / "results.md", format_table(summary) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _density(ax, values: np.ndarray, label: str, style: str, limits: tuple[float, float]) -> None:
    from scipy.stats import gaussian_kde

    values = values[np.isfinite(values)]
    if values.size < 2 or np.ptp(values) == 0:
        ax.axvline(float(values.mean()) if values.size else 0.0, linestyle=style, label=label)
        return
    grid = np.linspace(*limits, 400)
    ax.plot(grid, gaussian_kde(values)(grid), style, label=label)


def plot_densities(path: Path, densities: dict[str, np.ndarray], distance: str) -> None:
    """Fig. 2: densities of the gaps d(negative) - d(positive) before training (the shared initial
    network), after pre-training with each method, and with the true noise as the residual. One panel
    per pre-trained method; the x range covers the trained and true-noise gaps (the initial network's
    wider spread is cut), and each title gives the share of gaps > 0 (positive pair closer)."""
    methods = [key for key in densities if key not in ("init", "noise")]
    if not methods or "init" not in densities:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False)
    name = distance.upper()
    for ax, method in zip(axes[0], methods):
        focus = np.concatenate([densities[method], densities["noise"]])
        focus = focus[np.isfinite(focus)]
        low, high = np.quantile(focus, [0.005, 0.995]) if focus.size else (-1.0, 1.0)
        margin = 0.15 * (high - low) or 1e-6
        limits = (float(low - margin), float(high + margin))
        _density(ax, densities["init"], "before training", "--", limits)
        _density(ax, densities[method], "after training", "-", limits)
        _density(ax, densities["noise"], "true noise", ":", limits)
        ax.set_xlim(*limits)
        ax.axvline(0.0, color="grey", linewidth=0.5)
        shares = [100 * float(np.mean(densities[key] > 0)) for key in ("init", method, "noise")]
        ax.set_title(
            f"{method_title(method)}\n{name}(neg) > {name}(pos): {shares[0]:.0f}% / {shares[1]:.0f}% / "
            f"{shares[2]:.0f}%",
            fontsize=9,
        )
        ax.set_xlabel(f"{name}(negative) - {name}(positive)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110)
    plt.close(fig)


def _displayable(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1] for imshow (a RAW mosaic shown as its grey values)."""
    array = image.clamp(0, 1).numpy()
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return array.transpose(1, 2, 0)


def plot_samples(path: Path, examples: dict[str, list], task: str) -> None:
    """A grid: one row per test image; columns input, each method's output, clean target."""
    if not examples or not examples.get("Input"):
        return
    plt = _pyplot()
    columns = list(examples)
    num_rows = len(examples["Input"])
    fig, axes = plt.subplots(
        num_rows, len(columns) + 1, figsize=(2.2 * (len(columns) + 1), 2.3 * num_rows), squeeze=False
    )
    for row in range(num_rows):
        inputs, _, target = examples["Input"][row]
        panels = (
            [("Input", inputs)]
            + [(name, examples[name][row][1]) for name in columns[1:] if row < len(examples[name])]
            + [("Clean", target)]
        )
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col < len(panels):
                title, image = panels[col]
                ax.imshow(_displayable(image), interpolation="nearest")
                if row == 0:
                    ax.set_title(method_title(title) if title not in ("Input", "Clean") else title, fontsize=9)
    fig.suptitle(TASK_TITLES[task], fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100)
    plt.close(fig)


def plot_label_efficiency(path: Path, study: dict) -> None:
    """PSNR against the number of labels (log scale), one line per protocol with the std over seeds as
    error bars; each RCL network as is (0 labels) as a dashed horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for protocol in study["protocols"]:
        entries = study["table"][protocol]
        counts = [int(c) for c in entries]
        label = "SL" if protocol == "sl" else f"RCL+SL [{method_title(protocol)}]"
        means = [entries[str(c)]["psnr"]["mean"] for c in counts]
        stds = [entries[str(c)]["psnr"]["std"] for c in counts]
        line = ax.errorbar(counts, means, yerr=stds, marker="o", capsize=3, label=label)
        if protocol in study["zero_labels"]:
            ax.axhline(
                study["zero_labels"][protocol]["psnr"]["mean"],
                linestyle="--",
                color=line[0].get_color(),
                linewidth=0.8,
                label=f"{method_title(protocol)} as is (0 labels)",
            )
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("denoising PSNR (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110)
    plt.close(fig)
