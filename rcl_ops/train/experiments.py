"""One command per table of the paper: ``rcl-train experiment table1 ... table5 [--scale quick|full]``.

Each experiment is a preset (``table1-quick``, ``table1-full``, ...; also usable as ``--preset``; in
presets.py) and the paper's numbers for that table (here). After the run, ``paper_comparison.md`` in the run
folder shows the paper's table (marked as the paper's: its data, network and device) beside ours (marked with
our scale, seeds and device), and the two rankings by PSNR. The quick settings run on a CPU in minutes on the
bundled sample images; they are far smaller than the paper's (a few hundred steps on tiles of seven photographs),
so they test the pipeline and show what happens at that scale, not whether the paper's claims hold.
"""

from __future__ import annotations

from .data import TASK_TITLES
from .methods import SL_PROTOCOL, spec_of
from .presets import RCL_CONTROLS, TABLE_TASKS
from .tables import mean_std_cell

# ---------------------------------------------------------------------------------------------
# The paper's numbers ("Residual Contrastive Learning: Unsupervised Representation Learning on Noisy
# Images", under review at ICLR 2022; Tables 1-5), as printed: PSNR (dB) and SSIM, mean of five trials,
# U-Net (DnCNN in Table 5), ImageNet ResNet-50 g_e, batch 64, crops 128, on a V100.

PAPER_SETTING = "U-Net, ImageNet ResNet-50 g_e, batch 64, crops 128, mean of 5 trials, on a V100"

PAPER_TABLES: dict[str, dict] = {
    "table1": {
        "title": "Table 1: proxy evaluation with denoising as the downstream task",
        "columns": ["MIT", "Stanford", "VOC"],
        "rows": {
            "MoCo": [(12.87, 0.0498), (16.01, 0.1505), (14.21, 0.1044)],
            "VADeR": [(14.63, 0.1088), (17.54, 0.1601), (16.33, 0.1573)],
            "PixContrast": [(14.77, 0.1101), (17.61, 0.1610), (16.42, 0.1585)],
            "N2N": [(28.66, 0.8614), (34.14, 0.8699), (30.91, 0.8272)],
            "N2S": [(28.16, 0.8373), (34.04, 0.8640), (30.71, 0.8256)],
            "RCL-BD": [(28.83, 0.8871), (34.75, 0.8618), (31.29, 0.8274)],
            "RCL-EMD": [(29.54, 0.8908), (35.43, 0.8783), (31.39, 0.8330)],
            "RCL-MMD": [(28.68, 0.8864), (34.87, 0.8687), (31.53, 0.8316)],
            "Oracle": [(31.26, 0.9187), (38.25, 0.9422), (33.65, 0.9038)],
        },
        "tasks": TABLE_TASKS["table1"],
        "notes": [
            "MoCo: our MoCo v2-style ResNet-FCN (only its decoder fine-tuned); VADeR and PixContrast: both against "
            "our one pixel-level contrastive U-Net (pixcl). Re-implementations in their essentials, not the "
            "originals (rcl_ops/train/baselines.py). The paper's three datasets are one bundled set here."
        ],
    },
    "table2": {
        "title": "Table 2: proxy evaluation with SR and JDenSR as the downstream tasks (Stanford)",
        "columns": ["SR", "JDenSR"],
        "rows": {
            "N2N": [(31.61, 0.8730), (27.90, 0.7860)],
            "N2S": [(31.11, 0.8699), (27.80, 0.7831)],
            "SL (Den)": [(34.18, 0.9118), (32.89, 0.8353)],
            "RCL-BD": [(38.89, 0.9654), (32.10, 0.8046)],
            "RCL-EMD": [(39.01, 0.9658), (32.63, 0.8214)],
            "RCL-MMD": [(38.31, 0.9634), (31.95, 0.8068)],
            "Oracle": [(38.93, 0.9603), (35.98, 0.9175)],
        },
        "tasks": TABLE_TASKS["table2"],
        "notes": [
            "SL (Den): supervised pre-training on denoising, then the proxy evaluation on each task; Oracle: "
            "supervised pre-training on the task itself. The paper's SR is Stanford's 512 -> 1024 pairs; ours is "
            "x2 bicubic downsampling of the clean images."
        ],
    },
    "table3": {
        "title": "Table 3: SL against RCL pre-training + SL fine-tuning, denoising on VOC, by number of labels",
        "columns": ["SL", "RCL + SL"],
        "rows": {
            "0": [None, (22.62, 0.7989)],
            "10": [(20.74, 0.7299), (28.20, 0.8834)],
            "100": [(27.19, 0.8734), (30.24, 0.9028)],
            "1000": [(31.31, 0.9184), (32.09, 0.9280)],
            "10000": [(33.41, 0.9437), (33.85, 0.9514)],
        },
        "tasks": TABLE_TASKS["table3"],
        "notes": ["Our label counts differ from the paper's where the data is smaller (quick: 200 training tiles)."],
    },
    "table4": {
        "title": "Table 4: proxy evaluation with JDD, JDemSR and JDDSR as the downstream tasks (Stanford, RAW)",
        "columns": ["JDD", "JDemSR", "JDDSR"],
        "rows": {
            "SL (JDD)": [None, (32.55, 0.8727), (30.70, 0.8323)],
            "M2M": [(26.62, 0.7463), (27.21, 0.8219), (26.07, 0.7292)],
            "RCL": [(27.37, 0.7514), (28.00, 0.8160), (26.87, 0.7331)],
            "Oracle": [(33.60, 0.8979), (36.63, 0.9431), (31.56, 0.8490)],
        },
        "tasks": TABLE_TASKS["table4"],
        "notes": [
            "RCL is RCL-EMD; M2M: mosaic2mosaic on simulated bursts (pairs of noisy mosaics under known sensor "
            "shifts); SL (JDD): supervised pre-training on JDD, its JDD cell is the Oracle's."
        ],
    },
    "table5": {
        "title": "Table 5: label-efficient learning on real noisy data (SIDD, DnCNN): SL on all labels against "
        "RCL pre-training + SL on 30% of them",
        "columns": ["SL (all labels)", "RCL + SL (30% of the labels)"],
        "rows": {"SIDD": [(37.21, 0.936), (37.64, 0.944)]},
        "tasks": TABLE_TASKS["table5"],
        "setting": "DnCNN, ImageNet ResNet-50 g_e, batch 64, crops 128, SIDD sRGB 80/20 split",
    },
}

