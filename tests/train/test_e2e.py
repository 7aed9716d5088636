"""End-to-end tests of the reference trainer on tiny generated images (seconds, not minutes)."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

from rcl_ops.train.cli import main
from rcl_ops.train.models import ResNet50Encoder
from train.helpers import TINY, make_sidd_folder, tiny_run


def read_table_rows(text: str, title: str = "Proxy evaluation") -> dict[str, list[str]]:
    """The rows of the first markdown table after the line starting with ``title``."""
    rows: dict[str, list[str]] = {}
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        if not line.startswith(("| Method", "| # Labels", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_tiny_end_to_end_and_resume(image_folder, tmp_path, capsys):
    args = [
        "--data-dir", str(image_folder), "--output-dir", str(tmp_path), "--run-name", "tiny",
        "--methods", "rcl", "n2n", "n2s", "oracle", "random", "--seeds", "0", "1", *TINY,
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = read_table_rows(out)
    assert set(rows) == {"Input (noisy, bicubic)", "RCL-EMD (g_e: random)", "N2N", "N2S", "Oracle", "Random init"}
    assert all(len(cells) == 4 for cells in rows.values())  # PSNR/SSIM for denoising and SR x2
    assert "Measured on this run:" in out
    assert re.search(r"paired PSNR difference [+-]\d+\.\d+ dB, 95% CI \[.*\] over 2 photographs x 2 seeds", out)
    run = tmp_path / "tiny"
    summary = json.loads((run / "results.json").read_text())
    assert len(summary["runs"]) == 12  # 6 pre-trainings (the Oracle: one per task) x 2 seeds
    for row in summary["rows"]:
        for task in ("denoise", "sr2"):
            assert math.isfinite(row["tasks"][task]["psnr"]["mean"])
            assert 0 < row["tasks"][task]["ssim"]["mean"] <= 1
    assert summary["environment"]["num_train_images"] == 6 and summary["environment"]["num_test_images"] == 2
    assert (run / "results.md").read_text().strip() in out
    for name in ("residual_distance_density.png", "samples_denoise.png", "samples_sr2.png"):
        assert (run / "figures" / name).stat().st_size > 1000
    for method in ("rcl-emd+random", "n2n", "n2s"):
        for name in ("pretrain_last", "pretrained", "finetuned_denoise", "finetuned_sr2"):
            assert (run / "checkpoints" / method / "seed1" / f"{name}.safetensors").exists()
    for task in ("denoise", "sr2"):  # the Oracle of each task: supervised pre-training on it, evaluated on it only
        names = {p.name for p in (run / "checkpoints" / f"sl-{task}" / "seed1").iterdir()}
        assert {"pretrained.safetensors", f"finetuned_{task}.safetensors"} <= names
        assert not {f"finetuned_{other}.safetensors" for other in ("denoise", "sr2") if other != task} & names
    with (run / "metrics.csv").open() as handle:
        logged = list(csv.DictReader(handle))
    assert {"contrast", "consistency", "n2n", "n2s", "l1", "loss"} <= {row["metric"] for row in logged}
    # issue 14: every RCL pre-training logs its diagnostics, and every network is also scored as is
    assert {"contrast_per_query", "contrast_chance", "retrieval_top1", "grad_norm_ratio"} <= {
        row["metric"] for row in logged if row["method"] == "rcl-emd+random"
    }
    assert {row["phase"] for row in logged} >= {"as-is", "proxy"}
    first = summary["comparisons"][0]
    assert first["seeds"] == [0, 1] and first["paired_psnr_per_image"]["n"] == 2
    assert (first["paired_psnr"]["n_photographs"], first["paired_psnr"]["n_seeds"]) == (2, 2)  # untiled images
    diagnostics = summary["diagnostics"][0]
    assert diagnostics["method"] == "rcl-emd+random" and diagnostics["contrast_chance_last"] == pytest.approx(
        math.log(3)
    )
    assert set(read_table_rows(out, "As pre-trained")) == set(rows)
    assert "RCL pre-training diagnostics" in out and "grad-norm ratio" in out
    assert "of an ideal denoiser (the true noise)" in out  # the check before pre-training

    # --resume reuses every finished (method, seed) and reproduces the same table
    assert main([*args, "--resume"]) == 0
    resumed_out = capsys.readouterr().out
    assert resumed_out.count("reused finished result") == 12
    assert read_table_rows(resumed_out) == rows

    # the same run name without --resume is refused, with a hint
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("raw_input", ["planes", "packed"])
def test_raw_dncnn_end_to_end(raw_input, image_folder, tmp_path, capsys):
    args = [
        "--data-dir", str(image_folder), "--output-dir", str(tmp_path), "--modality", "raw", "--model", "dncnn",
        "--depth", "3", "--methods", "rcl-bd", "n2n", "n2s", "--tasks", "denoise", "--seeds", "0", "--no-plots",
        "--raw-input", raw_input, *TINY[: TINY.index("--depth")], *TINY[TINY.index("--depth") + 2 :],
    ]  # fmt: skip
    assert main(args) == 0
    rows = read_table_rows(capsys.readouterr().out)
    assert set(rows) == {"Input (bilinear demosaic)", "RCL-BD", "N2N", "N2S"}


def test_too_few_images_for_the_batch(image_folder, tmp_path, capsys):
    args = ["--data-dir", str(image_folder), "--output-dir", str(tmp_path), "--batch-size", "7", "--crop-size", "16"]
    assert main(args) == 2
    assert "--batch-size 7 needs at least" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # failed before creating a run folder


@pytest.mark.slow
def test_tensorboard_logs_every_step_once_across_a_resume(image_folder, tmp_path, monkeypatch, capsys):
    import time

    from train.helpers import interrupt_pretraining_at, tensorboard_scalars

    args = [
        "--data-dir", str(image_folder), "--output-dir", str(tmp_path), "--run-name", "tb", "--methods", "n2n",
        "--tasks", "denoise", "--seeds", "0", "--no-plots", "--tensorboard", *TINY, "--pretrain-steps", "4",
        "--log-every", "1", "--checkpoint-every", "2",
    ]  # fmt: skip
    interrupt_pretraining_at(monkeypatch, 4)
    assert main(args) == 130  # steps 1-3 logged, the last checkpoint at step 2
    monkeypatch.undo()
    time.sleep(1.1)  # a resume is a later process: its event files sort after the first ones
    assert main([*args, "--resume"]) == 0
    scalars = tensorboard_scalars(tmp_path / "tb" / "tensorboard")
    assert [step for step, _ in scalars["n2n/seed0/pretrain/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in scalars["n2n/seed0/finetune-denoise/l1"]] == [1, 2, 3]
    assert sorted(p.parent.name for p in (tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*")) == [
        "as-is", "finetune-denoise", "pretrain", "pretrain", "proxy",
    ]  # fmt: skip


@pytest.mark.slow
def test_module_entry_point_help():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "rcl_ops.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    assert "usage: rcl-train" in done.stdout and "--preset" in done.stdout


# ---------------------------------------------------------------------------------------------
# what a run reports: networks as they are, the encoder weights, label efficiency, SIDD pairs


@pytest.mark.slow
def test_zero_finetune_steps_reports_the_networks_as_is(image_folder, tmp_path, capsys):
    args = tiny_run(image_folder, tmp_path, "as-is", "--finetune-steps", "0")
    args[args.index("n2n")] = "rcl-emd"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Proxy evaluation" not in out
    assert set(read_table_rows(out, "As pre-trained")) == {"Input (noisy)", "RCL-EMD (g_e: random)"}
    result = json.loads((tmp_path / "as-is" / "results" / "rcl-emd+random_seed0.json").read_text())
    assert result["tasks"] == {} and math.isfinite(result["as_is"]["denoise"]["psnr"])
    assert "at_chance" in result["pretrain"]["diagnostics"]
    assert main([*args, "--resume"]) == 0  # a finished as-is result is reused
    assert "reused finished result" in capsys.readouterr().out


@pytest.mark.slow
def test_results_record_the_encoder_weights(image_folder, tmp_path, capsys):
    import hashlib

    from safetensors.torch import save_file

    weights = tmp_path / "my_resnet50.safetensors"
    save_file(ResNet50Encoder(1, seed=7).state_dict(), str(weights))
    args = tiny_run(
        image_folder, tmp_path, "enc", "--encoders", "random", "self", "file", "--encoder-weights", str(weights),
        "--encoder-pretrain-steps", "2",
    )  # fmt: skip
    args[args.index("n2n")] = "rcl-bd"
    assert main(args) == 0
    out = capsys.readouterr().out
    titles = {"RCL-BD (g_e: random)", "RCL-BD (g_e: self-pre-trained)", "RCL-BD (g_e: weights file)"}
    assert titles <= set(read_table_rows(out))
    own = json.loads((tmp_path / "enc" / "results" / "rcl-bd+self_seed0.json").read_text())["encoder"]
    cached = tmp_path / "encoder_cache" / own["file"]
    assert own["file_sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest() and not own["reused_from_cache"]
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    result = json.loads((tmp_path / "enc" / "results" / "rcl-bd+file_seed0.json").read_text())
    assert result["encoder"]["file"] == "my_resnet50.safetensors" and result["encoder"]["file_sha256"] == digest
    summary = json.loads((tmp_path / "enc" / "results.json").read_text())
    assert summary["environment"]["encoders"]["random"]["seed"] == 0
    assert f"sha256 {digest[:16]}" in out


@pytest.mark.slow
def test_label_efficiency_study(image_folder, tmp_path, capsys):
    args = tiny_run(
        image_folder, tmp_path, "labels", "--labels", "2", "30%", "all", "--sl-steps", "2", "--seeds", "0", "1"
    )
    args[args.index("n2n")] = "rcl-bd"
    args[args.index("--no-plots")] = "--plots"
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = read_table_rows(out, "Label efficiency")
    assert list(rows) == ["0", "2", "6"]  # 30% of the 6 training images is 2: one level
    assert rows["0"][0] == "-" and rows["6"][0] != "-" and rows["6"][1] != "-"
    assert re.search(r"RCL\+SL \[RCL-BD \(g_e: random\)\] with 2 labels vs SL with 6: [+-]\d", out)  # Table 5
    run = tmp_path / "labels"
    study = json.loads((run / "results.json").read_text())["label_efficiency"]
    assert study["levels"] == [2, 6] and study["protocols"] == ["sl", "rcl-bd+random"]
    assert study["table"]["sl"]["2"]["psnr"]["n"] == 2  # both seeds
    assert (run / "results" / "labels" / "sl_n6_seed1.json").exists()
    assert (run / "figures" / "label_efficiency.png").stat().st_size > 1000
    assert main([*args, "--resume"]) == 0
    assert read_table_rows(capsys.readouterr().out, "Label efficiency") == rows


@pytest.mark.slow
def test_sidd_dncnn_thirty_percent_of_the_labels(tmp_path, capsys):
    root = make_sidd_folder(tmp_path / "sidd")
    args = [
        "--data-dir", str(root), "--data-format", "sidd", "--output-dir", str(tmp_path / "runs"), "--run-name", "s",
        "--model", "dncnn", "--depth", "3", "--methods", "rcl-emd", "--tasks", "denoise", "--labels", "30%", "all",
        "--sl-steps", "2", "--seeds", "0", "--no-plots", "--test-fraction", "0.34",
        "--ignore-contrast-check",  # the made-up "real" noise of the fixture is not what the check is about
        *TINY[: TINY.index("--depth")], *TINY[TINY.index("--depth") + 2 :],
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "real noisy/clean pairs (SIDD layout)" in out
    assert list(read_table_rows(out, "Label efficiency")) == ["0", "1", "4"]  # 30% of 4 training pairs, all
    assert re.search(r"with 1 labels vs SL with 4: [+-]\d", out)  # Table 5's comparison


# ---------------------------------------------------------------------------------------------
# issue 14: the contrastive term's diagnostics reach the results


@pytest.mark.slow
def test_rcl_run_results_hold_finite_diagnostics(image_folder, tmp_path, capsys):
    args = tiny_run(image_folder, tmp_path, "diag", "--log-every", "1")
    args[args.index("n2n")] = "rcl-emd"
    assert main(args) == 0
    assert "Did the contrastive term do anything?" in capsys.readouterr().out
    summary = json.loads((tmp_path / "diag" / "results.json").read_text())
    (row,) = summary["diagnostics"]
    for key in ("contrast_per_query_first", "contrast_per_query_end", "contrast_chance_last", "retrieval_top1_first",
                "retrieval_top1_end", "grad_norm_ratio_first", "grad_norm_ratio_last"):  # fmt: skip
        assert math.isfinite(row[key]), key
    assert row["contrast_chance_last"] == pytest.approx(math.log(3)) and row["n"] == 1
    (run,) = summary["runs"]
    diagnostics = run["pretrain"]["diagnostics"]
    assert diagnostics["logged_steps"] == 3 and isinstance(diagnostics["at_chance"], bool)
    assert all(math.isfinite(v) for k, v in diagnostics.items() if k != "at_chance")
    (verdict,) = summary["contrast_verdicts"]
    title = "RCL-EMD (g_e: random): "
    assert verdict.startswith(title) and verdict[len(title) :].startswith(("NO:", "HARDLY:", "A LITTLE:", "YES,"))
    results = (tmp_path / "diag" / "results.md").read_text()
    assert "Did the contrastive term do anything?" in results and verdict in results
