"""``rcl-train experiment table1 ... table5``: every table's command end to end at tiny sizes, and the presets."""

from __future__ import annotations

import ast
import graphlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
from skimage import io

import rcl_ops.train
from rcl_ops.train.cli import main
from rcl_ops.train.config import PRESETS, build_config
from rcl_ops.train.experiments import PAPER_ROW_METHODS, PAPER_TABLES
from rcl_ops.train.presets import EXPERIMENTS

# The experiment's own settings, shrunk: one seed, a few steps, tiny networks and crops.
TINY = [
    "--crop-size", "16", "--width", "4", "--depth", "2", "--pretrain-steps", "2", "--finetune-steps", "2",
    "--batch-size", "3", "--finetune-batch-size", "4", "--eval-crop", "24", "--no-progress", "--seeds", "0",
    "--checkpoint-every", "2", "--density-batches", "1", "--grid-images", "1", "--sl-steps", "2", "--no-plots",
]  # fmt: skip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:36, 0:36] / 36
    for index in range(8):
        channels = [0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y)) for _ in "rgb"]
        io.imsave(folder / f"img{index}.png", (np.stack(channels, -1) * 255).astype(np.uint8), check_contrast=False)
    return folder


def our_cells(markdown: str) -> dict[str, list[str]]:
    """The rows of the comparison table (paper's row name -> its cells)."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in PAPER_ROW_METHODS:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("table", sorted(EXPERIMENTS))
def test_each_table_runs_end_to_end(table, image_folder, tmp_path, capsys):
    labels = ["--labels", "2", "all"] if table == "table3" else []
    args = ["experiment", table, "--data-dir", str(image_folder), "--output-dir", str(tmp_path), "--run-name", table]
    assert main([*args, *TINY, *labels]) == 0
    out = capsys.readouterr().out
    comparison = (tmp_path / table / "paper_comparison.md").read_text()
    assert comparison in out
    paper = PAPER_TABLES[table]
    assert comparison.startswith(f"# {paper['title']}")
    assert "The paper's numbers (as printed)" in comparison and "seed(s) [0], device cpu" in comparison
    first_row, first_values = next(iter(paper["rows"].items()))
    printed = next(v for v in first_values if v is not None)
    assert f"{printed[0]:.2f} / {printed[1]:.4f}" in comparison  # the paper's numbers, beside ours
    if table in ("table3", "table5"):
        ours = comparison.split("Ours (PSNR / SSIM")[1]
        for count in (2, 6):  # 2 labels (table5: 30% of 6) and all 6 training images, SL and RCL + SL
            assert re.search(rf"^\| {count} \| \d+\.\d+ / 0\.\d+ \| \d+\.\d+ / 0\.\d+ \|$", ours, re.M)
        if table == "table5":
            assert "STAND-IN" in comparison  # no SIDD data given: simulated noise, said so
        return
    rows = our_cells(comparison)
    assert set(rows) == set(paper["rows"])
    for name, cells in rows.items():
        ours = cells[len(paper["columns"]) :]
        assert len(ours) == len(paper["tasks"])
        for task, cell in zip(paper["tasks"], ours):
            if name.startswith("SL (") and cell == "-":  # an SL row's own task is the Oracle's cell
                assert PAPER_ROW_METHODS[name] == f"sl-{task}"
                continue
            psnr, ssim = (float(part) for part in cell.removesuffix(" (below input)").split(" / "))
            assert math.isfinite(psnr) and -1 <= ssim <= 1, (name, task, cell)
    assert "Our ranking by PSNR" in comparison and "Paper's ranking by PSNR" in comparison
    # our controls, which the paper does not have, on the same seeds
    assert "Consistency only (alpha 0)" in comparison and "Contrastive only (EMD) (control, ours only)" in comparison


def test_experiment_presets_are_valid_configurations():
    for name, scales in EXPERIMENTS.items():
        for scale in scales:
            preset = f"{name}-{scale}"
            assert preset in PRESETS
            extra = {"encoder_weights": "resnet50.pth"} if "file" in PRESETS[preset].get("encoders", []) else {}
            if PRESETS[preset].get("data_format") == "sidd":
                extra["data_dir"] = "sidd/"
            config = build_config(preset, **extra)
            assert config.tasks == PAPER_TABLES[name]["tasks"]
    # the quick scale is the quick preset's: one definition
    assert {k: v for k, v in PRESETS["quick"].items() if k not in ("methods", "tasks")} == {
        k: v for k, v in PRESETS["table1-quick"].items() if k not in ("methods", "tasks")
    }


def test_trainer_modules_import_without_a_cycle():
    """No import cycle among rcl_ops.train's modules, imports inside functions included (presets.py is data;
    an ``if TYPE_CHECKING:`` import is for annotations only and never runs)."""
    graph = {}
    for path in Path(rcl_ops.train.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for n in ast.walk(block)
        }
        nodes = [
            n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and id(n) not in typing_only
        ]
        graph[path.stem] = {n.module or a.name for n in nodes for a in n.names}
    graphlib.TopologicalSorter(graph).prepare()  # CycleError naming the cycle


def test_experiment_command_refuses_unknown_tables(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "table9"])
    assert "invalid choice: 'table9'" in capsys.readouterr().err


@pytest.mark.slow
def test_comparison_names_each_encoder_and_says_when_nothing_was_fine_tuned(image_folder, tmp_path, capsys):
    args = [
        "experiment", "table2", "--data-dir", str(image_folder), "--output-dir", str(tmp_path), "--run-name", "t",
        *TINY, "--methods", "n2n", "rcl-emd", "--encoders", "random", "self", "--encoder-pretrain-steps", "1",
        "--finetune-steps", "0",
    ]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    comparison = (tmp_path / "t" / "paper_comparison.md").read_text()
    assert "ours, as pre-trained (no fine-tuning): SR x2 PSNR / SSIM" in comparison
    rows = [line for line in comparison.splitlines() if line.startswith("| RCL-EMD")]
    assert len(rows) == 2 and "g_e: random" in rows[0] and "g_e: self-pre-trained" in rows[1]
    assert all(re.search(r"\| \d+\.\d+ / -?0\.\d+ \|", row) for row in rows)
    assert "Our ranking by PSNR (ours, as pre-trained (no fine-tuning)), SR x2:" in comparison
