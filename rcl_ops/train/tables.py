"""results.md: the markdown of a run's summary (report.summarise): a header describing the run, the score
tables, the pre-training diagnostics, the label-efficiency table and the measured comparisons."""

from __future__ import annotations

import math
import statistics

from .data import DENOISING_TASK, TASK_TITLES
from .methods import DEFAULT_TEMPERATURES, METHODS, protocol_title


def mean_std_cell(stats: dict, digits: int) -> str:
    """'mean' or 'mean ± std' (more than one value) of a mean_std entry, to ``digits`` decimals."""
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


def _label_table(study: dict) -> list[str]:
    protocols = study["protocols"]
    header = ["# Labels"] + [protocol_title(p) + " PSNR / SSIM" for p in protocols]
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


def _run_lines(config: dict, env: dict) -> list[str]:
    """results.md's opening lines: the data, network, steps, seeds and device; the RCL conventions when an RCL
    method ran; each encoder g_e's source and digest."""
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
    if any(METHODS[m].is_rcl for m in config["methods"] if m in METHODS):
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
    return lines


def _diagnostics_lines(summary: dict, env: dict) -> list[str]:
    """The RCL pre-training diagnostics: their table, the check before pre-training and the verdicts."""
    lines = ["", "RCL pre-training diagnostics (mean over seeds; end = mean of the last quarter of logged steps):"]
    lines += ["", *_diagnostics_table(summary["diagnostics"])]
    lines += _contrast_check_lines(env.get("contrast_checks", {}))
    lines += ["", "Did the contrastive term do anything?"]
    lines += [f"- {verdict}" for verdict in summary["contrast_verdicts"]]
    return lines


def format_table(summary: dict) -> str:
    """The markdown results: a header describing the run, the proxy-evaluation table (rows: methods;
    columns: PSNR/SSIM per downstream task), the as-is ("0 labels") table, the pre-training diagnostics,
    and the measured comparisons."""
    config, env, tasks = summary["config"], summary["environment"], summary["tasks"]
    lines = _run_lines(config, env)
    if summary["rows"]:
        lines += ["", "Proxy evaluation (last layer re-initialised and fine-tuned with L1, rest frozen):", ""]
        lines += _score_table(summary["rows"], tasks)
    lines += ["", "As pre-trained, no layer replaced (0 labels):", ""]
    lines += _score_table(summary["as_is_rows"], tasks)
    if summary["diagnostics"]:
        lines += _diagnostics_lines(summary, env)
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