# Our method (variant key without its encoder) standing for each of the paper's rows.
PAPER_ROW_METHODS = {
    "MoCo": "moco",
    "VADeR": "pixcl",
    "PixContrast": "pixcl",
    "N2N": "n2n",
    "N2S": "n2s",
    "RCL-BD": "rcl-bd",
    "RCL-EMD": "rcl-emd",
    "RCL-MMD": "rcl-mmd",
    "RCL": "rcl-emd",
    "Oracle": "oracle",
    "SL (Den)": "sl-denoise",
    "SL (JDD)": "sl-jdd",
    "M2M": "m2m",
}


def _method_name(row: dict) -> str | None:
    """The registry name of a table row's method (None for the input row)."""
    spec = spec_of(row["method"])
    return None if spec is None else spec.name


def _pair(scores: dict | None) -> str:
    """'PSNR / SSIM' (mean ± std) of a row's task entry, '-' when missing."""
    return "-" if scores is None else f"{mean_std_cell(scores['psnr'], 2)} / {mean_std_cell(scores['ssim'], 4)}"


def _paper_cell(value: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value[0]:.2f} / {value[1]:.4f}"


def _our_scale(summary: dict) -> str:
    config, env = summary["config"], summary["environment"]
    bundled = "colour photographs" if config.get("bundled_images") == "rgb" else "sample photographs"
    data = config["data_dir"] or f"the bundled scikit-image {bundled}"
    tile = config.get("tile_size")
    tiles = f" cut into {tile}x{tile} tiles (smaller images whole)" if tile else ""
    noise = "real noisy pairs" if config.get("data_format") == "sidd" else "simulated noise"
    return (
        f"ours: {data}{tiles}, {noise}, {env['num_train_images']} train / {env['num_test_images']} test images, "
        f"{config['modality'].upper()}, {config['model']} (width {config['width'] or 'default'}, depth "
        f"{config['depth'] or 'default'}), batch {config['batch_size']}, crops {config['crop_size']}, "
        f"{config['pretrain_steps']} pre-training + {config['finetune_steps']} fine-tuning steps, "
        f"mean ± std over {len(config['seeds'])} seed(s) {config['seeds']}, device {env['device']}, "
        f"{env['wall_seconds'] / 60:.1f} min"
    )


def _ranking(pairs: list[tuple[str, float]]) -> str:
    return " > ".join(name for name, _ in sorted(pairs, key=lambda pair: -pair[1]))


