"""The trainer's contract at its edges (issue 25): the probes of a demanding user, kept as tests. Run folders
are claimed atomically and never take over a user's files; a diverged run never reports a number; the noise
does not depend on how --data-dir is spelled; every value is checked before the run folder exists; errors
name the option or the file; Ctrl-C says how to resume."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import io

from rcl_ops.train.cli import main
from rcl_ops.train.config import build_config
from rcl_ops.train.data import make_records
from rcl_ops.train.images import DataError, load_image_file, load_split
from train.helpers import smooth_image, tiny_run


def exit_status(args: list[str]) -> int:
    """rcl-train's exit status: main's, or argparse's for an option refused while the configuration is built."""
    try:
        return main(args)
    except SystemExit as error:
        return error.code


def dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------------------------------------
# run folders: never a user's folder, claimed atomically, locked while a process trains there


def test_a_folder_of_the_users_own_files_is_refused(image_folder, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("results.md", "results.json", "metrics.csv"):
        (mine / name).write_text(f"my own {name}")
    assert main(tiny_run(image_folder, tmp_path, "mine")) == 2
    error = capsys.readouterr().err
    assert "holds files that are not a run of rcl-train" in error and "results.md" in error
    from rcl_ops.train.preflight import RunError
    from rcl_ops.train.run_folder import claim_run_dir

    with pytest.raises(RunError, match="holds files that are not a run of rcl-train"):  # the check under the lock
        claim_run_dir(mine, build_config(output_dir=str(tmp_path), run_name="mine"), print)
    assert {p.name: p.read_text() for p in mine.iterdir()} == {
        name: f"my own {name}" for name in ("results.md", "results.json", "metrics.csv")
    }
    (tmp_path / "empty").mkdir()  # an empty folder made for the run is fine
    assert main(tiny_run(image_folder, tmp_path, "empty", "--pretrain-steps", "1", "--finetune-steps", "0")) == 0


def test_a_finished_run_whose_config_json_is_missing_is_not_replaced(image_folder, tmp_path, capsys):
    args = tiny_run(image_folder, tmp_path, "done", "--pretrain-steps", "1", "--finetune-steps", "0")
    assert main(args) == 0
    results = (tmp_path / "done" / "results.json").read_bytes()
    (tmp_path / "done" / "config.json").unlink()
    capsys.readouterr()
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "looks like a run of rcl-train whose config.json is missing" in error
    assert (tmp_path / "done" / "results.json").read_bytes() == results


def test_a_run_folder_is_claimed_by_one_process_at_a_time(tmp_path):
    from rcl_ops.train.preflight import RunError
    from rcl_ops.train.run_folder import claim_run_dir

    config = build_config(output_dir=str(tmp_path), run_name="same")
    run_dir, lock = claim_run_dir(tmp_path / "same", config, print)
    assert run_dir == tmp_path / "same" and (run_dir / "config.json").exists()
    with pytest.raises(RunError, match=rf"in use by process {os.getpid()}"):
        claim_run_dir(tmp_path / "same", config, print)  # the second of two runs started together
    with pytest.raises(RunError, match=rf"--resume: the run in .*same is still being trained by process {os.getpid()}"):
        claim_run_dir(tmp_path / "same", build_config(output_dir=str(tmp_path), run_name="same", resume=True), print)
    lock.release()
    with pytest.raises(RunError, match="already holds a run; pass --resume"):
        claim_run_dir(tmp_path / "same", config, print)
    resumed, lock = claim_run_dir(run_dir, build_config(output_dir=str(tmp_path), run_name="same", resume=True), print)
    lock.release()


def test_runs_without_a_name_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from rcl_ops.train import run_folder

    monkeypatch.setattr(run_folder, "timestamp", lambda: "20270101-120000")
    config = build_config(output_dir=str(tmp_path), preset="quick")
    claimed = []
    for _ in range(3):
        run_dir, _ = run_folder.locate_run(config)
        claimed.append(run_folder.claim_run_dir(run_dir, config, print))
    assert [d.name for d, _ in claimed] == [
        "quick-20270101-120000",
        "quick-20270101-120000-2",
        "quick-20270101-120000-3",
    ]
    for _, lock in claimed:
        lock.release()


def test_a_stale_lock_of_a_dead_process_is_said_and_taken_over(tmp_path):
    from rcl_ops.train.run_folder import LOCK_NAME, claim_run_dir

    config = build_config(output_dir=str(tmp_path), run_name="r")
    run_dir, lock = claim_run_dir(tmp_path / "r", config, print)
    lock.release()
    pid = dead_pid()
    (run_dir / LOCK_NAME).write_text(f"{pid} {os.uname().nodename}\n")  # what a killed process leaves
    said = []
    _, lock = claim_run_dir(run_dir, build_config(output_dir=str(tmp_path), run_name="r", resume=True), said.append)
    lock.release()
    assert any(f"process {pid}" in line and "no longer running" in line for line in said), said


def test_resume_of_a_run_still_training_is_refused(image_folder, tmp_path, capsys):
    from rcl_ops.train.run_folder import claim_run_dir

    args = tiny_run(image_folder, tmp_path, "busy")
    _, lock = claim_run_dir(tmp_path / "busy", build_config(**_options(args)), print)
    try:
        assert main([*args, "--resume"]) == 2
    finally:
        lock.release()
    error = capsys.readouterr().err
    assert f"still being trained by process {os.getpid()}" in error
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".rcl-train.lock", "config.json"]


