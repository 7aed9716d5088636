"""Pre-training on tiny records: exact resumes (stateful objectives too), checkpoint fallback and round trip,
and alpha's effect on the trained weights."""

from __future__ import annotations

import pytest
import torch

from rcl_ops.train.checkpoints import load_checkpoint, save_checkpoint
from rcl_ops.train.config import build_config
from rcl_ops.train.data import (
    CleanImage,
    CropSampler,
    make_records,
)
from rcl_ops.train.models import (
    ResNet50Encoder,
    build_model,
)
from rcl_ops.train.preflight import RunError
from rcl_ops.train.seeding import seeded_generator
from train.helpers import objective_of, pretrain_quietly


def tiny_records(num_images: int = 4, size: int = 24):
    generator = torch.Generator().manual_seed(0)
    images = [CleanImage(f"im{i}", torch.rand(3, size, size, generator=generator)) for i in range(num_images)]
    return make_records(images, "rgb", 0, 20, 0, second_draw=True)


def fresh_pretraining(records, seed: int = 0):
    """A freshly initialised network and crop sampler, as a new process would build them."""
    torch.manual_seed(seed)
    return build_model("unet", 4, 1), CropSampler(records, 12, seeded_generator(seed, "pretrain"), raw=False)


def run_pretraining(model, sampler, config, checkpoint_dir, resume, say=print) -> dict:
    objective = objective_of("n2n", config, None)
    return pretrain_quietly(model, objective, sampler, config, checkpoint_dir, resume, say)


def test_pretraining_resumes_exactly(tmp_path):
    config = build_config(crop_size=12, batch_size=3, pretrain_steps=4, checkpoint_every=2, log_every=1)
    records = tiny_records()
    encoder = ResNet50Encoder(1, seed=0)
    objective = objective_of("rcl-emd", config, encoder)

    model, sampler = fresh_pretraining(records)
    pretrain_quietly(model, objective, sampler, config, tmp_path / "a", resume=False)

    interrupted = build_config(crop_size=12, batch_size=3, pretrain_steps=2, checkpoint_every=2)
    model_b, sampler_b = fresh_pretraining(records)
    pretrain_quietly(model_b, objective, sampler_b, interrupted, tmp_path / "b", resume=False)
    model_c, sampler_c = fresh_pretraining(records)  # a new process: state from the checkpoint
    summary = pretrain_quietly(model_c, objective, sampler_c, config, tmp_path / "b", resume=True)
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
        return model, sampler, objective_of(method, config, None)

    def run(config, folder, resume, parts):
        model, sampler, objective = parts
        summary = pretrain_quietly(model, objective, sampler, config, tmp_path / folder, resume)
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


def test_alpha_changes_the_trained_weights(tmp_path):
    """Same seed, same data, same steps: alpha > 0 trains other weights than alpha = 0 (the contrastive
    term's gradient reaches the network), while the same alpha twice gives identical weights."""
    records = tiny_records()
    encoder = ResNet50Encoder(1, seed=0)

    def trained(alpha: float, folder: str) -> dict[str, torch.Tensor]:
        config = build_config(crop_size=12, batch_size=3, pretrain_steps=2, checkpoint_every=2, alpha=alpha)
        model, sampler = fresh_pretraining(records)
        pretrain_quietly(model, objective_of("rcl-emd", config, encoder), sampler, config, tmp_path / folder, False)
        return {name: value.detach().clone() for name, value in model.state_dict().items()}

    without, again = trained(0.0, "a0"), trained(0.0, "a0-again")
    with_contrast = trained(1e-3, "a1e-3")
    assert all(torch.equal(without[name], again[name]) for name in without)
    changed = [name for name in without if not torch.equal(without[name], with_contrast[name])]
    assert changed, "alpha = 1e-3 trained exactly the weights of alpha = 0"
