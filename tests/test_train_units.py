"""Unit tests of the reference trainer: noise model, mosaic, metrics, losses, models, data errors, config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from skimage import io
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from utils import denoising_records

from rcl_ops.train.cli import build_parser, main
from rcl_ops.train.config import TrainConfig, build_config, config_fields
from rcl_ops.train.data import CropSampler, make_records
from rcl_ops.train.evaluate import ProxySettings, proxy_evaluate, psnr, ssim
from rcl_ops.train.images import CleanImage, DataError, check_image_sizes, load_folder, load_split, to_rgb_float
from rcl_ops.train.losses import (
    Noise2SelfObjective,
    RawConsistencyLoss,
    canonical_method,
    n2s_mask,
    neighbour_interpolation,
    residual,
    residual_distance_gaps,
)
from rcl_ops.train.models import (
    DnCNN,
    ResNet50Encoder,
    UNet,
    build_model,
    load_encoder_weights,
)
from rcl_ops.train.noise import (
    NoiseLevel,
    add_noise,
    bayer_masks,
    demosaic_bilinear,
    keys_translate,
    mosaic,
    nlf_sqrt_range,
    raw_to_planes,
    sample_noise_level,
)

# ---------------------------------------------------------------------------------------------
# noise model (Eq. 3, Eq. 16-17)


def test_noise_levels_follow_eq16_17():
    rng = np.random.default_rng(0)
    levels = [sample_noise_level(rng, 0.0, 20.0) for _ in range(4000)]
    low, high = nlf_sqrt_range(0.0, 20.0)
    assert low == 0 and high == pytest.approx(20 / 255 / math.sqrt(2))
    sqrt_shot = np.sqrt([lv.shot for lv in levels])
    sqrt_read = np.sqrt([lv.read for lv in levels])
    for sample in (sqrt_shot, sqrt_read):
        assert sample.min() >= low and sample.max() <= high
        assert stats.kstest(sample, "uniform", args=(low, high - low)).pvalue > 1e-3
    # independent draws of the two parameters
    assert abs(np.corrcoef(sqrt_shot, sqrt_read)[0, 1]) < 0.06
    # sigma at any intensity stays within [0, 20] / 255, and reaches close to the top
    max_stds = np.array([lv.max_std for lv in levels])
    assert max_stds.max() <= 20 / 255 + 1e-12 and max_stds.max() > 18 / 255


def test_noise_level_lower_bound():
    rng = np.random.default_rng(1)
    levels = [sample_noise_level(rng, 5.0, 20.0) for _ in range(500)]
    assert min(lv.max_std for lv in levels) >= 5 / 255 - 1e-12
    with pytest.raises(ValueError, match="sigma_min"):
        nlf_sqrt_range(10.0, 5.0)


@pytest.mark.parametrize("intensity", [0.0, 0.25, 1.0])
def test_noise_is_heteroscedastic_gaussian(intensity):
    level = NoiseLevel(shot=0.004, read=0.0005)
    clean = torch.full((200_000,), intensity, dtype=torch.float64)
    noise = add_noise(clean, level, np.random.default_rng(2)) - clean
    expected_var = level.shot * intensity + level.read
    assert float(noise.mean()) == pytest.approx(0.0, abs=4 * math.sqrt(expected_var / noise.numel()))
    assert float(noise.var()) == pytest.approx(expected_var, rel=0.02)
    standardised = (noise / math.sqrt(expected_var)).numpy()[:20000]
    assert stats.kstest(standardised, "norm").pvalue > 1e-3


def test_noise_is_seeded_and_reproducible():
    image = CleanImage("img", torch.rand(3, 20, 24))
    first = make_records([image], "rgb", 0, 20, noise_seed=7, second_draw=True)[0]
    again = make_records([image], "rgb", 0, 20, noise_seed=7, second_draw=True)[0]
    other = make_records([image], "rgb", 0, 20, noise_seed=8, second_draw=True)[0]
    assert torch.equal(first.observed, again.observed) and first.noise_level == again.noise_level
    assert not torch.equal(first.observed, other.observed)
    # noise2noise's second draw: same noise level, independent noise
    n1, n2 = first.observed - first.clean, first.observed_second - first.clean
    assert not torch.equal(n1, n2)
    assert abs(float(torch.corrcoef(torch.stack([n1.flatten(), n2.flatten()]))[0, 1])) < 0.1


# ---------------------------------------------------------------------------------------------
# RGGB mosaic


def test_mosaic_is_rggb():
    rgb = torch.stack([torch.full((4, 6), 1.0), torch.full((4, 6), 2.0), torch.full((4, 6), 3.0)])
    raw = mosaic(rgb)
    assert raw.shape == (1, 4, 6)
    assert torch.equal(raw[0, 0::2, 0::2], torch.full((2, 3), 1.0))  # R
    assert torch.equal(raw[0, 0::2, 1::2], torch.full((2, 3), 2.0))  # G
    assert torch.equal(raw[0, 1::2, 0::2], torch.full((2, 3), 2.0))  # G
    assert torch.equal(raw[0, 1::2, 1::2], torch.full((2, 3), 3.0))  # B
    assert torch.equal(bayer_masks(4, 6).sum(0), torch.ones(4, 6))
    assert torch.equal(raw_to_planes(raw).sum(-3, keepdim=True), raw)


def test_bilinear_demosaic_keeps_samples_and_constant_colours():
    raw = torch.rand(2, 1, 8, 10)
    assert torch.allclose(mosaic(demosaic_bilinear(raw)), raw)
    flat = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 8, 10)
    assert torch.allclose(demosaic_bilinear(mosaic(flat)), flat)


def test_raw_records_add_noise_after_mosaicing():
    image = CleanImage("img", torch.rand(3, 31, 40))
    record = make_records([image], "raw", 0, 20, 0, second_draw=False)[0]
    assert record.clean.shape == (3, 30, 40)  # cropped to even size
    assert record.observed.shape == (1, 30, 40)
    assert torch.equal(record.observed_clean, mosaic(record.clean))
    noise = record.observed - record.observed_clean
    assert float(noise.abs().max()) > 0
    # raw residual of a perfect restoration is exactly the sensor noise
    assert torch.allclose(residual(record.observed[None], record.clean[None], raw=True), noise[None])


def test_raw_crops_start_on_red():
    rgb = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).expand(3, 41, 40).contiguous()
    records = make_records([CleanImage("img", rgb)], "raw", 0, 0, 0, second_draw=False)  # sigma 0: no noise
    sampler = CropSampler(records, 10, torch.Generator().manual_seed(0), raw=True)
    for _ in range(10):
        crop = sampler.sample(1).observed_q[0, 0]
        assert (float(crop[0, 0]), float(crop[0, 1]), float(crop[1, 0]), float(crop[1, 1])) == (1, 2, 2, 3)


def test_keys_interpolation():
    image = torch.rand(1, 2, 12, 12)
    assert torch.allclose(keys_translate(image, 0.0, 0.0), image)
    shifted = keys_translate(image, 1.0, 0.0)
    assert torch.allclose(shifted[..., :-1, :], image[..., 1:, :])
    ramp = torch.arange(12.0).view(1, 1, 1, 12).expand(1, 1, 12, 12)
    moved = keys_translate(ramp, 0.0, 0.3)  # cubic convolution reproduces linear functions
    assert torch.allclose(moved[..., 2:-3], ramp[..., 2:-3] + 0.3, atol=1e-5)
    with pytest.raises(ValueError, match="within one pixel"):
        keys_translate(image, 1.5, 0.0)


# ---------------------------------------------------------------------------------------------
# metrics against scikit-image


@pytest.mark.parametrize("channels,size", [(3, (32, 40)), (1, (19, 23)), (3, (7, 7))])
def test_metrics_match_skimage(channels, size):
    generator = torch.Generator().manual_seed(3)
    target = torch.rand(2, channels, *size, generator=generator, dtype=torch.float64)
    prediction = (target + 0.1 * torch.randn(target.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    ours_psnr, ours_ssim = psnr(prediction, target), ssim(prediction, target)
    for i in range(2):
        x, y = prediction[i].permute(1, 2, 0).numpy(), target[i].permute(1, 2, 0).numpy()
        assert float(ours_psnr[i]) == pytest.approx(peak_signal_noise_ratio(y, x, data_range=1.0), abs=1e-9)
        reference = structural_similarity(y, x, data_range=1.0, channel_axis=2)
        assert float(ours_ssim[i]) == pytest.approx(reference, abs=1e-9)
    assert float(ssim(target, target)[0]) == pytest.approx(1.0)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="win_size"):
        ssim(torch.rand(1, 3, 5, 5), torch.rand(1, 3, 5, 5))


# ---------------------------------------------------------------------------------------------
# models and the proxy evaluation's freezing


@pytest.mark.parametrize("raw", [False, True])
def test_models_shapes(raw):
    x = torch.rand(2, 1 if raw else 3, 18, 22)
    for model in (UNet(width=4, depth=2, raw=raw), DnCNN(width=4, depth=3, raw=raw)):
        out = model(x)
        assert out.shape == (2, 3, 18, 22)
        assert torch.allclose(model.from_features(x, model.features(x)), out)


def test_dncnn_predicts_the_residual():
    model = DnCNN(width=4, depth=3)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(model(x), x)


@pytest.mark.parametrize("name", ["unet", "dncnn"])
def test_proxy_evaluation_changes_only_the_last_layer(name):
    torch.manual_seed(0)
    model = build_model(name, width=4, depth=2 if name == "unet" else 4)
    if name == "dncnn":  # non-trivial BatchNorm statistics, to see that they stay frozen
        model.train()
        model(torch.rand(4, 3, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = denoising_records(3, 24)
    settings = ProxySettings(steps=5, batch_size=2, crop_size=16, lr=1e-2)
    tuned, scores, _ = proxy_evaluate(
        model, "denoise", records, records[:1], settings, torch.Generator().manual_seed(0), torch.device("cpu"), False
    )
    after = tuned.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        if key.startswith("head."):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
    # the pre-trained model itself is untouched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert len(scores.psnr) == 1 and math.isfinite(scores.psnr[0])


# ---------------------------------------------------------------------------------------------
# the frozen encoder (ResNet-50 stages with torchvision names)


def test_resnet50_encoder_has_torchvision_layout(tmp_path):
    full = ResNet50Encoder(stages=4)
    state = full.state_dict()
    # torchvision's resnet50 state dict has 320 entries: these 318 plus fc.weight and fc.bias
    assert len(state) == 318
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer2.0.conv2.weight",
        "layer4.2.bn3.num_batches_tracked",
    ):
        assert key in state
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    # a DataParallel-prefixed torchvision-style checkpoint with the classifier loads into 1 stage
    checkpoint = {"module." + k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    checkpoint["module.fc.weight"], checkpoint["module.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(checkpoint, path)
    encoder = ResNet50Encoder(stages=1)
    load_encoder_weights(encoder, path)
    assert torch.equal(encoder.conv1.weight, checkpoint["module.conv1.weight"])
    assert encoder(torch.rand(1, 3, 32, 32)).shape == (1, 256, 8, 8)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lack"):
        load_encoder_weights(encoder, tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError):
        load_encoder_weights(encoder, tmp_path / "missing.pth")


def test_random_encoder_is_seeded():
    a, b, c = ResNet50Encoder(1, seed=0), ResNet50Encoder(1, seed=0), ResNet50Encoder(1, seed=1)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


# ---------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("raw", [False, True])
def test_noise2self_masking_is_j_invariant(raw):
    x = torch.rand(1, 1, 16, 16)
    grid, phase = 4, (1, 2)
    mask = n2s_mask(16, 16, grid, phase)
    assert int(mask.sum()) == 16
    # the replacement value at a masked pixel depends on no masked pixel (J-invariance)
    perturbed = x.clone()
    perturbed[mask] += 1.0
    replaced = neighbour_interpolation(x, raw)
    assert torch.allclose(neighbour_interpolation(perturbed, raw)[mask], replaced[mask])
    if raw:  # only same-colour (distance-2) neighbours
        single = torch.zeros(1, 1, 16, 16)
        single[0, 0, 8, 8] = 1
        touched = neighbour_interpolation(single, raw=True)[0, 0].nonzero()
        assert all((int(i) - 8) % 2 == 0 and (int(j) - 8) % 2 == 0 for i, j in touched)
    with pytest.raises(ValueError, match="grid"):
        Noise2SelfObjective(2, raw=True)


def test_raw_consistency_loss_is_differentiable():
    restored = torch.rand(2, 3, 12, 12, requires_grad=True)
    loss = RawConsistencyLoss(0.5)(mosaic(restored.detach()), restored, torch.Generator().manual_seed(0))
    loss.backward()
    assert restored.grad is not None and torch.isfinite(restored.grad).all()


def test_distance_gaps():
    distances = torch.tensor([[0.0, 2.0, 3.0], [1.0, 0.5, 4.0], [1.0, 1.0, 1.0]])
    gaps = residual_distance_gaps(distances)
    assert torch.equal(gaps, torch.tensor([2.0, 3.0, 0.5, 3.5, 0.0, 0.0]))


def test_method_names():
    assert canonical_method("rcl", "bd") == "rcl-bd"
    assert canonical_method("RCL-MMD", "emd") == "rcl-mmd"
    with pytest.raises(ValueError, match="unknown method"):
        canonical_method("simclr", "emd")
    assert canonical_method("moco", "emd") == "moco"
    assert canonical_method("sl-denoise", "emd", "raw") == "sl-jdd"
    with pytest.raises(ValueError, match="not defined for --modality raw"):
        canonical_method("pixcl", "emd", "raw")
    with pytest.raises(ValueError, match="not defined for --modality rgb"):
        canonical_method("m2m", "emd", "rgb")
    with pytest.raises(ValueError, match="a --modality raw task"):
        canonical_method("sl-jdd", "emd", "rgb")


# ---------------------------------------------------------------------------------------------
# data errors


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        load_folder(tmp_path / "empty")


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_folder(tmp_path)


def test_images_smaller_than_the_crop(tmp_path):
    io.imsave(tmp_path / "big.png", np.zeros((40, 40, 3), np.uint8), check_contrast=False)
    io.imsave(tmp_path / "small.png", np.zeros((20, 50), np.uint8), check_contrast=False)
    images = load_folder(tmp_path)
    assert [img.pixels.shape for img in images] == [(3, 40, 40), (3, 20, 50)]
    with pytest.raises(DataError, match=r"small.png \(20x50\).*--crop-size"):
        check_image_sizes(images, 32, "training crop")


def test_folder_with_train_and_test_subfolders(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(count):
            io.imsave(tmp_path / split / f"{i}.png", np.full((8, 8, 3), 10 * i, np.uint8), check_contrast=False)
    train, test = load_split(str(tmp_path), 0.5, 0)
    assert len(train) == 3 and len(test) == 2


def test_pixel_conversion():
    assert to_rgb_float(np.full((2, 3), 65535, np.uint16), "x").shape == (3, 2, 3)
    assert float(to_rgb_float(np.full((2, 3, 4), 255, np.uint8), "x").max()) == 1.0
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        to_rgb_float(np.full((2, 2), 2.0), "x")
    with pytest.raises(DataError, match="shape"):
        to_rgb_float(np.zeros((2, 2, 5)), "x")


def test_batches_need_distinct_images():
    records = make_records([CleanImage(f"i{i}", torch.rand(3, 16, 16)) for i in range(3)], "rgb", 0, 20, 0, False)
    sampler = CropSampler(records, 8, torch.Generator().manual_seed(0), raw=False)
    with pytest.raises(ValueError, match="distinct images"):
        sampler.sample(4)


# ---------------------------------------------------------------------------------------------
# configuration and command line


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for f in config_fields():
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"]
    assert "--print-config" in text


def test_config_precedence(tmp_path):
    config = build_config("quick")
    assert config.crop_size == 48
    assert config.methods == ["rcl-emd", "consistency", "contrast-emd", "n2n", "oracle"]
    path = tmp_path / "run.toml"
    path.write_text('preset = "quick"\n[pre-training]\nbatch-size = 4\ndistance = "bd"\nmethods = ["rcl", "n2s"]\n')
    config = build_config(config_file=str(path), lr=5e-4)
    assert (config.crop_size, config.batch_size, config.lr, config.methods) == (48, 4, 5e-4, ["rcl-bd", "n2s"])
    (tmp_path / "bad.json").write_text(json.dumps({"batchsize": 3}))
    with pytest.raises(ValueError, match="unknown option"):
        build_config(config_file=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="sr2"):
        build_config(modality="raw", tasks=["sr2"])
    with pytest.raises(ValueError, match="batch-size"):
        build_config(batch_size=0)
    assert TrainConfig().validate().methods == ["rcl-emd", "n2n", "n2s", "oracle"]


def test_cli_flags_override_preset(capsys):
    assert (
        main(
            [
                "--preset",
                "quick",
                "--pretrain-steps",
                "7",
                "--eval-crop",
                "none",
                "--no-progress",
                "--seeds",
                "1",
                "2",
                "--print-config",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["pretrain_steps"] == 7 and printed["eval_crop"] is None and printed["seeds"] == [1, 2]
    assert printed["crop_size"] == 48 and printed["progress"] is False
    with pytest.raises(SystemExit):
        main(["--methods", "simclr"])


def test_cli_reports_missing_data_folder(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_example_config_file_parses():
    from pathlib import Path

    import rcl_ops.train

    path = Path(rcl_ops.train.__file__).parent / "example_config.toml"
    config = build_config(config_file=str(path))
    assert config.methods == ["rcl-emd", "rcl-bd", "n2n", "n2s", "oracle"] and config.seeds == [0, 1, 2]
    assert config.preset == "quick" and config.finetune_lr == 1e-2


def test_printed_config_is_a_valid_config_file(tmp_path, capsys):
    assert main(["--preset", "quick", "--seeds", "3", "--print-config"]) == 0
    path = tmp_path / "printed.json"
    path.write_text(capsys.readouterr().out)
    config = build_config(config_file=str(path))
    assert config.seeds == [3] and config.crop_size == 48


# ---------------------------------------------------------------------------------------------
# robustness: option checks, memory estimate, atomic files, metrics.csv on resume

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"test_fraction": 1.5}, r"--test-fraction must be in \(0, 1\), got 1.5"),
        ({"test_fraction": NAN}, "--test-fraction must be in"),
        ({"crop_size": 1}, "--crop-size must be >= 2"),
        ({"sigma_max": INF}, r"--sigma-max must be in \[0, 255\]"),
        ({"sigma_min": NAN}, "--sigma-min must be in"),
        ({"sigma_min": 5, "sigma_max": 2}, "--sigma-min <= --sigma-max"),
        ({"model": "dncnn", "depth": 1}, "--depth of a dncnn must be >= 2"),
        ({"temperature": INF}, "--temperature must be a finite number >= 1e-06"),
        ({"temperature": 1e-300}, "--temperature must be a finite number >= 1e-06"),
        ({"lr": INF}, "--lr must be a finite number > 0"),
        ({"finetune_lr": 0.0}, "--finetune-lr must be a finite number > 0"),
        ({"alpha": NAN}, "--alpha must be a finite number >= 0"),
        ({"consistency_weight": -1.0}, "--consistency-weight must be a finite number >= 0"),
        ({"adam_beta1": 1.0}, r"--adam-beta1 must be in \[0, 1\)"),
        ({"adam_beta2": -0.1}, r"--adam-beta2 must be in \[0, 1\)"),
        ({"adam_eps": INF}, "--adam-eps must be a finite number > 0"),
        ({"raw_max_shift": 2.0}, r"--raw-max-shift must be in \[0, 1\]"),
        ({"encoder_stages": 5}, r"--encoder-stages must be in \[1, 4\]"),
        ({"seeds": [-1]}, "--seeds must be in"),
        ({"split_seed": -1}, "--split-seed must be in"),
        ({"noise_seed": 2**64}, "--noise-seed must be in"),
        ({"encoder_seed": -1}, "--encoder-seed must be in"),
        ({"methods": ["rcl"], "batch_size": 1}, r"--batch-size must be >= 2 for \[.rcl-emd.\]"),
        ({"methods": ["consistency"], "batch_size": 1}, r"--batch-size must be >= 2 for \[.consistency.\]"),
        ({"methods": ["n2s"], "n2s_grid": 1}, "--n2s-grid must be >= 2"),
        ({"methods": ["n2s"], "crop_size": 8, "n2s_grid": 9}, r"--n2s-grid must be in \[2, --crop-size 8\]"),
        ({"methods": ["n2s"], "modality": "raw", "tasks": ["denoise"], "n2s_grid": 2}, "--n2s-grid must be in \\[3"),
        ({"emd_quantiles": 10**6, "crop_size": 8}, "--emd-quantiles must be at most the 192 values"),
        ({"eval_crop": 6}, "--eval-crop must be >= 7 .the SSIM window"),
        ({"grid_images": -1}, "--grid-images must be >= 0"),
        ({"threads": 0}, "--threads must be >= 1"),
        ({"device": "tpu"}, "--device must be auto, cpu, cuda or cuda:N"),
        ({"distance_backend": "fast"}, "--distance-backend must be one of"),
        ({"modality": "RAW"}, "--modality must be one of rgb, raw"),
        ({"run_name": "../elsewhere"}, "--run-name must be a folder name"),
        ({"output_dir": ""}, "--output-dir must not be empty"),
        ({"batch_size": "8"}, "--batch-size must be of type int, got '8'"),
        ({"lr": True}, "--lr must be of type float"),
        ({"seeds": 3}, "--seeds must be a list of int"),
    ],
)
def test_invalid_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(**overrides)


def test_option_checks_keep_valid_values():
    config = build_config(lr=1, seeds=[2, 2, 0], tasks=["denoise", "denoise"], methods=["n2s"], n2s_grid=48)
    assert config.lr == 1.0 and isinstance(config.lr, float)  # TOML `lr = 1` is a float option
    assert config.seeds == [2, 0] and config.tasks == ["denoise"]
    assert build_config(noise_seed=2**63 - 1, adam_beta1=0.0, sigma_min=0, sigma_max=255).noise_seed == 2**63 - 1


def test_config_file_values_are_checked(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"batch-size": "8"}))
    with pytest.raises(ValueError, match="--batch-size must be of type int"):
        build_config(config_file=str(path))


def test_memory_estimate_counts_without_building():
    from rcl_ops.train.preflight import estimate_memory

    config = build_config(model="unet", width=4, depth=2, crop_size=12, methods=["n2n"])
    estimate = estimate_memory(config)
    assert estimate.parameters == sum(p.numel() for p in build_model("unet", 4, 2).parameters())
    assert estimate.padded_size == 12 and estimate.crops == 2 * config.batch_size
    huge = build_config("quick", depth=10)  # the case: a U-Net of ~8e9 parameters
    estimate = estimate_memory(huge)
    assert 7e9 < estimate.parameters < 9e9 and estimate.padded_size == 1024
    assert estimate.total_bytes > 8 * 4 * estimate.parameters
    assert "padded to 1024x1024" in estimate.describe(huge)


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

    from rcl_ops.train.trainer import RunLogger

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


# ---------------------------------------------------------------------------------------------
# pre-training diagnostics (issue 14)


def test_retrieval_accuracy_on_a_hand_made_distance_matrix():
    from rcl_ops.train.diagnostics import retrieval_accuracy

    distances = torch.tensor(
        [
            [0.1, 0.5, 0.9],  # positive nearest: hit
            [0.2, 0.3, 0.4],  # a negative (0.2) nearer: miss
            [0.7, 0.8, 0.7],  # a tie with a negative counts as a miss
        ]
    )
    assert retrieval_accuracy(distances) == pytest.approx(1 / 3)
    assert retrieval_accuracy(torch.eye(4)) == 0.0  # positives farthest
    assert retrieval_accuracy(1 - torch.eye(4)) == 1.0
    with pytest.raises(ValueError, match=r"\(B, B\)"):
        retrieval_accuracy(torch.zeros(2, 3))


def test_gradient_norm_ratio_matches_direct_autograd():
    from rcl_ops.train.diagnostics import gradient_norm_ratio

    torch.manual_seed(0)
    layer, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)
    x = torch.rand(5, 3)
    a = 3.0 * layer(x).square().sum() + other(x).sum()  # `other` reaches only a: not a shared parameter
    b = layer(x).abs().mean()
    found = gradient_norm_ratio(a, b, [*layer.parameters(), *other.parameters()])
    grads_a = torch.autograd.grad(a, list(layer.parameters()), retain_graph=True)
    grads_b = torch.autograd.grad(b, list(layer.parameters()), retain_graph=True)
    norm_a = torch.cat([g.flatten() for g in grads_a]).norm().item()
    norm_b = torch.cat([g.flatten() for g in grads_b]).norm().item()
    assert found["grad_norm_contrast"] == pytest.approx(norm_a, rel=1e-6)
    assert found["grad_norm_consistency"] == pytest.approx(norm_b, rel=1e-6)
    assert found["grad_norm_ratio"] == pytest.approx(norm_a / norm_b, rel=1e-6)
    (a + b).backward()  # the graph is kept for the training step
    assert layer.weight.grad is not None


def test_rcl_parts_report_chance_and_retrieval():
    from rcl_ops.train.data import CropBatch
    from rcl_ops.train.losses import FeatureConsistencyLoss, RCLObjective, contrastive_loss

    objective = RCLObjective(
        contrastive_loss("emd", 0.1, False, "auto", None), FeatureConsistencyLoss(ResNet50Encoder(1)), 1e-3, 1.0, False
    )
    observed = torch.rand(4, 3, 16, 16)
    batch = CropBatch(observed, observed.clone(), None, None, observed, observed)
    identity = torch.nn.Identity()
    terms = objective.compute(identity, batch, torch.Generator())
    # the identity map has zero residuals: every distance is 0, the loss is exactly chance, no retrieval
    assert float(terms.parts["contrast_per_query"]) == pytest.approx(math.log(4))
    assert terms.parts["contrast_chance"] == pytest.approx(math.log(4))
    assert terms.parts["retrieval_top1"] == 0.0
    assert float(terms.consistency) == 0.0
    assert torch.equal(terms.loss, terms.contrast + terms.consistency)


def test_history_summary_flags_a_contrastive_loss_at_chance():
    from rcl_ops.train.diagnostics import summarise_history

    chance = math.log(8)
    stuck = [
        {
            "step": s,
            "contrast_per_query": v,
            "contrast_chance": chance,
            "retrieval_top1": 0.125,
            "grad_norm_ratio": 0.001,
        }
        for s, v in ((1, 2.0), (2, 1.0), (3, 2.05), (4, 2.07))
    ]
    summary = summarise_history(stuck)
    assert summary["at_chance"] and summary["contrast_per_query_end"] == pytest.approx(2.07)
    assert summary["grad_norm_ratio_first"] == 1e-3 and summary["logged_steps"] == 4
    learning = [{**row, "contrast_per_query": 0.3} for row in stuck]
    assert not summarise_history(learning)["at_chance"]
    assert summarise_history([]) == {}


# ---------------------------------------------------------------------------------------------
# the conventions the paper leaves open (issue 14)


def test_paper_preset_refuses_a_random_encoder_unless_asked(tmp_path):
    with pytest.raises(ValueError, match="--encoders file needs --encoder-weights.*--preset paper.*--encoders random"):
        build_config("paper")
    assert build_config("paper", encoders=["random"]).encoders == ["random"]
    (tmp_path / "w.pth").write_bytes(b"")
    assert build_config("paper", encoder_weights=str(tmp_path / "w.pth")).encoders == ["file"]
    with pytest.raises(ValueError, match="does not include file"):
        build_config(encoder_weights=str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="--encoders must be one of"):
        build_config(encoders=["imagenet"])
    config = build_config(methods=["rcl-emd", "n2n"], encoders=["random", "file"], encoder_weights="w.pth")
    assert config.run_keys() == ["rcl-emd+random", "rcl-emd+file", "n2n"]
    assert build_config(methods=["rcl-emd"], modality="raw", tasks=["denoise"]).run_keys() == ["rcl-emd"]


def test_contrast_reduction_and_distance_scale():
    from rcl_ops.train.data import CropBatch
    from rcl_ops.train.trainer import make_objective

    generator = torch.Generator().manual_seed(0)
    observed = torch.rand(4, 3, 16, 16, generator=generator)
    batch = CropBatch(observed, torch.rand(4, 3, 16, 16, generator=generator), None, None, observed, observed)
    model = UNet(width=4, depth=1)
    encoder = ResNet50Encoder(1)

    def terms(**options):
        config = build_config(crop_size=16, batch_size=4, alpha=1.0, **options)
        return make_objective("rcl-emd", config, encoder).compute(model, batch, torch.Generator())

    mean, summed = terms(contrast_reduction="mean"), terms(contrast_reduction="sum")
    assert float(summed.contrast.detach()) == pytest.approx(
        4 * float(mean.contrast.detach()), rel=1e-5
    )  # Algorithm 1 sums
    unit = terms(contrast_reduction="mean", distance_scale="unit")
    assert build_config().distance_scale == "8bit"
    assert torch.allclose(mean.distances, 255 * unit.distances, rtol=1e-4)  # EMD is linear in the scale
    per_crop = terms(consistency_reduction="sum")
    features = encoder(observed).shape[1:].numel()
    assert float(per_crop.consistency.detach()) == pytest.approx(features * float(mean.consistency.detach()), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# the self-pre-trained consistency encoder (issue 14)


def test_instance_contrastive_loss():
    from rcl_ops.train.encoder_pretraining import instance_contrastive_loss

    embeddings = torch.eye(4) * 5
    assert float(instance_contrastive_loss(embeddings, embeddings, 0.01)) < 1e-6  # positives are the only matches
    constant = torch.ones(4, 3)
    assert float(instance_contrastive_loss(constant, constant, 0.2)) == pytest.approx(math.log(4))


def test_self_supervised_encoder_is_cached_and_keyed(tmp_path):
    from rcl_ops.train.encoder_pretraining import cache_key, self_supervised_encoder

    records = make_records([CleanImage(f"i{i}", torch.rand(3, 20, 20)) for i in range(3)], "rgb", 0, 20, 0, False)
    config = build_config(crop_size=16, batch_size=3, encoder_pretrain_steps=2, output_dir=str(tmp_path))
    notes: list[str] = []

    def encoder_for(config):
        return self_supervised_encoder(
            records, config, torch.device("cpu"), torch.Generator().manual_seed(0), notes.append
        )

    first, record = encoder_for(config)
    assert not record["reused_from_cache"] and (tmp_path / "encoder_cache" / record["file"]).exists()
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    random = ResNet50Encoder(1, seed=0)
    assert not torch.equal(first.conv1.weight, random.conv1.weight)  # it was trained
    assert not torch.equal(first.bn1.running_mean, random.bn1.running_mean)  # BatchNorm saw the noisy images
    again, reused = encoder_for(config)
    assert reused["reused_from_cache"] and reused["file_sha256"] == record["file_sha256"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    other_seed = build_config(crop_size=16, batch_size=3, encoder_pretrain_steps=2, encoder_seed=1)
    assert cache_key(records, other_seed) != record["cache_key"] == cache_key(records, config)
    (tmp_path / "encoder_cache" / record["file"]).write_bytes(b"torn")
    _, retrained = encoder_for(config)
    assert "is damaged" in notes[-2] and retrained["file_sha256"] == record["file_sha256"]  # deterministic


# ---------------------------------------------------------------------------------------------
# converging proxy evaluation and paired comparisons (issue 14)


def test_paired_difference_t_interval():
    from rcl_ops.train.intervals import paired_difference

    differences = [0.5, 1.0, 1.5, 2.0]
    found = paired_difference(differences)
    half = stats.t.ppf(0.975, 3) * np.std(differences, ddof=1) / 2  # sqrt(4) = 2
    assert found["mean"] == pytest.approx(1.25) and found["n"] == 4
    assert (found["low"], found["high"]) == (pytest.approx(1.25 - half), pytest.approx(1.25 + half))
    assert not found["could_be_noise"]
    assert paired_difference([-1.0, 1.5, 0.2])["could_be_noise"]
    assert paired_difference([0.3])["could_be_noise"] and math.isnan(paired_difference([0.3])["low"])


def test_cosine_schedule_anneals_to_zero():
    from rcl_ops.train.evaluate import learning_rate_schedule

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=0.01)
    scheduler = learning_rate_schedule(optimizer, "cosine", 4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.01) and rates[2] == pytest.approx(0.005)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_schedule(optimizer, "linear", 4)


def test_label_counts():
    from rcl_ops.train.config import label_count

    assert [label_count(s, 13) for s in ("1", "30%", "100%", "all", "0.1%")] == [1, 4, 13, 13, 1]
    for bad in ("0", "-3", "150%", "0%", "nan%", "some"):
        with pytest.raises(ValueError, match="--labels values must be"):
            label_count(bad, 13)
    with pytest.raises(ValueError, match="--labels values must be"):
        build_config(labels=["ten"])
    with pytest.raises(ValueError, match="add denoise to --tasks"):
        build_config(labels=["all"], tasks=["sr2"])


def test_tiles_and_colour_images(tmp_path):
    from rcl_ops.train.images import EMBEDDED_RGB, tile_images

    image = CleanImage("im", torch.arange(3 * 5 * 7, dtype=torch.float32).reshape(3, 5, 7) / 105)
    tiles = tile_images([image, CleanImage("small", torch.zeros(3, 1, 4))], 2)
    assert [t.name for t in tiles] == [f"im@{r},{c}" for r in range(2) for c in range(3)] + ["small"]
    assert torch.equal(tiles[4].pixels, image.pixels[:, 2:4, 2:4])
    records = make_records(tiles[:2], "rgb", 5, 20, 0, second_draw=False)
    assert records[0].noise_level != records[1].noise_level  # each tile its own noise level
    train, test = load_split(None, 0.25, 0, bundled="rgb", tile_size=128)
    photos = {t.name.split("@")[0] for t in train}, {t.name.split("@")[0] for t in test}
    assert photos[0] | photos[1] == set(EMBEDDED_RGB) and not photos[0] & photos[1]  # split before tiling
    assert all(t.pixels.shape == (3, 128, 128) for t in train + test)
    with pytest.raises(ValueError, match="--tile-size must be at least --crop-size 64"):
        build_config(crop_size=64, tile_size=48)


@pytest.mark.parametrize("preset", ["quick", "small", "gpu-small"])
def test_small_presets_use_tiles_of_four_test_photographs_three_seeds_and_the_controls(preset):
    config = build_config(preset)
    assert config.bundled_images == "all" and config.tile_size > config.crop_size and len(config.seeds) >= 3
    assert config.sigma_max == 50 and config.unet_output == "residual" and config.distance_scale == "8bit"
    assert {"rcl-emd", "consistency", "contrast-emd", "n2n", "oracle"} <= set(config.methods)
    if preset != "quick":  # the demo leaves them out for time
        assert {"n2s", "random"} <= set(config.methods)
    assert len(config.encoders) == 1
    if preset == "gpu-small":  # the paper's batch and crops
        assert (config.batch_size, config.crop_size, config.width, config.depth) == (64, 128, 32, 4)
    if preset == "small":  # the paper's optimiser and loss weights; an encoder trained without labels
        assert (config.lr, config.alpha, config.contrast_reduction) == (1e-3, 1e-3, "sum")
        assert config.temperature is None  # the per-distance defaults that pass the contrast check
        assert config.encoders == ["self"]


def test_contrast_verdict_says_whether_the_term_did_anything():
    from rcl_ops.train.report import contrast_verdict

    row = {
        "title": "RCL-EMD", "contrast_per_query_first": 2.0, "contrast_per_query_end": 1.9,
        "contrast_chance_last": math.log(8), "retrieval_top1_first": 0.5, "retrieval_top1_end": 0.6,
        "grad_norm_ratio_last": 0.3, "seeds_at_chance": 0, "n": 3,
    }  # fmt: skip
    assert "YES" in contrast_verdict(row)
    assert "A LITTLE" in contrast_verdict({**row, "grad_norm_ratio_last": 0.05})
    assert "HARDLY" in contrast_verdict({**row, "grad_norm_ratio_last": 0.001})
    assert "HARDLY" in contrast_verdict({**row, "grad_norm_ratio_last": math.nan})
    assert contrast_verdict({**row, "seeds_at_chance": 2}).startswith("RCL-EMD: NO: its loss ended at chance in 2 of 3")
