"""A run's report: its summary (results.json: the table rows, the pre-training diagnostics, the paired
comparisons and what each says, the label-efficiency study), results.md (tables.py), the residual-distance
density plot (Fig. 2), sample image grids (input / outputs / clean) and the label-efficiency plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, config_to_dict
from .config_checks import label_count
from .data import DENOISING_TASK, TASK_TITLES
from .evaluate import TestScores
from .files import atomic_path, write_json_atomically, write_text_atomically
from .intervals import paired_psnr
from .methods import SL_PROTOCOL, controls_of, method_title, protocol_title, spec_of
from .rows import flag_below_input, input_row, mean_std, method_rows, task_runs
from .tables import format_table


def _diagnostic_rows(config: TrainConfig, runs: list[dict]) -> list[dict]:
    """Per RCL method, the pre-training diagnostics averaged over seeds, and whether any seed's
    contrastive loss ended at chance."""
    rows = []
    for method in config.variant_keys():
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


def _label_runs(label_results: list[dict], protocol: str, count: int) -> list[dict]:
    """The label-study results of ``protocol`` ('sl' or an RCL variant key) with ``count`` labels."""
    return [r for r in label_results if r["protocol"] == protocol and r["labels"] == count]


def _zero_labels(config: TrainConfig, runs: list[dict], protocols: list[str]) -> dict:
    """Each RCL network of ``protocols`` (after 'sl') as pre-trained, at 0 labels: PSNR/SSIM mean and std over
    seeds on the denoising task."""
    zero = {}
    for protocol in protocols[1:]:
        task = DENOISING_TASK[config.modality]
        as_is = [r["as_is"][task] for r in runs if r["method"] == protocol and task in r.get("as_is", {})]
        if as_is:
            zero[protocol] = {
                "psnr": mean_std([a["psnr"] for a in as_is]),
                "ssim": mean_std([a["ssim"] for a in as_is]),
            }
    return zero


def _label_versus(
    label_results: list[dict], protocol: str, count: int, baseline_count: int, names: list[str]
) -> dict | None:
    """RCL+SL (``protocol``) with ``count`` labels against SL with ``baseline_count``: their paired_psnr and
    a sentence; None without a shared seed."""
    mine = {r["seed"]: r["psnr_per_image"] for r in _label_runs(label_results, protocol, count)}
    theirs = {r["seed"]: r["psnr_per_image"] for r in _label_runs(label_results, SL_PROTOCOL, baseline_count)}
    paired = paired_psnr(mine, theirs, names)
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


def label_efficiency(
    config: TrainConfig, runs: list[dict], label_results: list[dict], num_train: int, names: list[str]
) -> dict:
    """The label-efficiency study (Tables 3 and 5): per protocol ('sl' or an RCL variant key) and number of
    labels, PSNR/SSIM mean and std over seeds; the RCL networks as is at 0 labels; and per level, each
    RCL+SL against SL as a paired PSNR difference over the test images ``names``' photographs x seeds
    (paired_psnr; with Table 5's 30%-vs-all comparison when both levels were run)."""
    if not label_results:
        return {}
    protocols = list(dict.fromkeys(r["protocol"] for r in label_results))
    levels = sorted({r["labels"] for r in label_results})
    table = {
        protocol: {
            str(count): {
                "psnr": mean_std([r["psnr"] for r in _label_runs(label_results, protocol, count)]),
                "ssim": mean_std([r["ssim"] for r in _label_runs(label_results, protocol, count)]),
            }
            for count in levels
            if _label_runs(label_results, protocol, count)
        }
        for protocol in protocols
    }
    zero = _zero_labels(config, runs, protocols)
    comparisons = [_label_versus(label_results, p, count, count, names) for p in protocols[1:] for count in levels]
    if "30%" in config.labels and "all" in config.labels:  # Table 5: fine-tuning on 30% against SL on all
        comparisons += [
            _label_versus(label_results, p, label_count("30%", num_train), num_train, names) for p in protocols[1:]
        ]
    return {
        "levels": levels,
        "protocols": protocols,
        "table": table,
        "zero_labels": zero,
        "comparisons": [c for c in comparisons if c is not None],
    }


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
    inputs = input_row(config, naive)
    rows = flag_below_input([inputs, *method_rows(config, runs, "tasks")]) if config.finetune_steps > 0 else []
    as_is_rows = flag_below_input([inputs, *method_rows(config, runs, "as_is")])
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
        "contrast_verdicts": [contrast_verdict(row) for row in diagnostics if _is_rcl(row["method"])],
        "comparisons": comparisons,
        "as_is_comparisons": as_is_comparisons,
        "control_comparisons": (
            control_comparisons(rows, comparisons) if rows else control_comparisons(as_is_rows, as_is_comparisons)
        ),
        "label_efficiency": label_efficiency(config, runs, list(label_results), environment["num_train_images"], names),
        "label_runs": list(label_results),
        "runs": runs,
    }