def _options(args: list[str]) -> dict:
    """The TrainConfig options of a command line (tiny_run's)."""
    from rcl_ops.train.cli import build_parser

    options = vars(build_parser().parse_args(args))
    options.pop("print_config")
    return options


@pytest.mark.slow
def test_two_runs_with_the_same_name_started_together(image_folder, tmp_path):
    args = [sys.executable, "-m", "rcl_ops.train", *tiny_run(image_folder, tmp_path, "same")]
    root = Path(__file__).resolve().parents[2]
    processes = [
        subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in processes)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    refusal = outcomes[1][1]
    assert "in use by process" in refusal or "already holds a run" in refusal, refusal
    assert "Traceback" not in refusal
    assert json.loads((tmp_path / "same" / "results.json").read_text())["runs"]


# ---------------------------------------------------------------------------------------------
# a diverged run reports no number, blames the stage that diverged, and keeps its JSON strict


@pytest.mark.slow
@pytest.mark.parametrize("finetune_steps", ["0", "2"])
def test_a_diverged_last_update_is_not_reported_as_a_number(finetune_steps, image_folder, tmp_path, capsys):
    args = tiny_run(image_folder, tmp_path, "r", "--lr", "1e30", "--pretrain-steps", "1")
    assert main([*args, "--finetune-steps", finetune_steps]) == 2
    captured = capsys.readouterr()
    assert "n2n/seed0: pre-training" in captured.err and "try a lower --lr" in captured.err
    assert "fine-tuning diverged" not in captured.err and "Traceback" not in captured.err
    assert "nan" not in captured.out.lower()
    for path in (tmp_path / "r").rglob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda token, path=path: pytest.fail(f"{path}: a bare {token}"))


def test_non_finite_weights_after_the_last_update_are_caught(tmp_path):
    from rcl_ops.train.data import CropSampler
    from rcl_ops.train.evaluate import ProxySettings, fit_l1
    from rcl_ops.train.models import build_model
    from rcl_ops.train.seeding import seeded_generator
    from train.helpers import denoising_records, objective_of, pretrain_quietly

    config = build_config(crop_size=12, batch_size=3, pretrain_steps=2, checkpoint_every=5)
    records = denoising_records(4, 24)
    objective = objective_of("n2s", config)

    updates = []

    def last_update_overflows(model):
        updates.append(1)
        if len(updates) == config.pretrain_steps:
            model.head.weight.data.fill_(math.inf)

    objective.after_step = last_update_overflows  # the loss before each update stays finite
    sampler = CropSampler(records, 12, seeded_generator(0, "pretrain"), raw=False)
    with pytest.raises(
        FloatingPointError,
        match=r"pre-training left non-finite weights \(head.weight\) after its "
        r"last update, step 2; try a lower --lr",
    ):
        pretrain_quietly(build_model("unet", 4, 1), objective, sampler, config, tmp_path, resume=False)

    model = build_model("unet", 4, 1)
    settings = ProxySettings(steps=2, batch_size=2, crop_size=12, lr=1e-3)

    def overflow_at_the_last_step(step: int, loss: float) -> None:
        if step == settings.steps:
            model.head.bias.data.fill_(math.nan)

    with pytest.raises(FloatingPointError, match=r"last update of L1 training on denoise \(step 2\) left non-finite"):
        fit_l1(
            model,
            list(model.parameters()),
            "denoise",
            records,
            settings,
            seeded_generator(0, "x"),
            torch.device("cpu"),
            False,
            "try a lower --finetune-lr",
            overflow_at_the_last_step,
        )


