"""Noise simulation (Eq. 3, Eq. 16-17), the RGGB Bayer mosaic and the interpolations the RAW losses need.

Images are float tensors in [0, 1] with channels first: RGB ``(..., 3, H, W)`` and RAW
mosaics ``(..., 1, H, W)``. Noise levels are given in 8-bit units (sigma in [0, 20] means
[0, 20] / 255 on the [0, 1] scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# RGGB: the colour channel (0 = R, 1 = G, 2 = B) sampled at (row % 2, col % 2).
RGGB_PATTERN = ((0, 1), (1, 2))


@dataclass(frozen=True)
class NoiseLevel:
    """Heteroscedastic Gaussian noise-level function (Eq. 3): Var[n | y] = shot * y + read.

    ``shot`` and ``read`` are the variances' coefficients on the [0, 1] intensity scale.
    """

    shot: float
    read: float

    def std(self, clean: torch.Tensor) -> torch.Tensor:
        """Per-pixel noise standard deviation sqrt(shot * y + read) (y clamped at 0), same shape as ``clean``."""
        return torch.sqrt(self.shot * clean.clamp(min=0) + self.read)

    @property
    def max_std(self) -> float:
        """The standard deviation at full-scale intensity y = 1: sqrt(shot + read)."""
        return math.sqrt(self.shot + self.read)


def nlf_sqrt_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """The interval (a, b) of Eq. 16-17, sqrt(lambda) ~ U(a, b), on the [0, 1] scale.

    a = sigma_min / (255 sqrt 2), b = sigma_max / (255 sqrt 2), so that the standard deviation
    at full scale, sqrt(shot + read), lies in [sigma_min, sigma_max] / 255 and the standard
    deviation at any intensity y in [0, 1] never exceeds sigma_max / 255.
    """
    if not 0 <= sigma_min <= sigma_max:
        raise ValueError(
            f"noise levels need 0 <= sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    scale = 1.0 / (255.0 * math.sqrt(2.0))
    return sigma_min * scale, sigma_max * scale


def sample_noise_level(rng: np.random.Generator, sigma_min: float = 0.0, sigma_max: float = 20.0) -> NoiseLevel:
    """Draw (lambda_shot, lambda_read) for one image: sqrt(lambda) ~ U(a, b) independently (Eq. 16-17)."""
    low, high = nlf_sqrt_range(sigma_min, sigma_max)
    sqrt_shot, sqrt_read = rng.uniform(low, high, size=2)
    return NoiseLevel(shot=float(sqrt_shot**2), read=float(sqrt_read**2))


def add_noise(clean: torch.Tensor, level: NoiseLevel, rng: np.random.Generator) -> torch.Tensor:
    """x = y + n with n ~ N(0, shot * y + read) independently per value (Eq. 2-3).

    clean: any shape, float in [0, 1]. The Gaussian draws come from the numpy generator
    ``rng`` (so a seed gives the same noise on every device). Not clipped: the noisy values
    follow Eq. 3 exactly and may leave [0, 1].
    """
    standard = torch.from_numpy(rng.standard_normal(size=tuple(clean.shape))).to(clean.dtype)
    return clean + level.std(clean) * standard


def bayer_masks(height: int, width: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(3, H, W) 0/1 masks of the RGGB pattern: mask[c, i, j] = 1 where colour c is sampled."""
    masks = torch.zeros(3, height, width, dtype=dtype, device=device)
    for row in range(2):
        for col in range(2):
            masks[RGGB_PATTERN[row][col], row::2, col::2] = 1
    return masks


def mosaic(rgb: torch.Tensor) -> torch.Tensor:
    """RGGB Bayer mosaic: (..., 3, H, W) -> (..., 1, H, W), keeping one colour per pixel."""
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"mosaic: expected an RGB tensor (..., 3, H, W), got shape {tuple(rgb.shape)}")
    masks = bayer_masks(rgb.shape[-2], rgb.shape[-1], rgb.dtype, rgb.device)
    return (rgb * masks).sum(dim=-3, keepdim=True)


def raw_to_planes(raw: torch.Tensor) -> torch.Tensor:
    """(..., 1, H, W) mosaic -> (..., 3, H, W) sparse colour planes (zeros where a colour is not sampled).

    The planes tell a convolutional network which colour each value is, which a single-channel
    mosaic cannot (convolutions are translation-equivariant).
    """
    if raw.dim() < 3 or raw.shape[-3] != 1:
        raise ValueError(f"raw_to_planes: expected a mosaic (..., 1, H, W), got shape {tuple(raw.shape)}")
    return raw * bayer_masks(raw.shape[-2], raw.shape[-1], raw.dtype, raw.device)


