"""The proxy evaluation: it tunes only the fresh head, which starts at the identity, on a cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from rcl_ops.train.evaluate import ProxySettings, proxy_evaluate
from rcl_ops.train.models import (
    build_model,
)
from rcl_ops.train.noise import (
    demosaic_bilinear,
)
from train.helpers import assert_only_the_head_changed, denoising_records


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
    assert_only_the_head_changed(before, tuned.state_dict())
    # the pre-trained model itself is untouched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert len(scores.psnr) == 1 and math.isfinite(scores.psnr[0])


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