def test_results_are_written_as_strict_json(tmp_path):
    from rcl_ops.train.files import read_json, write_json_atomically

    value = {"low": math.nan, "ratio": [math.inf, -math.inf, 1.5], "numpy": np.float32("nan"), "count": np.int64(3)}
    write_json_atomically(tmp_path / "r.json", value)
    text = (tmp_path / "r.json").read_text()
    parsed = json.loads(text, parse_constant=lambda token: pytest.fail(f"a bare {token}"))
    assert parsed == {"low": "NaN", "ratio": ["Infinity", "-Infinity", 1.5], "numpy": "NaN", "count": 3.0}
    restored = read_json(tmp_path / "r.json", non_finite=True)
    assert math.isnan(restored["low"]) and restored["ratio"] == [math.inf, -math.inf, 1.5]


# ---------------------------------------------------------------------------------------------
# the noise: seeded by the image's path inside the data folder, never by how the folder is spelled


def test_the_noise_does_not_depend_on_how_the_data_dir_is_spelled(image_folder, monkeypatch):
    monkeypatch.chdir(image_folder.parent)
    spellings = [
        image_folder.name,
        str(image_folder.resolve()),
        f"./{image_folder.name}/",
        f"../{image_folder.parent.name}/{image_folder.name}",
    ]
    observed = []
    for spelling in spellings:
        train, test = load_split(spelling, 0.25, 0)
        records = make_records(train + test, "rgb", 0, 20, 0, second_draw=True)
        observed.append([torch.cat([r.observed.flatten(), r.observed_second.flatten()]) for r in records])
    for other in observed[1:]:
        assert all(torch.equal(a, b) for a, b in zip(observed[0], other))


def test_train_and_test_images_of_the_same_name_get_their_own_noise(tmp_path):
    image = smooth_image(np.random.default_rng(0), 36)
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        io.imsave(tmp_path / split / "a.png", image, check_contrast=False)
    train, test = load_split(str(tmp_path), 0.25, 0)
    first, second = make_records(train + test, "rgb", 5, 20, 0, second_draw=False)
    assert not torch.equal(first.observed, second.observed)


def test_the_bundled_images_keep_their_noise():
    """Checksums recorded from the code before issue 25: the bundled images' noise is seeded by their names."""
    train, test = load_split(None, 0.25, 0, None, "clean", "all", 128)
    images = [i for i in train + test if i.name in ("astronaut@0,0", "coffee@1,2", "moon@0,0")]
    digest = hashlib.sha256()
    for record in make_records(images, "rgb", 0.0, 50.0, 3, second_draw=True):
        digest.update(record.observed.numpy().tobytes())
        digest.update(record.observed_second.numpy().tobytes())
    assert digest.hexdigest() == "db13ef0f7811cd78bcf313d4345d435440b577bdba14697d8fc94dfa898bc5c0"
    digest = hashlib.sha256()
    for record in make_records(images, "raw", 0.0, 50.0, 3, second_draw=False, burst=True):
        digest.update(record.observed.numpy().tobytes())
        for _, frame in record.burst:
            digest.update(frame.numpy().tobytes())
    assert digest.hexdigest() == "893c01665bd5afe6494c7970abf3e5cd8c67bff24999532e02956c03027ef91a"


# ---------------------------------------------------------------------------------------------
# --sigma-max 0, and images that cannot be read at their precision


def test_sigma_max_zero_is_refused_before_anything(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--sigma-max must be in \(0, 255\].*PSNR.*infinite"):
        build_config(sigma_max=0.0)
    (tmp_path / "old").mkdir()  # a run saved by an older version with sigma_max 0: its --resume is refused too
    (tmp_path / "old" / "config.json").write_text(json.dumps({"sigma_max": 0.0}))
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "--run-name", "old", "--sigma-max", "0", "--resume"])
    assert "--sigma-max must be in (0, 255]" in capsys.readouterr().err


def test_statistics_of_an_infinite_psnr_do_not_crash():
    from rcl_ops.train.intervals import paired_difference, photographs_seeds_interval
    from rcl_ops.train.rows import mean_std

    assert mean_std([math.inf, 30.0])["mean"] == math.inf
    assert math.isnan(mean_std([math.inf, 30.0])["std"])
    assert paired_difference([math.inf, 1.0, 2.0])["could_be_noise"]
    interval = photographs_seeds_interval({0: [math.inf, 1.0], 1: [2.0, 1.0]}, ["a", "b"])
    assert interval["could_be_noise"] and math.isnan(interval["low"])


