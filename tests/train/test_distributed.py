"""The trainer under torchrun: 2 gloo processes pre-train with DDP, are killed mid-run, and a
--resume relaunch of both ranks finishes the run from rank 0's checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from skimage import io

from train.helpers import smooth_image

STEPS = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(images, output, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "rcl_ops.train",
        "--data-dir", str(images), "--output-dir", str(output), "--run-name", "ddp", "--methods", "rcl-bd",
        "--tasks", "denoise", "--seeds", "0", "--no-plots", "--no-progress", "--threads", "1", "--device", "cpu",
        "--crop-size", "16", "--width", "4", "--depth", "1", "--batch-size", "2", "--pretrain-steps", str(STEPS),
        "--checkpoint-every", "5", "--finetune-steps", "2", "--finetune-batch-size", "2", "--eval-crop", "24",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.slow
def test_two_rank_training_resumes_after_a_kill(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        io.imsave(images / f"img{index}.png", smooth_image(rng, 36), check_contrast=False)
    output = tmp_path / "runs"
    # Runs are keyed by method and encoder ("rcl-bd+random").
    checkpoints = output / "ddp" / "checkpoints"

    def checkpoint_exists() -> bool:
        return any(checkpoints.glob("rcl-bd*/seed0/pretrain_last.safetensors"))

    first = _torchrun(images, output)
    deadline = time.monotonic() + 120
    while not checkpoint_exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [first.pid, *_descendants(first.pid)]:  # every rank and the launcher, mid pre-training
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # a helper process that exited since it was listed
            pass
    log = first.communicate()[0]
    assert checkpoint_exists(), log

    second = _torchrun(images, output, "--resume")
    log = second.communicate(timeout=240)[0]
    assert second.returncode == 0, log
    (result_path,) = (output / "ddp" / "results").glob("rcl-bd*_seed0.json")
    result = json.loads(result_path.read_text())
    assert 0 < result["pretrain"]["resumed_from"] < STEPS, result["pretrain"]
    assert (output / "ddp" / "results.json").exists()
    assert log.count("rcl-train: run folder") == 1  # rank 0 alone speaks
