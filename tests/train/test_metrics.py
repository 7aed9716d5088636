"""The trainer's PSNR and SSIM against scikit-image."""

from __future__ import annotations

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from rcl_ops.train.evaluate import psnr, ssim


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