def write_png16(path: Path, array: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG of ``array`` (H, W[, C]) uint16 (Pillow writes none but grey)."""
    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def test_png_precision_and_channels(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (12, 10, 4), dtype=np.uint16)
    write_png16(tmp_path / "grey16.png", values[..., 0], 0)
    grey = load_image_file(tmp_path / "grey16.png").pixels
    assert torch.equal(grey[0], torch.from_numpy(values[..., 0].astype(np.float32) / 65535))  # full precision
    for name, colour_type, channels in (("rgb16", 2, 3), ("grey_alpha16", 4, 2), ("rgba16", 6, 4)):
        write_png16(tmp_path / f"{name}.png", values[..., :channels], colour_type)
        with pytest.raises(DataError, match=rf"{name}.png.*16-bit.*read at 8 bits.*TIFF"):
            load_image_file(tmp_path / f"{name}.png")
    grey8, alpha = (values[..., :2] >> 8).astype(np.uint8).transpose(2, 0, 1)
    Image.merge("LA", [Image.fromarray(grey8), Image.fromarray(alpha)]).save(tmp_path / "grey_alpha8.png")
    Image.merge("RGBA", [Image.fromarray(grey8)] * 3 + [Image.fromarray(alpha)]).save(tmp_path / "rgba8.png")
    assert torch.equal(
        load_image_file(tmp_path / "grey_alpha8.png").pixels, load_image_file(tmp_path / "rgba8.png").pixels
    )


# ---------------------------------------------------------------------------------------------
# every value checked against what the code does with it, before the run folder exists


def test_images_smaller_than_the_crop_once_cut_to_the_tasks_multiple_are_refused_first(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for size in (17, 18):
        folder = tmp_path / f"images{size}"
        folder.mkdir()
        for index in range(8):
            io.imsave(folder / f"{index}.png", smooth_image(rng, size), check_contrast=False)
    cases = [
        ("images17", ["--crop-size", "17", "--batch-size", "3"], "(17x17, 16x16 once cut to a multiple of 2)"),
        ("images18", ["--crop-size", "18", "--tasks", "sr4"], "(18x18, 16x16 once cut to a multiple of 4)"),
    ]
    for folder, extra, shown in cases:
        args = [*tiny_run(tmp_path / folder, tmp_path / "runs", "r"), *extra, "--eval-crop", "8"]
        assert main(args) == 2
        error = capsys.readouterr().err
        assert shown in error and "smaller than the" in error, error
        assert "Traceback" not in error and not (tmp_path / "runs").exists()


def test_learning_rates_that_overflow_adam_are_refused():
    largest = float(np.finfo(np.float32).max) * (1 - 0.9)
    for option in ("lr", "finetune_lr", "sl_lr", "encoder_pretrain_lr"):
        with pytest.raises(ValueError, match=rf"--{option.replace('_', '-')} must be at most 3.4e\+37.*float32"):
            build_config(**{option: 1e38})
        build_config(**{option: largest * 0.999})
    with pytest.raises(ValueError, match=r"--lr must be at most 3.4e\+38 .*--adam-beta1 0"):
        build_config(lr=1e39, adam_beta1=0.0)
    # the bound is where Adam's first step stops fitting in float32
    for lr, fits in ((largest * 0.999, True), (largest * 1.001, False)):
        weight = torch.nn.Parameter(torch.zeros(2))
        weight.grad = torch.ones(2)
        optimizer = torch.optim.Adam([weight], lr=lr, betas=(0.9, 0.999))
        if fits:
            optimizer.step()
        else:
            with pytest.raises(RuntimeError, match="overflow"):
                optimizer.step()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--crop-size", str(10**23)], "--crop-size"),
        (["--width", str(10**23)], "--width"),
        (["--batch-size", str(10**23)], "--batch-size"),
        (["--finetune-batch-size", str(10**23)], "--finetune-batch-size"),
        (["--density-batches", str(10**23)], "--density-batches"),
        (["--depth", "40"], "--depth 40 is too deep for --crop-size 16"),
        (["--depth", "1000000"], "--depth 1000000 is too deep for --crop-size 16"),
        (["--model", "dncnn", "--depth", "1000000", "--width", "64"], "--depth 1000000"),
    ],
)
def test_huge_sizes_are_refused_naming_the_option_before_anything(extra, message, image_folder, tmp_path, capsys):
    started = time.perf_counter()
    assert exit_status(tiny_run(image_folder, tmp_path, "r", *extra)) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error
    assert time.perf_counter() - started < 20 and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# errors that name the file: config files, encoder weights, failing writes


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("list.json", "[]", "must hold a table of options (a JSON object), not an array"),
        ("string.json", '"quick"', "must hold a table of options (a JSON object), not a string"),
        ("null.json", "null", "must hold a table of options (a JSON object), not null"),
        ("number.json", "42", "must hold a table of options (a JSON object), not a number"),
        ("preset.json", '{"preset": ["quick"]}', "preset must be one of"),
        ("empty.json", "", "is not valid JSON"),
        ("comma.json", '{"lr": 0.1,}', "is not valid JSON"),
        ("bad.toml", "lr = = 1", "is not valid TOML"),
    ],
)
def test_config_files_that_are_not_tables_or_do_not_parse_name_the_file(name, content, message, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as caught:
        build_config(config_file=str(path))
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path):
    for suffix in (".json", ".toml"):
        path = tmp_path / f"latin1{suffix}"
        path.write_bytes('run_name = "caf\xe9"'.encode("latin-1") if suffix == ".toml" else b'{"run_name": "caf\xe9"}')
        with pytest.raises(ValueError, match=rf"{path.name} is not valid (JSON|TOML).*UTF-8"):
            build_config(config_file=str(path))


def test_an_empty_encoder_weights_file_is_named(image_folder, tmp_path, capsys):
    for name in ("empty.safetensors", "empty.pth"):
        (tmp_path / name).write_bytes(b"")
        args = tiny_run(image_folder, tmp_path / "runs", "r", "--methods", "rcl", "--encoders", "file")
        assert main([*args, "--encoder-weights", str(tmp_path / name)]) == 2
        error = capsys.readouterr().err
        assert f"--encoder-weights: encoder weights {tmp_path / name} is empty" in error, error
        assert "Traceback" not in error and not (tmp_path / "runs" / "r").exists()


def test_failing_writes_name_the_file(tmp_path, monkeypatch):
    import safetensors.torch

    from rcl_ops.train.checkpoints import save_checkpoint
    from rcl_ops.train.files import write_json_atomically

    def full_disk(*args, **kwargs):
        raise OSError(27, "File too large")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'results.json'}: \[Errno 27\] File too large"):
        write_json_atomically(tmp_path / "results.json", {"a": 1})
    monkeypatch.undo()
    from safetensors import SafetensorError

    def full_disk_safetensors(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge })")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_safetensors)
    path = tmp_path / "checkpoints" / "pretrained.safetensors"
    with pytest.raises(OSError, match=rf"cannot write {path}: .*FileTooLarge"):
        save_checkpoint(path, torch.nn.Linear(2, 2))
    assert not list(path.parent.iterdir())  # no temporary left behind


@pytest.mark.slow
def test_a_full_disk_names_the_file_it_could_not_write(image_folder, tmp_path):
    """A file-size limit (as a full disk) in a process of its own: the checkpoint that does not fit is named."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY)); "
        "from rcl_ops.train.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = tiny_run(image_folder, tmp_path, "r", "--width", "16")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "rcl-train: error: cannot write " in done.stderr and ".safetensors" in done.stderr, done.stderr
    assert "File too large" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(image_folder, tmp_path, monkeypatch, capsys):
    from train.helpers import interrupt_pretraining_at

    steps = ["--pretrain-steps", "4", "--checkpoint-every", "2"]
    interrupt_pretraining_at(monkeypatch, 3)
    assert main(tiny_run(image_folder, tmp_path, "r", *steps)) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "KeyboardInterrupt" not in captured.err
    assert captured.err.strip().splitlines() == [
        f"rcl-train: interrupted at step 3 of pre-training n2n/seed0; resume with --resume --run-name r "
        f"--output-dir {tmp_path}"
    ]
    monkeypatch.undo()
    assert main(tiny_run(image_folder, tmp_path, "r", *steps, "--resume")) == 0
    result = json.loads((tmp_path / "r" / "results" / "n2n_seed0.json").read_text())
    assert result["pretrain"]["resumed_from"] == 2