def interval_text(paired: dict) -> str:
    """'95% CI [-0.40, +0.12] over 2 photographs x 3 seeds' (or over the one factor that varies, saying which;
    or 'no interval (one photograph, one seed)'), from photographs_seeds_interval."""
    photographs, seeds = paired["n_photographs"], paired["n_seeds"]
    if paired["df"] is None:
        return "no interval " + paired["basis"].removeprefix("none ")
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


def _per_image_psnr(runs: list[dict], key: str, method: str, task: str) -> dict[int, list[float]]:
    """{seed: per-image PSNR} of ``method``'s runs on ``task`` under ``key`` ("tasks" or "as_is")."""
    return {r["seed"]: r[key][task]["psnr_per_image"] for r in task_runs(runs, method, task, key)}


def compare(
    rows: list[dict], tasks: list[str], runs: list[dict], key: str, naive: dict[str, TestScores], names: list[str]
) -> list[dict]:
    """Per (RCL variant, baseline, task): the difference of the mean PSNR/SSIM, and the paired PSNR difference
    (paired_psnr, over the test images ``names``' photographs x the seeds both have) with its 95% t interval,
    and a sentence saying it, whichever way it goes."""
    by_method = {row["method"]: row for row in rows}
    comparisons = []
    for method, row in by_method.items():
        if not _is_rcl(method):
            continue
        for baseline in [m for m in by_method if not _is_rcl(m)]:
            for task in tasks:
                if task in row["tasks"] and task in by_method[baseline]["tasks"]:
                    mine = _per_image_psnr(runs, key, method, task)
                    theirs = (
                        {seed: naive[task].psnr for seed in mine}
                        if baseline == "input"
                        else _per_image_psnr(runs, key, baseline, task)
                    )
                    paired = paired_psnr(mine, theirs, names)
                    if paired is not None:
                        comparisons.append(_comparison(row, by_method[baseline], task, paired))
    return comparisons


def _comparison(row: dict, other: dict, task: str, paired: dict) -> dict:
    """compare()'s entry for ``row`` against ``other`` on ``task``, given their paired_psnr."""
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


def _is_rcl(key: str) -> bool:
    """Whether a row or variant key is an RCL variant (both terms; not a control, not the input row)."""
    spec = spec_of(key)
    return spec is not None and spec.is_rcl


# What an RCL row against each control asks: the term the control leaves out.
CONTROL_QUESTIONS = {"consistency": "contrastive", "contrast": "consistency"}


def control_comparisons(rows: list[dict], comparisons: list[dict]) -> list[dict]:
    """From compare()'s entries over ``rows``, each RCL row against its own controls (methods.controls_of) per task:
    does the term the control leaves out help? 'yes' (the paired interval above 0), 'no (it hurts)' (below 0)
    or 'could be noise', in a sentence."""
    titles = {row["method"]: row["title"] for row in rows}
    found = []
    for entry in comparisons:
        controls = controls_of(entry["method"])
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
        label = protocol_title(protocol)
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
