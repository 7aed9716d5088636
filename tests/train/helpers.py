"""Helpers of the trainer tests: tiny records, generated images and the arguments of tiny runs."""

from __future__ import annotations

import numpy as np
import torch
from skimage import io


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random smooth RGB uint8 image (a few sinusoids), so denoising has something to recover."""
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [
        0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.uniform()))
        for _ in range(3)
    ]
    return (np.stack(channels, axis=-1) * 255).astype(np.uint8)


def denoising_records(count: int, size: int, modality: str = "rgb") -> list:
    """``count`` random clean ``size`` x ``size`` images (from torch's global generator) as trainer records
    whose denoising task input (``jdd`` for RAW) is their noisy observation."""
    from rcl_ops.train.data import DENOISING_TASK, make_records
    from rcl_ops.train.images import CleanImage

    images = [CleanImage(f"im{i}", torch.rand(3, size, size)) for i in range(count)]
    records = make_records(images, modality, 0, 20, 0, second_draw=False)
    for record in records:
        record.task_inputs[DENOISING_TASK[modality]] = record.observed
    return records


TINY = [
    "--crop-size", "16", "--width", "4", "--depth", "1", "--pretrain-steps", "3", "--finetune-steps", "3",
    "--batch-size", "3", "--finetune-batch-size", "4", "--eval-crop", "24", "--no-progress",
    "--checkpoint-every", "2", "--density-batches", "1", "--grid-images", "2",
]  # fmt: skip


def tiny_run(image_folder, output, name: str, *extra: str) -> list[str]:
    """Arguments of a one-method, one-seed, one-task tiny run."""
    return [
        "--data-dir", str(image_folder), "--output-dir", str(output), "--run-name", name, "--methods", "n2n",
        "--tasks", "denoise", "--seeds", "0", "--no-plots", *TINY, *extra,
    ]  # fmt: skip


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


def objective_of(name: str, config, encoder=None):
    """The registry's objective of method ``name`` under ``config`` (one process)."""
    from rcl_ops.train.methods import ObjectiveInputs, build_objective

    return build_objective(name, ObjectiveInputs(config, encoder))


def pretrain_quietly(model, objective, sampler, config, checkpoint_dir, resume: bool, say=print) -> dict:
    """``pretrain`` on the CPU without a log or progress bars, resuming from ``checkpoint_dir`` if ``resume``."""
    import dataclasses

    import torch

    from rcl_ops.train.pretraining import RunContext, pretrain

    config = dataclasses.replace(config, resume=resume)
    return pretrain(model, objective, sampler, config, RunContext(torch.device("cpu"), say), checkpoint_dir, "test", 0)


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows under ``folder`` (all its runs), by tag: (step, value) in step order, as
    TensorBoard's own reader loads them (restarted runs purged)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(folder))
    multiplexer.Reload()
    found: dict[str, list[tuple[int, float]]] = {}
    for run, tags in multiplexer.Runs().items():
        for tag in tags["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in multiplexer.Scalars(run, tag))
    return {tag: sorted(events) for tag, events in found.items()}


def interrupt_pretraining_at(monkeypatch, step: int) -> None:
    """Ctrl-C (a KeyboardInterrupt) when pre-training reaches ``step``, until ``monkeypatch.undo()``."""
    from rcl_ops.train import pretraining

    real_step = pretraining._Loop.step

    def interrupted(self, logging, done):
        if done == step:
            raise KeyboardInterrupt
        return real_step(self, logging, done)

    monkeypatch.setattr(pretraining._Loop, "step", interrupted)


def assert_only_the_head_changed(before: dict, after: dict) -> None:
    """Every ``head.*`` tensor of a state dict differs from ``before``, every other one is equal."""
    assert set(after) == set(before)
    for key, value in before.items():
        if key.startswith("head."):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
