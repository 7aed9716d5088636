"""Distances between residuals of real images at different simulated noise levels.

Images come from scikit-image's bundled samples (no download). Each grey image gets
Gaussian noise of standard deviation sigma; the "network" is a fixed 5x5 Gaussian blur,
so the residual x - f(x) is mostly the noise. For every distance the table shows the
mean, over images, of D(residual of crop A at sigma_a, residual of crop B at sigma_b):
the diagonal compares two crops with the same noise level (a positive pair in RCL).

Run: python -m rcl_ops.demo
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import rcl_ops

IMAGES = ("camera", "astronaut", "coffee", "chelsea", "brick", "grass", "moon", "coins")
SIGMAS = (5, 10, 20, 40)


def load_grey_images(names=IMAGES) -> list[torch.Tensor]:
    """skimage sample images as (H, W) float32 tensors in [0, 1]."""
    from skimage import color, data, util

    images = []
    for name in names:
        image = getattr(data, name)()
        if image.ndim == 3:
            image = color.rgb2gray(image[..., :3])
        images.append(torch.from_numpy(util.img_as_float32(image)))
    return images


def blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """(B, 1, H, W) -> same shape, a 5x5 Gaussian blur with reflected borders."""
    taps = torch.exp(-(torch.arange(-2, 3, dtype=x.dtype) ** 2) / (2 * sigma**2))
    kernel = (taps[:, None] * taps[None, :]) / taps.sum() ** 2
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel[None, None])


def residual_crops(crop: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random crops per image and noise level: (len(SIGMAS), N, 1, crop, crop) residuals each."""
    first, second = [], []
    for image in load_grey_images():
        h, w = image.shape
        corners = [
            (
                torch.randint(0, h - crop, (1,), generator=generator).item(),
                torch.randint(0, w - crop, (1,), generator=generator).item(),
            )
            for _ in range(2)
        ]
        for out, (top, left) in zip((first, second), corners):
            patch = image[top : top + crop, left : left + crop]
            noisy = torch.stack([patch + s / 255 * torch.randn(patch.shape, generator=generator) for s in SIGMAS])
            out.append((noisy[:, None] - blur(noisy[:, None]))[:, None])
    return torch.cat(first, dim=1), torch.cat(second, dim=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=64, help="crop side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", help="rcl_ops backend (default auto)")
    args = parser.parse_args(argv)

    first, second = residual_crops(args.crop, torch.Generator().manual_seed(args.seed))
    levels, num_images = first.shape[:2]
    q = first.reshape(levels * num_images, 1, args.crop, args.crop)
    k = second.reshape(levels * num_images, 1, args.crop, args.crop)
    print(f"{num_images} skimage images, {args.crop}x{args.crop} crops, noise sigma in {SIGMAS} (/255)")
    print(f"backends available: {rcl_ops.available_backends()}")
    for name, fn in (("EMD", rcl_ops.pairwise_emd), ("MMD^2", rcl_ops.pairwise_mmd), ("BD", rcl_ops.pairwise_bd)):
        start = time.perf_counter()
        distances = fn(q, k, backend=args.backend)
        elapsed = time.perf_counter() - start
        # Mean over images of D(sigma_a crop A of image n, sigma_b crop B of image n).
        per_level = distances.reshape(levels, num_images, levels, num_images).diagonal(dim1=1, dim2=3).mean(-1)
        print(f"\n{name}  ({q.shape[0]}x{k.shape[0]} matrix in {1e3 * elapsed:.1f} ms)")
        print("sigma_a \\ sigma_b " + "".join(f"{s:>11}" for s in SIGMAS))
        for row, s in zip(per_level.tolist(), SIGMAS):
            print(f"{s:>17} " + "".join(f"{v:>11.3e}" for v in row))
        off_diag = per_level[~torch.eye(levels, dtype=torch.bool)]
        print(
            f"positives (diagonal) smaller than every other level: {bool(per_level.diagonal().max() < off_diag.min())}"
        )


if __name__ == "__main__":
    main()
