"""Trainer fidelity (issue 22): the default contrastive settings reward denoising, networks start at the
identity, the pre-training check refuses settings that reward the wrong thing, and the RCL controls."""

from __future__ import annotations

import pytest
import torch

from rcl_ops.train.config import build_config
from rcl_ops.train.contrast_check import CHECK_BATCHES, PAIRWISE, check_contrast, crop_pair_batches, gaussian_blur
from rcl_ops.train.data import CropBatch, make_records
from rcl_ops.train.evaluate import ProxySettings, proxy_evaluate
from rcl_ops.train.images import load_split
from rcl_ops.train.models import ResNet50Encoder, UNet, build_model, configured_model
from rcl_ops.train.noise import demosaic_bilinear
from rcl_ops.train.trainer import RunError, make_objective, run_experiment, temperature_of
from tests.utils import denoising_records


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


@pytest.mark.parametrize("model_name", ["unet", "dncnn"])
def test_residual_networks_start_at_the_identity(model_name):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    model = build_model(model_name, 8, 2 if model_name == "unet" else 4)
    assert model.predicts_residual
    change = (model(x) - x).square().mean()
    assert 0 < change < 1e-4  # within 40 dB of the identity, but not exactly (RCL needs a gradient there)
    image = build_model("unet", 8, 2, unet_output="image")
    assert (image(x) - x).square().mean() > 1e-2  # no path from input to output: far from the identity


def test_residual_unet_takes_the_demosaic_as_base_for_raw():
    model = UNet(width=4, depth=1, raw=True)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    mosaic = torch.rand(1, 1, 16, 16)
    assert torch.equal(model(mosaic), demosaic_bilinear(mosaic))


@pytest.mark.parametrize(("model_name", "raw"), [("unet", False), ("dncnn", False), ("unet", True)])
def test_proxy_evaluation_starts_from_the_identity(model_name, raw):
    """The fresh head of a residual network is zero: before any fine-tuning step the network returns its
    input (the bilinear demosaic for RAW), whatever it learned in pre-training."""
    torch.manual_seed(0)
    model = build_model(model_name, 4, 2 if model_name == "unet" else 3, raw=raw)
    with torch.no_grad():
        model.head.weight.normal_()  # a pre-trained head far from the identity
    records = denoising_records(2, 24)
    settings = ProxySettings(steps=0, batch_size=2, crop_size=16, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    tuned, _, _ = proxy_evaluate(model, "denoise", records, [], settings, generator, torch.device("cpu"), raw)
    x = torch.rand(1, 1 if raw else 3, 16, 16)
    assert torch.equal(tuned(x), demosaic_bilinear(x) if raw else x)
    image = build_model("unet", 4, 2, raw=raw, unet_output="image")
    tuned, _, _ = proxy_evaluate(image, "denoise", records, [], settings, generator, torch.device("cpu"), raw)
    assert not torch.equal(tuned(x), demosaic_bilinear(x) if raw else x)  # a random fresh head, as before


def test_rcl_controls_leave_out_one_term():
    generator = torch.Generator().manual_seed(0)
    observed = torch.rand(4, 3, 16, 16, generator=generator)
    batch = CropBatch(observed[:2], observed[2:], None, None, observed[:2], observed[2:])
    model, encoder = UNet(width=4, depth=1), ResNet50Encoder(1)
    config = build_config(crop_size=16, batch_size=2, methods=["rcl", "consistency", "contrast"])
    assert config.methods == ["rcl-emd", "consistency", "contrast-emd"]
    assert config.run_keys() == ["rcl-emd+random", "consistency+random", "contrast-emd"]
    with torch.no_grad():
        full = make_objective("rcl-emd", config, encoder).compute(model, batch, generator)
        consistency_only = make_objective("consistency", config, encoder).compute(model, batch, generator)
        contrast_only = make_objective("contrast-emd", config, None).compute(model, batch, generator)
    assert float(consistency_only.contrast) == 0 and float(consistency_only.consistency) == float(full.consistency)
    assert float(contrast_only.consistency) == 0 and float(contrast_only.contrast) == float(full.contrast)
    assert float(full.contrast) > 0 and float(full.consistency) > 0
    assert consistency_only.parts["contrast_per_query"] == full.parts["contrast_per_query"]  # still measured


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
