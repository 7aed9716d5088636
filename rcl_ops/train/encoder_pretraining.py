"""A consistency encoder g_e that needs no download: pre-trained without labels on the noisy training
images themselves (Sec. 3.4 allows this, e.g. by MoCo).

The objective is instance discrimination (SimCLR/MoCo-style InfoNCE): two random crops of each of B
distinct noisy images, randomly flipped, through the ResNet-50 stem and stages, global average pooling
and a small projection head; cosine similarities / temperature, each crop's positive the other crop of its
image, in both directions. The result is cached under ``<output-dir>/encoder_cache/`` keyed by a hash of
the noisy training data and every option that changes it, so methods, seeds and later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .data import CropSampler, ImageRecord
from .files import DamagedFileError, atomic_path
from .models import ResNet50Encoder, file_sha256

if TYPE_CHECKING:
    from .config import TrainConfig

ENCODER_TEMPERATURE = 0.2  # SimCLR's and MoCo v2's value
PROJECTION_DIM = 128
CACHE_FORMAT = 1  # bump when the objective changes, so old cache files are not reused


def cache_key(records: list[ImageRecord], config: TrainConfig) -> str:
    """sha256 (hex) of the noisy training images (names and values) and of the options that change the
    self-pre-trained encoder."""
    digest = hashlib.sha256()
    options = {
        "format": CACHE_FORMAT,
        "stages": config.encoder_stages,
        "seed": config.encoder_seed,
        "steps": config.encoder_pretrain_steps,
        "lr": config.encoder_pretrain_lr,
        "batch_size": config.batch_size,
        "crop_size": config.crop_size,
        "temperature": ENCODER_TEMPERATURE,
    }
    digest.update(json.dumps(options, sort_keys=True).encode())
    for record in records:
        digest.update(record.seed_name.encode())  # not where the data folder lies
        digest.update(record.observed.contiguous().numpy().tobytes())
    return digest.hexdigest()


def instance_contrastive_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over (B, D) embeddings: row i of ``first`` against all rows of ``second`` (positive: row i),
    and the other way round, averaged; cosine similarity / temperature."""
    logits = F.normalize(first, dim=1) @ F.normalize(second, dim=1).t() / temperature
    target = torch.arange(first.shape[0], device=first.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def random_flip(crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each (N, C, H, W) crop flipped left-right with probability 1/2 (draws from ``generator``)."""
    flip = torch.rand(crops.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(crops.device), crops.flip(-1), crops)


def train_self_supervised_encoder(
    records: list[ImageRecord],
    config: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    log: Callable[[int, float], None] | None = None,
) -> tuple[ResNet50Encoder, float]:
    """Pre-train a ResNet50Encoder (initialised as the random encoder of --encoder-seed) by instance
    discrimination on the noisy ``records``; returns it frozen in eval mode, and the final loss."""
    encoder = ResNet50Encoder(config.encoder_stages, config.encoder_seed)
    channels = 256 * 2 ** (config.encoder_stages - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        projection = nn.Sequential(
            nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, PROJECTION_DIM)
        )
    encoder.requires_grad_(True)
    nn.Module.train(encoder, True)  # BatchNorm learns the noisy images' statistics (the class pins eval)
    encoder.to(device), projection.to(device)
    parameters = [*encoder.parameters(), *projection.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=config.encoder_pretrain_lr)
    sampler = CropSampler(records, config.crop_size, generator, raw=False)
    batch_size = min(config.batch_size, len(records))
    loss = torch.tensor(float("nan"))
    for step in range(config.encoder_pretrain_steps):
        batch = sampler.sample(batch_size).to(device)
        first = random_flip(batch.observed_q, generator)
        second = random_flip(batch.observed_k, generator)
        embeddings = projection(encoder(torch.cat([first, second])).mean(dim=(2, 3)))
        loss = instance_contrastive_loss(embeddings[:batch_size], embeddings[batch_size:], ENCODER_TEMPERATURE)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"self-supervised encoder loss became {float(loss.detach())} at step {step + 1}; "
                "try a lower --encoder-pretrain-lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step + 1, float(loss.detach()))
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder.cpu(), float(loss.detach())


def self_supervised_encoder(
    records: list[ImageRecord],
    config: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    say: Callable[[str], None],
) -> tuple[ResNet50Encoder, dict]:
    """The cached self-pre-trained encoder for ``records`` and ``config`` (trained and cached when missing
    or damaged), and its record: file name, path, sha256, cache key, whether it was reused."""
    from safetensors.torch import load_file, save_file

    key = cache_key(records, config)
    path = Path(config.output_dir) / "encoder_cache" / f"self_{key[:16]}.safetensors"
    encoder = ResNet50Encoder(config.encoder_stages, config.encoder_seed)
    reused, final_loss = False, None
    if path.exists():
        try:
            try:
                encoder.load_state_dict(load_file(str(path)))
            except Exception as error:  # safetensors and load_state_dict raise several types
                raise DamagedFileError(path, f"{type(error).__name__}: {error}") from error
            reused = True
        except DamagedFileError as error:
            say(f"  {error}; training the self-supervised encoder again")
    if not reused:
        encoder, final_loss = train_self_supervised_encoder(records, config, device, generator)
        with atomic_path(path) as temporary:
            save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(temporary))
        say(f"  self-supervised encoder: {config.encoder_pretrain_steps} steps, final loss {final_loss:.4g}, {path}")
    record = {
        "file": path.name,
        "path": str(path.resolve()),
        "file_sha256": file_sha256(path),
        "cache_key": key,
        "reused_from_cache": reused,
        "steps": config.encoder_pretrain_steps,
        "final_loss": final_loss,
    }
    return encoder, record
