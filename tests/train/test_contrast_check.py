"""The pre-training contrast check (issue 22): under the default settings the contrastive term rewards
denoising, the old unit-scale settings fail the check, and a run refuses settings that reward the wrong thing."""

from __future__ import annotations

import pytest
import torch

from rcl_ops.train.config import build_config
from rcl_ops.train.contrast_check import CHECK_BATCHES, PAIRWISE, check_contrast, crop_pair_batches, gaussian_blur
from rcl_ops.train.data import make_records
from rcl_ops.train.images import load_split
from rcl_ops.train.methods import temperature_of
from rcl_ops.train.models import build_model, configured_model
from rcl_ops.train.preflight import RunError
from rcl_ops.train.trainer import run_experiment


@pytest.fixture(scope="module")
def quick_crop_pairs():
    """The check's 32 batches of 8 crop pairs (48x48) of the quick preset's training tiles at its noise levels."""
    config = build_config("quick")
    train, _ = load_split(
        None, config.test_fraction, config.split_seed, None, "clean", config.bundled_images, config.tile_size
    )
    records = make_records(train, "rgb", config.sigma_min, config.sigma_max, config.noise_seed, False)
    return crop_pair_batches(records, config.crop_size, config.batch_size, CHECK_BATCHES, config.split_seed, raw=False)


def _check(model, batches, distance, scale, temperature):
    return check_contrast(
        model, batches, PAIRWISE[distance], scale, temperature, False, raw=False, device=torch.device("cpu")
    )


@pytest.mark.parametrize("distance", ["emd", "mmd", "bd"])
def test_default_settings_score_the_true_noise_below_untrained_networks(quick_crop_pairs, distance):
    """Under the defaults (8-bit scale, the distance's default temperature), the true noise scores a lower
    L_contrast than the residuals of the default network at step 0 and than those of an untrained U-Net that
    predicts the image (its residuals are the image content): the term rewards denoising."""
    config = build_config()
    scale, temperature = 255.0 if config.distance_scale == "8bit" else 1.0, temperature_of(config, distance)
    torch.manual_seed(0)
    for model in (build_model("unet", 16, 2), build_model("unet", 16, 2, unet_output="image")):
        check = _check(model, quick_crop_pairs, distance, scale, temperature)
        assert check["ideal"] < check["step0"], (distance, model.predicts_residual, check)
        assert check["rewards_denoising"]
        assert check["ideal"] < 0.9 * check["chance"]  # the true noise is clearly told apart, not at chance


@pytest.mark.parametrize("distance", ["emd", "mmd", "bd"])
def test_the_old_unit_scale_settings_fail_the_check(quick_crop_pairs, distance):
    """The check can fail: on the unit scale at temperature 0.1 (the old defaults) an untrained
    image-predicting U-Net's residuals (image content) score lower than the true noise for EMD and MMD."""
    torch.manual_seed(0)
    check = _check(build_model("unet", 16, 2, unet_output="image"), quick_crop_pairs, distance, 1.0, 0.1)
    if distance in ("emd", "mmd"):
        assert not check["rewards_denoising"], check
    assert check["ideal"] > 0.75 * check["chance"]  # even the true noise sits near chance there


def test_check_leaves_the_network_untouched(quick_crop_pairs):
    model = build_model("dncnn", 8, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _check(model, quick_crop_pairs[:1], "bd", 255.0, 0.01)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # BatchNorm statistics too


def test_gaussian_blur_keeps_constants_and_smooths_noise():
    constant = torch.full((1, 3, 20, 20), 0.3)
    assert torch.allclose(gaussian_blur(constant), constant, atol=1e-6)
    noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(noise).std() < 0.25 * noise.std()


@pytest.mark.slow
def test_settings_that_reward_the_wrong_thing_are_refused_before_any_file(tmp_path):
    options = dict(
        bundled_images="rgb", tile_size=64, crop_size=32, width=4, depth=1, batch_size=8, max_images=4,
        methods=["rcl-emd", "n2n"], pretrain_steps=1, finetune_steps=1, seeds=[0], density_batches=2,
        output_dir=str(tmp_path / "runs"), progress=False, plots=False, threads=1,
        distance_scale="unit", temperature=0.1, unet_output="image", sigma_max=50.0,
    )  # fmt: skip
    with pytest.raises(RunError, match="does not reward denoising.*ignore-contrast-check"):
        run_experiment(build_config(**options), echo=None)
    assert not (tmp_path / "runs").exists()
    lines = []
    summary = run_experiment(build_config(**options, ignore_contrast_check=True, run_name="forced"), lines.append)
    assert any("WARNING (--ignore-contrast-check)" in line for line in lines)
    check = summary["environment"]["contrast_checks"]["emd"]["0"]
    assert not check["rewards_denoising"] and check["ideal"] >= check["step0"]
    text = (tmp_path / "runs" / "forced" / "results.md").read_text()
    assert "rewards denoising in 0 of 1 seed(s)" in text


@pytest.mark.slow
def test_default_run_records_a_passing_check(tmp_path):
    config = build_config(
        bundled_images="rgb", tile_size=64, crop_size=32, width=4, depth=1, batch_size=8, max_images=4,
        methods=["rcl-emd"], pretrain_steps=1, finetune_steps=1, seeds=[0], density_batches=2,
        output_dir=str(tmp_path), run_name="ok", progress=False, plots=False, threads=1, sigma_max=50.0,
    )  # fmt: skip
    lines = []
    summary = run_experiment(config, lines.append)
    assert any("the contrastive term rewards denoising: yes" in line for line in lines)
    run = next(r for r in summary["runs"] if r["method"] == "rcl-emd+random")
    assert run["contrast_check"]["rewards_denoising"]
    assert configured_model(config).predicts_residual
