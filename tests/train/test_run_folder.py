"""The run folder: atomic files, metrics.csv across resumes, refused runs leave nothing, damaged runs resume
or name the damaged file."""

from __future__ import annotations

import csv
import json
import re
import time

import numpy as np
import pytest
import torch
from skimage import io

from rcl_ops.train.cli import main
from train.helpers import smooth_image, tensorboard_scalars, tiny_run


def test_atomic_path_keeps_the_old_file_when_a_write_fails(tmp_path):
    from rcl_ops.train.files import DamagedFileError, atomic_path, read_json, write_json_atomically

    path = tmp_path / "result.json"
    write_json_atomically(path, {"psnr": 30.0})
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as temporary:
        temporary.write_text('{"psnr": 3')  # killed half-way
        raise KeyboardInterrupt
    assert read_json(path) == {"psnr": 30.0}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left behind
    path.write_text('{"psnr": 3')
    with pytest.raises(DamagedFileError, match=r"result.json is damaged \(not valid JSON"):
        read_json(path)


def test_metrics_csv_has_no_duplicate_steps_across_resumes(tmp_path):
    import csv

    from rcl_ops.train.run_log import RunLogger

    logger = RunLogger(tmp_path, tensorboard=False)
    for step in (10, 20, 30):  # the last checkpoint was at step 20; the kill came after step 30 was logged
        logger.log("n2n", 0, "pretrain", step, {"loss": 1.0 / step})
    logger.log("n2n", 0, "finetune-denoise", 10, {"l1": 0.5})
    logger.close()
    with (tmp_path / "metrics.csv").open("a") as handle:
        handle.write("1700000000.000,n2n,0,finetune-denoise,20,l1,0.4")  # torn: no line break

    resumed = RunLogger(tmp_path, tensorboard=False, resume=True)
    for step in (30, 40):
        resumed.log("n2n", 0, "pretrain", step, {"loss": 2.0 / step})
    resumed.log("n2n", 0, "finetune-denoise", 10, {"l1": 0.25})
    resumed.close()
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        rows = [(r["phase"], int(r["step"]), float(r["value"])) for r in csv.DictReader(handle)]
    assert rows == [
        ("pretrain", 10, 0.1),
        ("pretrain", 20, 0.05),
        ("pretrain", 30, pytest.approx(2 / 30, rel=1e-5)),
        ("pretrain", 40, 0.05),
        ("finetune-denoise", 10, 0.25),
    ]


def test_tensorboard_events_are_written_and_a_resume_does_not_duplicate_them(tmp_path):
    from rcl_ops.train.run_log import RunLogger

    logger = RunLogger(tmp_path, tensorboard=True)
    for step in (10, 20, 30):  # the last checkpoint was at step 20; the kill came after step 30 was logged
        logger.log("n2n", 0, "pretrain", step, {"loss": 1.0 / step})
    logger.log("n2n", 0, "finetune-denoise", 10, {"l1": 0.5})
    logger.log("sl-denoise", 0, "pretrain", 10, {"loss": 0.25})
    logger.close()
    time.sleep(1.1)  # a resume is a later process: its event files sort after the first ones

    resumed = RunLogger(tmp_path, tensorboard=True, resume=True)
    for step in (30, 40):
        resumed.log("n2n", 0, "pretrain", step, {"loss": 2.0 / step})
    resumed.log("n2n", 0, "finetune-denoise", 10, {"l1": 0.25})
    resumed.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    approx = pytest.approx
    assert scalars == {
        "n2n/seed0/pretrain/loss": [(10, approx(0.1)), (20, approx(0.05)), (30, approx(2 / 30)), (40, approx(0.05))],
        "n2n/seed0/finetune-denoise/l1": [(10, approx(0.25))],
        "sl-denoise/seed0/pretrain/loss": [(10, approx(0.25))],
    }


# ---------------------------------------------------------------------------------------------
# whole runs: refused runs leave nothing, damaged runs resume or name the damaged file


def metric_rows(run_dir) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_no_duplicate_rows(run_dir) -> None:
    keys = [(r["method"], r["seed"], r["phase"], r["step"], r["metric"]) for r in metric_rows(run_dir)]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert all(None not in row.values() for row in metric_rows(run_dir))  # no torn rows


@pytest.mark.slow
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
        (
            ["--crop-size", "24", "--width", "4096", "--depth", "4"],
            r"--width 4096 and --depth 4: the weights alone need [\d,]+ GiB, but only .* is free on cpu; lower them",
        ),
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


@pytest.mark.slow
def test_resume_after_a_kill_during_a_checkpoint_write(image_folder, tmp_path, monkeypatch, capsys):
    from rcl_ops.train import checkpoints

    steps = ["--pretrain-steps", "4", "--checkpoint-every", "1", "--log-every", "1"]
    assert main(tiny_run(image_folder, tmp_path, "whole", *steps)) == 0
    real_save = checkpoints.save_checkpoint

    def killed_while_saving_step_4(path, model, optimizer=None, generator=None, metadata=None, extra=None):
        real_save(path, model, optimizer, generator, metadata, extra)
        if (metadata or {}).get("step") == 4:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # what a non-atomic write leaves
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_checkpoint", killed_while_saving_step_4)  # the pre-training checkpoints
    assert main(tiny_run(image_folder, tmp_path, "killed", *steps)) == 130  # Ctrl-C: said, not a traceback
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


@pytest.mark.slow
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


@pytest.mark.slow
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
