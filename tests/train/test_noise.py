"""The noise model (Eq. 3, Eq. 16-17), the RGGB mosaic and its demosaic, and Keys' cubic interpolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rcl_ops.train.data import (
    CleanImage,
    CropSampler,
    make_records,
)
from rcl_ops.train.losses import (
    residual,
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
