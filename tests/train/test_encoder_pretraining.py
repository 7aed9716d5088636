"""The self-pre-trained consistency encoder (issue 14): its instance contrastive loss and its cache."""

from __future__ import annotations

import math

import pytest
import torch

from rcl_ops.train.config import build_config
from rcl_ops.train.data import (
    CleanImage,
    make_records,
)
from rcl_ops.train.models import (
    ResNet50Encoder,
)


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
