"""End-to-end tests of the reference trainer on tiny generated images (seconds, not minutes)."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from skimage import io

from rcl_ops.train.cli import main
from rcl_ops.train.config import build_config
from rcl_ops.train.data import DENOISING_TASK, CropSampler, make_records, task_input
from rcl_ops.train.images import CleanImage, load_embedded_images
from rcl_ops.train.losses import supervised_task
from rcl_ops.train.models import ResNet50Encoder, build_model
from rcl_ops.train.trainer import (
    RunError,
    load_checkpoint,
    make_objective,
    pretrain,
    save_checkpoint,
    seeded_generator,
)


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random smooth RGB uint8 image (a few sinusoids), so denoising has something to recover."""
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [
        0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.uniform()))
        for _ in range(3)
    ]
    return (np.stack(channels, axis=-1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(8):
        io.imsave(folder / f"img{index}.png", smooth_image(rng, 36), check_contrast=False)
    return folder


TINY = [
    "--crop-size", "16", "--width", "4", "--depth", "1", "--pretrain-steps", "3", "--finetune-steps", "3",
    "--batch-size", "3", "--finetune-batch-size", "4", "--eval-crop", "24", "--no-progress",
    "--checkpoint-every", "2", "--density-batches", "1", "--grid-images", "2",
]  # fmt: skip


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


def tiny_records(num_images: int = 4, size: int = 24):
    generator = torch.Generator().manual_seed(0)
    images = [CleanImage(f"im{i}", torch.rand(3, size, size, generator=generator)) for i in range(num_images)]
    return make_records(images, "rgb", 0, 20, 0, second_draw=True)


def fresh_pretraining(records, seed: int = 0):
    """A freshly initialised network and crop sampler, as a new process would build them."""
    torch.manual_seed(seed)
    return build_model("unet", 4, 1), CropSampler(records, 12, seeded_generator(seed, "pretrain"), raw=False)


def run_pretraining(model, sampler, config, checkpoint_dir, resume, say=print) -> dict:
    objective = make_objective("n2n", config, None)
    return pretrain(model, objective, sampler, config, torch.device("cpu"), checkpoint_dir,
                    lambda *_: None, lambda it, **_: it, resume, say)  # fmt: skip


def test_pretraining_resumes_exactly(tmp_path):
    config = build_config(crop_size=12, batch_size=3, pretrain_steps=4, checkpoint_every=2, log_every=1)
    records = tiny_records()
    encoder = ResNet50Encoder(1, seed=0)
    objective = make_objective("rcl-emd", config, encoder)

    model, sampler = fresh_pretraining(records)
    pretrain(model, objective, sampler, config, torch.device("cpu"), tmp_path / "a",
             lambda *_: None, lambda it, **_: it, resume=False)  # fmt: skip

    interrupted = build_config(crop_size=12, batch_size=3, pretrain_steps=2, checkpoint_every=2)
    model_b, sampler_b = fresh_pretraining(records)
    pretrain(model_b, objective, sampler_b, interrupted, torch.device("cpu"), tmp_path / "b",
             lambda *_: None, lambda it, **_: it, resume=False)  # fmt: skip
    model_c, sampler_c = fresh_pretraining(records)  # a new process: state from the checkpoint
    summary = pretrain(model_c, objective, sampler_c, config, torch.device("cpu"), tmp_path / "b",
                       lambda *_: None, lambda it, **_: it, resume=True)  # fmt: skip
    assert summary["resumed_from"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(model_c.state_dict()[key], value), key


@pytest.mark.parametrize("method", ["moco", "pixcl"])
def test_stateful_objectives_resume_exactly(method, tmp_path):
    """MoCo and the pixel contrast keep momentum encoders, projection heads and queues: a resumed run
    restores them from the checkpoint and ends bit-identical to an uninterrupted one."""
    from rcl_ops.train.baselines import ResNetFCN

    config = build_config(crop_size=12, batch_size=3, pretrain_steps=4, checkpoint_every=2, methods=[method])
    interrupted = build_config(crop_size=12, batch_size=3, pretrain_steps=2, checkpoint_every=2, methods=[method])
    records = tiny_records()

    def fresh():  # a new process: a new network, sampler and objective
        model, sampler = fresh_pretraining(records)
        if method == "moco":
            torch.manual_seed(1)
            model = ResNetFCN(4, 2)
        return model, sampler, make_objective(method, config, None)

    def run(config, folder, resume, parts):
        model, sampler, objective = parts
        summary = pretrain(model, objective, sampler, config, torch.device("cpu"), tmp_path / folder,
                           lambda *_: None, lambda it, **_: it, resume=resume)  # fmt: skip
        return model, objective, summary

    whole, whole_objective, _ = run(config, "a", False, fresh())
    run(interrupted, "b", False, fresh())
    resumed, resumed_objective, summary = run(config, "b", True, fresh())
    assert summary["resumed_from"] == 2
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for key, value in whole_objective.state_dict().items():
        assert torch.equal(resumed_objective.state_dict()[key], value), key


def test_pretraining_falls_back_to_the_previous_checkpoint(tmp_path):
    config = build_config(crop_size=12, batch_size=3, pretrain_steps=4, checkpoint_every=1)
    records = tiny_records()
    model, sampler = fresh_pretraining(records)
    run_pretraining(model, sampler, config, tmp_path / "whole", resume=False)

    interrupted = build_config(crop_size=12, batch_size=3, pretrain_steps=3, checkpoint_every=1)
    run_pretraining(*fresh_pretraining(records), interrupted, tmp_path / "killed", resume=False)
    last = tmp_path / "killed" / "pretrain_last.safetensors"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a kill during a non-atomic write
    notes = []
    model_c, sampler_c = fresh_pretraining(records)
    summary = run_pretraining(model_c, sampler_c, config, tmp_path / "killed", resume=True, say=notes.append)
    assert summary["resumed_from"] == 2
    assert "pretrain_last.safetensors is damaged" in notes[0] and "pretrain_previous" in notes[0]
    assert (tmp_path / "killed" / "pretrain_last.damaged").exists()
    for key, value in model.state_dict().items():
        assert torch.equal(model_c.state_dict()[key], value), key

    # no readable checkpoint left: an error naming both files, not a silent restart
    for name in ("pretrain_last.safetensors", "pretrain_previous.safetensors"):
        (tmp_path / "killed" / name).write_bytes(b"\0" * 5)
    with pytest.raises(RunError, match="pretrain_last.safetensors is damaged.*pretrain_previous.safetensors"):
        run_pretraining(*fresh_pretraining(records), config, tmp_path / "killed", resume=True)


def test_checkpoint_round_trip(tmp_path):
    model = build_model("dncnn", 4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    save_checkpoint(tmp_path / "c.safetensors", model, optimizer, generator, {"step": 17})
    expected = torch.rand(3, generator=generator)
    other = build_model("dncnn", 4, 3)
    other_optimizer = torch.optim.Adam(other.parameters())
    other_generator = torch.Generator()
    meta = load_checkpoint(tmp_path / "c.safetensors", other, other_optimizer, other_generator)
    assert meta["step"] == 17
    assert torch.equal(torch.rand(3, generator=other_generator), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    assert (
        other_optimizer.state_dict()["state"][0]["exp_avg"].shape == optimizer.state_dict()["state"][0]["exp_avg"].shape
    )


@pytest.mark.parametrize("method", ["rcl-mmd", "rcl-bd", "rcl-emd", "n2n", "n2s", "sl", "m2m"])
@pytest.mark.parametrize("modality", ["rgb", "raw"])
def test_objectives_give_finite_gradients(method, modality):
    # MMD runs on the O(M^2) reference backend when no native backend is built: tiny crops
    if method == "m2m" and modality == "rgb":
        pytest.skip("mosaic2mosaic is a RAW method")
    task = DENOISING_TASK[modality]
    method = f"sl-{task}" if method == "sl" else method
    config = build_config(crop_size=8, batch_size=3, modality=modality, tasks=[task])
    raw = modality == "raw"
    images = [CleanImage(f"im{i}", torch.rand(3, 12, 12)) for i in range(3)]
    records = make_records(images, modality, 0, 20, 0, second_draw=True, burst=method == "m2m")
    for record in records:
        record.task_inputs = {task: task_input(task, record, modality)}
    model = build_model("unet", 4, 1, raw=raw)
    objective = make_objective(method, config, None if raw else ResNet50Encoder(1))
    sampler = CropSampler(
        records, 8, torch.Generator().manual_seed(0), raw=raw, task=supervised_task(method), burst=method == "m2m"
    )
    loss, parts = objective(model, sampler.sample(3), sampler.generator)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(float(v)) for v in parts.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_embedded_images_load_offline():
    images = load_embedded_images(("camera", "astronaut"))
    assert [img.pixels.shape for img in images] == [(3, 512, 512), (3, 512, 512)]
    assert torch.equal(images[0].pixels[0], images[0].pixels[1])  # grey replicated to RGB


def test_too_few_images_for_the_batch(image_folder, tmp_path, capsys):
    args = ["--data-dir", str(image_folder), "--output-dir", str(tmp_path), "--batch-size", "7", "--crop-size", "16"]
    assert main(args) == 2
    assert "--batch-size 7 needs at least" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # failed before creating a run folder


def test_tensorboard_logs(image_folder, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    args = [
        "--data-dir", str(image_folder), "--output-dir", str(tmp_path), "--run-name", "tb", "--methods", "n2n",
        "--tasks", "denoise", "--seeds", "0", "--no-plots", "--tensorboard", *TINY,
    ]  # fmt: skip
    assert main(args) == 0
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_module_entry_point_help():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "rcl_ops.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    assert "usage: rcl-train" in done.stdout and "--preset" in done.stdout


# ---------------------------------------------------------------------------------------------
# robustness: refused runs leave nothing, damaged runs resume or name the damaged file


def tiny_run(image_folder, output, name: str, *extra: str) -> list[str]:
    """Arguments of a one-method, one-seed, one-task tiny run."""
    return [
        "--data-dir", str(image_folder), "--output-dir", str(output), "--run-name", name, "--methods", "n2n",
        "--tasks", "denoise", "--seeds", "0", "--no-plots", *TINY, *extra,
    ]  # fmt: skip


def metric_rows(run_dir) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_no_duplicate_rows(run_dir) -> None:
    keys = [(r["method"], r["seed"], r["phase"], r["step"], r["metric"]) for r in metric_rows(run_dir)]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert all(None not in row.values() for row in metric_rows(run_dir))  # no torn rows


def test_runs_the_machine_cannot_do_leave_no_run_folder(image_folder, tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a state dict")
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--device", "cpu", "--distance-backend", "cuda", "--methods", "rcl"], "--distance-backend: backend 'cuda'"),
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--threads", "100000"], "--threads 100000 exceeds"),
        (
            ["--encoder-weights", str(tmp_path / "notes.pth"), "--encoders", "file", "--methods", "rcl"],
            "--encoder-weights: cannot read",
        ),
        (["--encoder-weights", str(tmp_path), "--encoders", "file", "--methods", "rcl"], "is not a file"),
        (["--width", "64", "--depth", "10"], r"needs about [\d,]+ GiB.*padded to 1024x1024.*lower --width or --depth"),
        (
            ["--lr", "1e12", "--pretrain-steps", "3"],
            r"pre-training loss became (nan|inf).*try a lower --lr\. The run folder",
        ),
    ]
    output = tmp_path / "runs"
    for extra, message in cases:
        assert main(tiny_run(image_folder, output, "r", *extra)) == 2, extra
        error = capsys.readouterr().err
        assert re.search(message, error), (extra, error)
        assert "Traceback" not in error
        if "--lr" not in extra:  # a run that diverges keeps what it did; the others never started
            assert not (output / "r").exists(), extra
    assert main(tiny_run(image_folder, tmp_path / "a_file", "r")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(tiny_run(image_folder, output, "fine")) == 0  # and a good run still goes through


def test_too_small_test_image_advice(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, sizes in (("train", [36, 36, 36, 36]), ("test", [36, 6])):
        (tmp_path / "data" / split).mkdir(parents=True)
        for index, size in enumerate(sizes):
            io.imsave(tmp_path / "data" / split / f"{index}.png", smooth_image(rng, size), check_contrast=False)
    assert main(tiny_run(tmp_path / "data", tmp_path / "runs", "r")) == 2
    error = capsys.readouterr().err
    assert "test/1.png (6x6)" in error and "minimum size of a test image" in error
    assert "--crop-size" not in error and "remove them from the test images" in error
    assert not (tmp_path / "runs").exists()


def test_resume_after_a_kill_during_a_checkpoint_write(image_folder, tmp_path, monkeypatch, capsys):
    from rcl_ops.train import trainer

    steps = ["--pretrain-steps", "4", "--checkpoint-every", "1", "--log-every", "1"]
    assert main(tiny_run(image_folder, tmp_path, "whole", *steps)) == 0
    real_save = trainer.save_checkpoint

    def killed_while_saving_step_4(path, model, optimizer=None, generator=None, metadata=None, extra=None):
        real_save(path, model, optimizer, generator, metadata, extra)
        if (metadata or {}).get("step") == 4:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # what a non-atomic write leaves
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", killed_while_saving_step_4)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_run(image_folder, tmp_path, "killed", *steps))
    monkeypatch.undo()
    with (tmp_path / "killed" / "metrics.csv").open("a") as handle:
        handle.write("1700000000.000,n2n,0,pretr")  # a row torn by the kill
    capsys.readouterr()

    assert main(tiny_run(image_folder, tmp_path, "killed", *steps, "--resume")) == 0
    out = capsys.readouterr().out
    assert "pretrain_last.safetensors is damaged" in out and "resuming from pretrain_previous.safetensors" in out
    whole, killed = (json.loads((tmp_path / n / "results" / "n2n_seed0.json").read_text()) for n in ("whole", "killed"))
    assert killed["pretrain"]["resumed_from"] == 3
    assert killed["tasks"]["denoise"]["psnr"] == whole["tasks"]["denoise"]["psnr"]  # bit-identical
    assert_no_duplicate_rows(tmp_path / "killed")
    pretrain_steps = [int(r["step"]) for r in metric_rows(tmp_path / "killed") if r["metric"] == "loss"]
    assert pretrain_steps == [1, 2, 3, 4]


def test_damaged_run_files_are_named_on_resume(image_folder, tmp_path, capsys):
    args = tiny_run(image_folder, tmp_path, "r")
    assert main(args) == 0
    run = tmp_path / "r"
    result_path, samples_path = (
        run / "results" / "n2n_seed0.json",
        run / "checkpoints" / "n2n" / "seed0" / "samples.npz",
    )
    finished = json.loads(result_path.read_text())
    for damaged in (result_path, samples_path):
        damaged.write_bytes(damaged.read_bytes()[:40])
        capsys.readouterr()
        assert main([*args, "--resume"]) == 0
        out = capsys.readouterr().out
        assert f"{damaged} is damaged" in out and "computing this result again" in out
        scores = json.loads(result_path.read_text())["tasks"]["denoise"]
        assert (scores["psnr"], scores["ssim"]) == (
            finished["tasks"]["denoise"]["psnr"],
            finished["tasks"]["denoise"]["ssim"],
        )
    assert_no_duplicate_rows(run)

    (run / "config.json").write_text('{"crop_size": 1')
    assert main([*args, "--resume"]) == 2
    assert f"{run / 'config.json'} is damaged" in capsys.readouterr().err


def test_resume_keeps_the_thread_count(image_folder, tmp_path, capsys):
    assert main(tiny_run(image_folder, tmp_path, "default")) == 0
    recorded = json.loads((tmp_path / "default" / "config.json").read_text())["threads"]
    assert recorded == torch.get_num_threads()  # torch's choice, recorded
    assert main(tiny_run(image_folder, tmp_path, "one", "--threads", "1")) == 0
    assert main(tiny_run(image_folder, tmp_path, "one", "--resume")) == 0  # the recorded count is used
    capsys.readouterr()
    assert main(tiny_run(image_folder, tmp_path, "one", "--threads", "2", "--resume")) == 2
    error = capsys.readouterr().err
    assert "--threads 1 -> 2" in error and "summation order" in error


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


def make_sidd_folder(root, scenes: int = 6, size: int = 36):
    """A tiny folder in the SIDD layout: Data/<scene>/<id>_NOISY_SRGB_010.PNG next to <id>_GT_SRGB_010.PNG."""
    rng = np.random.default_rng(1)
    for index in range(scenes):
        scene = root / "Data" / f"{index + 1:04d}_001_S6_00100_00060_3200_L"
        scene.mkdir(parents=True)
        clean = smooth_image(rng, size)
        noisy = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
        io.imsave(scene / f"{index + 1:04d}_GT_SRGB_010.PNG", clean, check_contrast=False)
        io.imsave(scene / f"{index + 1:04d}_NOISY_SRGB_010.PNG", noisy, check_contrast=False)
    return root


def test_sidd_loader_reads_a_tiny_folder(tmp_path):
    from rcl_ops.train.images import DataError, load_sidd_pairs

    root = make_sidd_folder(tmp_path / "sidd", scenes=3)
    pairs = load_sidd_pairs(root)
    assert len(pairs) == 3 and all(p.noisy is not None for p in pairs)
    first = root / "Data" / "0001_001_S6_00100_00060_3200_L"
    assert torch.equal(
        pairs[0].pixels, torch.from_numpy(io.imread(first / "0001_GT_SRGB_010.PNG") / 255).permute(2, 0, 1).float()
    )
    assert torch.equal(
        pairs[0].noisy, torch.from_numpy(io.imread(first / "0001_NOISY_SRGB_010.PNG") / 255).permute(2, 0, 1).float()
    )
    records = make_records(pairs, "rgb", 0, 20, 0, second_draw=True)
    assert torch.equal(records[0].observed, pairs[0].noisy) and records[0].observed_second is None
    (first / "0001_GT_SRGB_010.PNG").unlink()
    with pytest.raises(DataError, match="has no ground truth 0001_GT_SRGB_010.PNG"):
        load_sidd_pairs(root)
    with pytest.raises(ValueError, match="remove n2n"):
        build_config(data_format="sidd", data_dir=str(root))


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
# issue 14: the contrastive term reaches the weights, and its diagnostics reach the results


def test_alpha_changes_the_trained_weights(tmp_path):
    """Same seed, same data, same steps: alpha > 0 trains other weights than alpha = 0 (the contrastive
    term's gradient reaches the network), while the same alpha twice gives identical weights."""
    records = tiny_records()
    encoder = ResNet50Encoder(1, seed=0)

    def trained(alpha: float, folder: str) -> dict[str, torch.Tensor]:
        config = build_config(crop_size=12, batch_size=3, pretrain_steps=2, checkpoint_every=2, alpha=alpha)
        model, sampler = fresh_pretraining(records)
        pretrain(model, make_objective("rcl-emd", config, encoder), sampler, config, torch.device("cpu"),
                 tmp_path / folder, lambda *_: None, lambda it, **_: it, resume=False)  # fmt: skip
        return {name: value.detach().clone() for name, value in model.state_dict().items()}

    without, again = trained(0.0, "a0"), trained(0.0, "a0-again")
    with_contrast = trained(1e-3, "a1e-3")
    assert all(torch.equal(without[name], again[name]) for name in without)
    changed = [name for name in without if not torch.equal(without[name], with_contrast[name])]
    assert changed, "alpha = 1e-3 trained exactly the weights of alpha = 0"


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
