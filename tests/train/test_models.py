"""The networks (U-Net, DnCNN), their residual start at the identity, and the frozen ResNet-50 encoder."""

from __future__ import annotations

import pytest
import torch

from rcl_ops.train.models import (
    DnCNN,
    ResNet50Encoder,
    UNet,
    build_model,
    load_encoder_weights,
)
from rcl_ops.train.noise import (
    demosaic_bilinear,
)


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
