"""Configuration and command line: presets, config files, flags, option checks, the memory estimate."""

from __future__ import annotations

import json

import pytest
import torch

from rcl_ops.train.cli import build_parser, main
from rcl_ops.train.config import TrainConfig, build_config, config_fields
from rcl_ops.train.models import (
    build_model,
)


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
# option checks and the memory estimate


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"test_fraction": 1.5}, r"--test-fraction must be in \(0, 1\), got 1.5"),
        ({"test_fraction": NAN}, "--test-fraction must be in"),
        ({"crop_size": 1}, "--crop-size must be >= 2"),
        ({"sigma_max": INF}, r"--sigma-max must be in \(0, 255\]"),
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
    huge = build_config("quick", depth=6, width=512)  # a U-Net of ~3e10 parameters
    estimate = estimate_memory(huge)
    assert 3e10 < estimate.parameters < 3.3e10 and estimate.padded_size == 64
    assert estimate.total_bytes > 8 * 4 * estimate.parameters
    assert "padded to 64x64" in estimate.describe(huge)


def test_the_memory_check_refuses_with_the_estimate_or_with_a_lower_bound(monkeypatch):
    """issue 25: a lower bound in Python ints first (any size), then the estimate on the meta device."""
    from rcl_ops.train import preflight

    huge = build_config("quick", depth=6, width=512)
    floor, what = max(preflight.size_floors(huge))
    assert what == "--width 512 and --depth 6: the weights" and floor < preflight.estimate_memory(huge).total_bytes
    monkeypatch.setattr(preflight, "available_memory", lambda device: floor + 1)
    with pytest.raises(preflight.RunError, match=r"needs about 950 GiB.*padded to 64x64.*lower --width or --depth"):
        preflight.check_machine(huge, torch.device("cpu"))
    monkeypatch.setattr(preflight, "available_memory", lambda device: floor - 1)
    with pytest.raises(preflight.RunError, match=r"--width 512 and --depth 6: the weights alone need 288 GiB"):
        preflight.check_machine(huge, torch.device("cpu"))


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
    assert config.variant_keys() == ["rcl-emd+random", "rcl-emd+file", "n2n"]
    assert build_config(methods=["rcl-emd"], modality="raw", tasks=["denoise"]).variant_keys() == ["rcl-emd"]


def test_label_counts():
    from rcl_ops.train.config_checks import label_count

    assert [label_count(s, 13) for s in ("1", "30%", "100%", "all", "0.1%")] == [1, 4, 13, 13, 1]
    for bad in ("0", "-3", "150%", "0%", "nan%", "some"):
        with pytest.raises(ValueError, match="--labels values must be"):
            label_count(bad, 13)
    with pytest.raises(ValueError, match="--labels values must be"):
        build_config(labels=["ten"])
    with pytest.raises(ValueError, match="add denoise to --tasks"):
        build_config(labels=["all"], tasks=["sr2"])


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