def _proxy_comparison(table: dict, summary: dict) -> list[str]:
    tasks = summary["tasks"]
    proxy = bool(summary["rows"])  # False with --finetune-steps 0: only the networks as pre-trained
    ours_label = "ours" if proxy else "ours, as pre-trained (no fine-tuning)"
    our_rows = summary["rows"] if proxy else summary["as_is_rows"]
    header = ["Method (paper's row)"] + [f"paper: {c} PSNR / SSIM" for c in table["columns"]]
    header += [f"{ours_label}: {TASK_TITLES[t]} PSNR / SSIM" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ours_ranking: dict[str, list[tuple[str, float]]] = {t: [] for t in tasks}
    paper_ranking: dict[str, list[tuple[str, float]]] = {c: [] for c in table["columns"]}
    for name, values in table["rows"].items():
        for column, value in zip(table["columns"], values):
            if value is not None:
                paper_ranking[column].append((name, value[0]))
        # one line per run of ours that stands for the paper's row (an RCL method runs once per encoder)
        mine = [row for row in our_rows if _method_name(row) == PAPER_ROW_METHODS[name]] or [None]
        for row in mine:
            label = name if row is None or len(mine) == 1 else f"{name} [{row['title']}]"
            scores = [(row or {}).get("tasks", {}).get(t) for t in tasks]
            below = (row or {}).get("below_input", [])
            ours = [_pair(score) + (" (below input)" if t in below else "") for t, score in zip(tasks, scores)]
            lines.append("| " + " | ".join([label, *map(_paper_cell, values), *ours]) + " |")
            if name == "PixContrast":  # one method of ours stands for VADeR and PixContrast: ranked once
                continue
            ranked = label.replace("VADeR", "VADeR/PixContrast")
            for task, score in zip(tasks, scores):
                if score is not None:
                    ours_ranking[task].append((ranked, score["psnr"]["mean"]))
    for row in our_rows:  # our controls, which the paper does not have
        if _method_name(row) in RCL_CONTROLS:
            cells = [f"{row['title']} (control, ours only)"] + ["-"] * len(table["columns"])
            lines.append("| " + " | ".join(cells + [_pair(row["tasks"].get(t)) for t in tasks]) + " |")
    inputs = next((row for row in our_rows if row["method"] == "input"), None)
    if inputs is not None:
        cells = ["(no network: the task input)"] + ["-"] * len(table["columns"])
        cells += [_pair(inputs["tasks"].get(t)) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if any(row.get("below_input") for row in our_rows):
        lines += ["Our cells marked (below input) score below the task input itself: there, the row ranks nothing.", ""]
    for column, pairs in paper_ranking.items():
        lines.append(f"- Paper's ranking by PSNR, {column}: {_ranking(pairs)}")
    for task, pairs in ours_ranking.items():
        if pairs:
            lines.append(f"- Our ranking by PSNR ({ours_label}), {TASK_TITLES[task]}: {_ranking(pairs)}")
    return lines


def _label_comparison(table: dict, summary: dict, name: str) -> list[str]:
    study = summary.get("label_efficiency") or {}
    lines = ["Paper:", "", "| | " + " | ".join(table["columns"]) + " |", "|---|" + "---|" * len(table["columns"])]
    for label, values in table["rows"].items():
        lines.append(f"| {label} | " + " | ".join(_paper_cell(v) for v in values) + " |")
    lines += ["", "Ours (PSNR / SSIM, mean ± std over seeds; RCL+SL fine-tunes every layer of the RCL network):", ""]
    if not study:
        return [*lines, "(no label-efficiency results in this run)"]
    rcl = next((p for p in study["protocols"] if p != SL_PROTOCOL), None)
    lines += ["| # labels | SL | RCL + SL |", "|---|---|---|"]
    zero = study["zero_labels"].get(rcl)
    lines.append(f"| 0 | - | {_pair(zero)} |")
    for count in study["levels"]:
        cells = [_pair(study["table"].get(protocol, {}).get(str(count))) for protocol in (SL_PROTOCOL, rcl)]
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {c['sentence']}" for c in study.get("comparisons", [])]
    return lines


def comparison_markdown(name: str, scale: str, summary: dict) -> str:
    """The paper's table ``name`` beside this run's numbers (markdown)."""
    table = PAPER_TABLES[name]
    setting = table.get("setting", PAPER_SETTING)
    lines = [f"# {table['title']}", "", f"- The paper's numbers (as printed): {setting}.", f"- {_our_scale(summary)}."]
    if summary["config"].get("data_format") != "sidd" and name == "table5":
        lines.append(
            "- STAND-IN: no real noisy data was given (--data-dir with SIDD-layout pairs), so this run uses "
            "simulated noise on the bundled images: it tests the protocol, not the paper's claim on SIDD."
        )
    if scale == "quick":
        lines.append(
            "- Quick scale: a smoke-level CPU setting, orders of magnitude smaller than the paper's; differences "
            "between methods here are not evidence for or against the paper (see results.md for paired intervals)."
        )
    lines += [f"- {note}" for note in table.get("notes", [])]
    lines.append("")
    if name in ("table3", "table5"):
        lines += _label_comparison(table, summary, name)
    else:
        lines += _proxy_comparison(table, summary)
    verdicts = summary.get("contrast_verdicts") or []
    if verdicts:
        lines += ["", "Did the contrastive term do anything (from results.md)?"] + [f"- {v}" for v in verdicts]
    return "\n".join(lines) + "\n"
