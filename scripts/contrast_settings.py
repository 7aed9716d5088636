"""Which distance scale and temperature make the contrastive term reward denoising? On a preset's training
crops (never the test set), the InfoNCE loss per query (Eq. 5) of four kinds of residuals, for each distance,
scale and temperature:

- the true noise (an ideal denoiser);
- an over-smoothing denoiser's (Gaussian blur, 1.5 px: noise + image edges);
- an untrained U-Net that predicts the image (its residuals are mostly image content);
- the default residual U-Net at step 0 (a residual within a hair of 0).

    python scripts/contrast_settings.py --preset quick

The term rewards denoising where the true noise scores below both untrained networks.
"""

from __future__ import annotations

import argparse
import math

import torch

from rcl_ops.train.config import build_config
from rcl_ops.train.contrast_check import (
    CHECK_BATCHES,
    PAIRWISE,
    contrast_per_query,
    crop_pair_batches,
    network_residual,
    oversmoothing_residual,
    residual_distances,
    true_noise,
)
from rcl_ops.train.data import make_records
from rcl_ops.train.images import load_split
from rcl_ops.train.models import build_model

SETTINGS = [("emd", 1.0), ("emd", 255.0), ("mmd", 255.0), ("bd", 255.0)]
TEMPERATURES = (0.1, 0.05, 0.02, 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--batches", type=int, default=CHECK_BATCHES)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = build_config(args.preset)
    train, _ = load_split(
        None, config.test_fraction, config.split_seed, None, "clean", config.bundled_images, config.tile_size
    )
    records = make_records(train, "rgb", config.sigma_min, config.sigma_max, config.noise_seed, False)
    batches = crop_pair_batches(records, config.crop_size, config.batch_size, args.batches, 0, raw=False)
    torch.manual_seed(0)
    image_unet = build_model("unet", config.width, config.depth, unet_output="image")
    residual_unet = build_model("unet", config.width, config.depth)
    networks = {
        "true noise": true_noise(False),
        "blur denoiser": oversmoothing_residual(False),
        "untrained image U-Net": network_residual(image_unet, False),
        "untrained residual U-Net": network_residual(residual_unet, False),
    }
    batch = batches[0].observed_q.shape[0]
    print(f"{args.preset}: {len(train)} training tiles, batch {batch}, crops {config.crop_size}, noise up to "
          f"{config.sigma_max:g}/255, {args.batches} batches; chance ln B = {math.log(batch):.3f}")  # fmt: skip
    print("| distance | scale | temperature | " + " | ".join(networks) + " | rewards denoising |")
    print("|---|---|---|" + "---|" * (len(networks) + 1))
    for distance, scale in SETTINGS:
        matrices = {
            name: residual_distances(fn, batches, PAIRWISE[distance], scale, torch.device("cpu"))
            for name, fn in networks.items()
        }
        for temperature in TEMPERATURES:
            losses = {name: contrast_per_query(m, temperature, False) for name, m in matrices.items()}
            ideal = losses["true noise"]
            rewards = ideal < min(losses["untrained image U-Net"], losses["untrained residual U-Net"])
            cells = " | ".join(f"{value:.3f}" for value in losses.values())
            unit = "unit" if scale == 1.0 else "8bit"
            print(f"| {distance.upper()} | {unit} | {temperature:g} | {cells} | {'yes' if rewards else 'no'} |")


if __name__ == "__main__":
    main()