def pack_raw(raw: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) RGGB mosaic -> (N, 4, H / 2, W / 2): the paper's footnote 3 (after Gharbi et al. 2016),
    one channel per position of the 2x2 pattern, in the order R (0, 0), G (0, 1), G (1, 0), B (1, 1)."""
    if raw.dim() != 4 or raw.shape[1] != 1 or raw.shape[-1] % 2 or raw.shape[-2] % 2:
        raise ValueError(f"pack_raw: expected an (N, 1, H, W) mosaic with H and W even, got shape {tuple(raw.shape)}")
    return F.pixel_unshuffle(raw, 2)


_BILINEAR_GREEN = torch.tensor([[0.0, 0.25, 0.0], [0.25, 1.0, 0.25], [0.0, 0.25, 0.0]])
_BILINEAR_RED_BLUE = torch.tensor([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])


def demosaic_bilinear(raw: torch.Tensor) -> torch.Tensor:
    """Bilinear demosaicing of an RGGB mosaic: (N, 1, H, W) -> (N, 3, H, W).

    Measured values are kept exactly (so mosaic(demosaic_bilinear(x)) == x); missing ones are
    the mean of their nearest same-colour neighbours (borders reflect).
    """
    if raw.dim() != 4 or raw.shape[1] != 1:
        raise ValueError(f"demosaic_bilinear: expected (N, 1, H, W), got shape {tuple(raw.shape)}")
    planes = F.pad(raw_to_planes(raw), (1, 1, 1, 1), mode="reflect")
    kernel = torch.stack([_BILINEAR_RED_BLUE, _BILINEAR_GREEN, _BILINEAR_RED_BLUE]).to(raw)
    return F.conv2d(planes, kernel[:, None], groups=3)


def restoration_base(x: torch.Tensor, raw: bool) -> torch.Tensor:
    """The no-network restoration of an observation, and what a residual network subtracts its head from:
    the input itself (RGB), or its bilinear demosaic (an RGGB mosaic (N, 1, H, W) -> (N, 3, H, W))."""
    return demosaic_bilinear(x) if raw else x


def keys_weights(fraction: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys (1981) cubic-convolution weights of the 4 taps at offsets (-1, 0, 1, 2) for a sample
    at fractional position ``fraction`` in [0, 1): (..., 4), summing to 1."""
    distances = torch.stack([1 + fraction, fraction, 1 - fraction, 2 - fraction], dim=-1).abs()
    near = ((a + 2) * distances - (a + 3)) * distances.square() + 1
    far = ((a * distances - 5 * a) * distances + 8 * a) * distances - 4 * a
    return torch.where(distances <= 1, near, torch.where(distances < 2, far, torch.zeros_like(distances)))


def keys_translate(image: torch.Tensor, shift_y: float, shift_x: float) -> torch.Tensor:
    """Resample (N, C, H, W) at positions (i + shift_y, j + shift_x) with Keys cubic convolution.

    |shift| <= 1 pixel; borders replicate. A separable 4-tap filter per axis.
    """
    if image.dim() != 4:
        raise ValueError(f"keys_translate: expected (N, C, H, W), got shape {tuple(image.shape)}")
    for shift in (shift_y, shift_x):
        if abs(shift) > 1:
            raise ValueError(f"keys_translate: shifts must be within one pixel, got {shift}")
    out = image
    for axis, shift in ((-2, shift_y), (-1, shift_x)):
        base = math.floor(shift)
        weights = keys_weights(torch.tensor(shift - base, dtype=torch.float64)).to(image.dtype)
        # taps at offsets base - 1 .. base + 2; replicate-pad by 3 so every offset in [-2, 3] exists
        pad = (0, 0, 3, 3) if axis == -2 else (3, 3, 0, 0)
        padded = F.pad(out, pad, mode="replicate")
        size = out.shape[axis]
        taps = [padded.narrow(axis, 3 + base + offset, size) for offset in (-1, 0, 1, 2)]
        out = sum(w * t for w, t in zip(weights, taps))
    return out


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """x``factor`` antialiased bicubic downsampling (Keys a = -0.5, the kernel widened by ``factor``, as
    PIL's ``Image.resize(..., BICUBIC)``): (N, C, H, W) -> (N, C, H / factor, W / factor); H and W must be
    multiples of ``factor``."""
    if image.dim() != 4 or image.shape[-1] % factor or image.shape[-2] % factor:
        raise ValueError(
            f"downsample: expected (N, C, H, W) with H and W multiples of {factor}, got shape {tuple(image.shape)}"
        )
    return F.interpolate(image, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)


def upsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """x``factor`` bicubic upsampling (Keys a = -0.75, pixel centres aligned, borders replicated, as
    ``torch.nn.functional.interpolate``): (N, C, h, w) -> (N, C, factor h, factor w)."""
    if image.dim() != 4:
        raise ValueError(f"upsample: expected (N, C, H, W), got shape {tuple(image.shape)}")
    return F.interpolate(image, scale_factor=float(factor), mode="bicubic", align_corners=False)


def bayer_masks_at(height: int, width: int, phase: tuple[int, int], dtype=torch.float32, device=None) -> torch.Tensor:
    """(3, H, W) RGGB masks of a window whose top-left pixel sits at ``phase`` = (row % 2, col % 2) of the
    sensor's pattern: mask[c, i, j] = 1 where the sensor samples colour c at (phase + (i, j))."""
    full = bayer_masks(height + 1, width + 1, dtype, device)
    return full[:, phase[0] : phase[0] + height, phase[1] : phase[1] + width].contiguous()
