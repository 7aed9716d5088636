"""The high-level contrastive-learning baselines of Table 1, in their essentials: MoCo v2 on a ResNet-FCN,
and pixel-level contrast (VADeR / PixContrast) on the encoder-decoder.

* ``ResNetFCN``: a small ResNet encoder (``body``) and a deconvolutional decoder (``head``, no skip
  connections), as the paper's MoCo baseline (Long et al. 2015): MoCo pre-trains the encoder and the
  proxy evaluation (replace_head + freeze_all_but_head) fine-tunes exactly the decoder.
* ``MoCoObjective``: MoCo v2 instance discrimination (He et al. 2020; Chen et al. 2020) on the globally
  pooled ``model.features``, with a momentum key encoder and a queue of negatives.
* ``PixelContrastObjective``: pixel-level InfoNCE between two overlapping views of each crop on the dense
  ``model.features`` (Pinheiro et al. 2020; Xie et al. 2021), with a momentum key network and a queue.

Both objectives share ``MomentumContrast`` (the momentum copies and the FIFO queue) and this API for the
trainer, in this order::

    objective.start(model, generator)             # after the model is on its device; then build the optimizer
    optimizer = Adam([*model.parameters(), *objective.extra_parameters()])
    objective.load_state_dict(saved)              # only when resuming, after start()
    for each step:
        loss, parts = objective(model, batch, generator)   # also enqueues this step's keys
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        objective.after_step(model)               # momentum update of the key copies
    checkpoint: objective.state_dict()            # key copies, projections, queue, pointer

The objectives keep no reference to the query model; pass it to every call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import CropBatch
from .encoder_pretraining import random_flip
from .losses import Objective
from .models import RawLayout

# ---------------------------------------------------------------------------------------------
# ResNet-FCN


class ResidualBlock(nn.Module):
    """ResNet basic block: (conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN) + shortcut -> ReLU; the first conv and
    the (1x1 conv + BN) shortcut stride when ``stride`` > 1 or the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetFCN(nn.Module):
    """Fully convolutional ResNet (Long et al. 2015) that predicts the image: f(x) = head(features(x)).

    ``body``: stem (conv 3x3 -> BN -> ReLU, stride 1) and ``stages`` stages of two residual blocks with
    width * 2^stage channels, the first block of every stage after the first striding by 2 (total stride
    2^(stages - 1)). ``head``: the deconvolutional decoder, (stages - 1) x (ConvTranspose2d 4x4 stride 2 ->
    ReLU) halving the channels, then a 3x3 conv to 3 channels; no skip connections, so everything the
    decoder sees is the encoder's output. Any H, W: replicate-padded to a multiple of the total stride and
    cropped back. ``raw=True`` takes an RGGB mosaic (N, 1, H, W), fed as sparse colour planes.
    """

    def __init__(self, width: int = 32, stages: int = 3, raw: bool = False):
        super().__init__()
        if width < 1 or stages < 1:
            raise ValueError(f"ResNetFCN: width and stages must be >= 1, got width={width}, stages={stages}")
        self.raw, self.stages = raw, stages
        self.layout = RawLayout(raw)  # colour planes: the packed layout's half-resolution head is not an FCN's
        channels = [width * 2**stage for stage in range(stages)]
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
        for stage, out_channels in enumerate(channels):
            layers.append(ResidualBlock(in_channels, out_channels, stride=1 if stage == 0 else 2))
            layers.append(ResidualBlock(out_channels, out_channels))
            in_channels = out_channels
        self.body = nn.Sequential(*layers)
        decoder: list[nn.Module] = []
        for stage in reversed(range(1, stages)):
            decoder += [nn.ConvTranspose2d(channels[stage], channels[stage - 1], 4, stride=2, padding=1)]
            decoder.append(nn.ReLU(inplace=True))
        decoder.append(nn.Conv2d(width, 3, 3, padding=1))
        self.head = nn.Sequential(*decoder)

    @property
    def stride(self) -> int:
        """The body's total downsampling factor."""
        return 2 ** (self.stages - 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, Cin, H, W) -> (N, width * 2^(stages - 1), ceil(H / stride), ceil(W / stride)), the head's input."""
        x = self.layout.network_input(x)
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return self.body(x)

    def from_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The output given ``features = self.features(x)``: head(features) cropped to x's H, W."""
        return self.head(features)[..., : x.shape[-2], : x.shape[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3 or 1, H, W) -> the restored image (N, 3, H, W)."""
        return self.from_features(x, self.features(x))


# ---------------------------------------------------------------------------------------------
# the shared momentum-contrast machinery


class MomentumContrast(nn.Module):
    """Momentum (key) copies of a set of query modules and a FIFO queue of negative key embeddings.

    ``reset(queries, generator)``: frozen copies of ``queries`` (a name -> module dict) and a queue of
    ``queue_size`` random unit vectors of dimension ``dim`` (from ``generator``), pointer 0.
    ``update(queries)``: key = momentum * key + (1 - momentum) * query for every parameter, under
    no_grad; buffers (BatchNorm running statistics) are copied from the query modules.
    ``enqueue(keys)``: writes (n, dim) keys at the pointer, wrapping around, and advances it.
    The copies, ``queue`` and ``pointer`` are in the state dict. The key copies are kept in eval mode
    (``key(name)``): BatchNorm normalises keys with the copied running statistics, which replaces
    MoCo's shuffled BatchNorm on one device (no batch statistics shared between a query and its key).
    """

    def __init__(self, queue_size: int, dim: int, momentum: float):
        super().__init__()
        if queue_size < 1 or dim < 1:
            raise ValueError(f"MomentumContrast: queue_size and dim must be >= 1, got {queue_size}, {dim}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"MomentumContrast: momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.copies = nn.ModuleDict()
        self.register_buffer("queue", torch.zeros(queue_size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    def reset(self, queries: dict[str, nn.Module], generator: torch.Generator) -> None:
        copies = {}
        for name, module in queries.items():
            key = copy.deepcopy(module)
            for parameter in key.parameters():
                parameter.grad = None
                parameter.requires_grad_(False)
            copies[name] = key.eval()
        self.copies = nn.ModuleDict(copies)
        queue = torch.randn(self.queue.shape, generator=generator, device=generator.device)
        self.queue = F.normalize(queue, dim=1).to(self.queue.device)
        self.pointer = torch.zeros((), dtype=torch.long, device=self.queue.device)

    def key(self, name: str) -> nn.Module:
        """The momentum copy of ``name``, in eval mode."""
        return self.copies[name].eval()

    @torch.no_grad()
    def update(self, queries: dict[str, nn.Module]) -> None:
        if set(queries) != set(self.copies):
            raise ValueError(f"MomentumContrast.update: expected modules {sorted(self.copies)}, got {sorted(queries)}")
        for name, query in queries.items():
            key = self.copies[name]
            key_parameters, query_parameters = dict(key.named_parameters()), dict(query.named_parameters())
            if key_parameters.keys() != query_parameters.keys():
                raise ValueError(f"MomentumContrast.update: {name!r} does not have the structure of its key copy")
            keys = list(key_parameters.values())
            torch._foreach_mul_(keys, self.momentum)
            torch._foreach_add_(keys, [query_parameters[n].detach() for n in key_parameters], alpha=1 - self.momentum)
            query_buffers = dict(query.named_buffers())
            for buffer_name, buffer in key.named_buffers():
                buffer.copy_(query_buffers[buffer_name])

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = self.queue.shape[0]
        if keys.dim() != 2 or keys.shape[1] != self.queue.shape[1] or keys.shape[0] > size:
            raise ValueError(
                f"MomentumContrast.enqueue: expected (n <= {size}, {self.queue.shape[1]}) keys, got {tuple(keys.shape)}"
            )
        slots = (self.pointer + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue.index_copy_(0, slots, keys.detach().to(self.queue.dtype))
        self.pointer.copy_((self.pointer + keys.shape[0]) % size)


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor, temperature: float):
    """Cross-entropy of (n, D) ``queries`` against (m, D) ``candidates`` (all L2-normalised), row i's positive
    at index ``positive[i]``: (loss, top-1 accuracy of the positive, detached)."""
    logits = queries @ candidates.t() / temperature
    loss = F.cross_entropy(logits, positive)
    accuracy = (logits.detach().argmax(dim=1) == positive).float().mean()
    return loss, accuracy


def projection_mlp(channels: int, out: int) -> nn.Sequential:
    """The projection head of both objectives, applied to (n, channels) rows (pooled features, or single
    pixels' features, where it is the 1x1-conv head): Linear(C, C, no bias) -> LayerNorm(C) -> ReLU ->
    Linear(C, out). The hidden LayerNorm makes the embedding independent of the features' scale (an
    un-normalised U-Net's features are ~0.02 at initialisation, and a bias-dominated plain MLP maps every
    input to nearly the same direction) without batch statistics (nothing shared between a query and its
    key, and the same function in train and eval mode)."""
    return nn.Sequential(
        nn.Linear(channels, channels, bias=False),
        nn.LayerNorm(channels),
        nn.ReLU(inplace=True),
        nn.Linear(channels, out),
    )


def _projection_seed(generator: torch.Generator) -> int:
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def feature_channels(model: nn.Module) -> int:
    """The channel count of ``model.features`` (one small forward pass in eval mode, so BatchNorm
    statistics are not touched; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        channels = 1 if getattr(model, "raw", False) else 3
        probe = torch.zeros(1, channels, 16, 16, device=_model_device(model))
        return int(model.features(probe).shape[1])
    finally:
        model.train(was_training)


def _jitter(views: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Mild random contrast and brightness per image: ((x - mean) * c + mean) * b, with c and b uniform in
    [1 - strength, 1 + strength] from ``generator`` (mean over the image's pixels and channels)."""
    factors = 1 + (torch.rand(2, views.shape[0], generator=generator, device=generator.device) * 2 - 1) * strength
    contrast, brightness = factors.to(views.device, views.dtype).view(2, -1, 1, 1, 1)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    return ((views - mean) * contrast + mean) * brightness


class _MomentumObjective(Objective):
    """The state both objectives share (momentum encoders, queues, a projection head): start,
    extra_parameters, after_step, and the whole objective saved with the checkpoints."""

    contrast: MomentumContrast
    projection_dim: int

    def _make_projection(self, channels: int) -> nn.Module:
        return projection_mlp(channels, self.projection_dim)

    def start(self, model: nn.Module, generator: torch.Generator) -> None:
        """(Re)initialise for a new run from ``model``'s current weights: the query projection from a seed
        drawn from ``generator``, the key copies of the model and the projection, the queue from
        ``generator``, pointer 0; everything moved to the model's device."""
        channels = feature_channels(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_projection_seed(generator))
            self.projection = self._make_projection(channels)
        self.to(_model_device(model))
        self.contrast.reset({"model": model, "projection": self.projection}, generator)

    def _check_started(self) -> None:
        if not hasattr(self, "projection"):
            raise RuntimeError(f"{type(self).__name__}: call start(model, generator) before using the objective")

    def extra_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters that are not the model's (the query projection): add them to the optimizer."""
        self._check_started()
        return list(self.projection.parameters())

    def after_step(self, model: nn.Module) -> None:
        """The momentum update of the key copies, after optimizer.step()."""
        self._check_started()
        self.contrast.update({"model": model, "projection": self.projection})

    def checkpoint_state(self) -> nn.Module:
        return self


class MoCoObjective(_MomentumObjective):
    """MoCo v2 (He et al. 2020; Chen et al. 2020) on ``model.features``.

    Views: the two crops of each image (``batch.observed_q`` and ``observed_k``), each randomly flipped
    horizontally (not for RAW mosaics, where a flip would change the RGGB phase) and jittered in brightness
    and contrast (``jitter``). Query: global average pool of model.features(view) -> ``projection_mlp``
    (C -> C -> projection_dim) -> L2 normalisation; key: the same through the momentum copies. Logits
    [q . k_pos, q . queue] / temperature, cross-entropy with the positive at index 0; then the keys are
    enqueued.
    """

    def __init__(
        self,
        momentum: float = 0.99,
        queue_size: int = 1024,
        temperature: float = 0.2,
        projection_dim: int = 128,
        jitter: float = 0.2,
    ):
        super().__init__()
        # MoCo's 0.999 suits ~10^6 ImageNet steps; our runs are a few thousand steps, where a key encoder
        # averaging over ~1000 steps would lag behind for most of the run. 0.99 averages over ~100 steps.
        if temperature <= 0 or not 0 <= jitter < 1:
            raise ValueError(f"MoCoObjective: need temperature > 0 and 0 <= jitter < 1, got {temperature}, {jitter}")
        self.temperature, self.jitter = temperature, jitter
        self.projection_dim = projection_dim
        self.contrast = MomentumContrast(queue_size, projection_dim, momentum)

    def _augment(self, crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if crops.shape[1] != 1:
            crops = random_flip(crops, generator)
        return _jitter(crops, self.jitter, generator)

    def embeddings(self, model: nn.Module, batch: CropBatch, generator: torch.Generator):
        """(q, k): the (B, projection_dim) normalised query embeddings (with gradient) and keys (without)."""
        self._check_started()
        first = self._augment(batch.observed_q, generator)
        second = self._augment(batch.observed_k, generator)
        q = F.normalize(self.projection(model.features(first).mean(dim=(2, 3))), dim=1)
        with torch.no_grad():
            key_features = self.contrast.key("model").features(second).mean(dim=(2, 3))
            k = F.normalize(self.contrast.key("projection")(key_features), dim=1)
        return q, k

    def forward(self, model: nn.Module, batch: CropBatch, generator: torch.Generator):
        q, k = self.embeddings(model, batch, generator)
        # row i: its own key, then the queue (the other rows' keys are not negatives, as in MoCo); the queue
        # is cloned because enqueue() overwrites it before the backward pass
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ self.contrast.queue.clone().t()], dim=1)
        logits = logits / self.temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
        self.contrast.enqueue(k)
        return loss, {"moco": loss.detach(), "moco_top1": accuracy}


@dataclass
class PixelViews:
    """Two views of each crop and the sampled corresponding pixels: ``first``/``second`` (B, C, vh, vw);
    ``index_first``/``index_second`` (B, P) flat indices (row * vw + column) into each view of the same
    scene pixels; ``scene`` (B, P, 2) their (row, column) in the crop."""

    first: torch.Tensor
    second: torch.Tensor
    index_first: torch.Tensor
    index_second: torch.Tensor
    scene: torch.Tensor


def overlapping_views(
    crops: torch.Tensor, view_fraction: float, pixels: int, flip: bool, generator: torch.Generator
) -> PixelViews:
    """Two sub-crops of side round(view_fraction * side) of each (B, C, h, w) crop at independent random
    offsets, each flipped horizontally with probability 1/2 when ``flip``, and ``pixels`` distinct scene
    positions per crop sampled uniformly inside the two views' overlap. RAW mosaics (C = 1) get even view
    sides and offsets (the RGGB phase is kept) and no flips. All randomness from ``generator``."""
    batch, channels, height, width = crops.shape
    raw = channels == 1
    step = 2 if raw else 1
    view_h = max(step, int(round(view_fraction * height)) // step * step)
    view_w = max(step, int(round(view_fraction * width)) // step * step)
    least_overlap = (2 * view_h - height) * (2 * view_w - width)
    if 2 * view_h <= height or 2 * view_w <= width or least_overlap < pixels:
        raise ValueError(
            f"pixel contrast: views of {view_h}x{view_w} in {height}x{width} crops may overlap in fewer than "
            f"{pixels} pixels (at least {max(least_overlap, 0)}); use larger crops, a larger view_fraction or "
            "fewer pixels_per_image"
        )
    cpu = generator.device
    tops = torch.randint((height - view_h) // step + 1, (2, batch), generator=generator, device=cpu) * step
    lefts = torch.randint((width - view_w) // step + 1, (2, batch), generator=generator, device=cpu) * step
    flips = torch.rand(2, batch, generator=generator, device=cpu) < 0.5
    if not flip or raw:
        flips = torch.zeros_like(flips)
    scene = []
    for b in range(batch):
        top, left = int(tops[:, b].max()), int(lefts[:, b].max())
        rows = int(tops[:, b].min()) + view_h - top
        cols = int(lefts[:, b].min()) + view_w - left
        chosen = torch.randperm(rows * cols, generator=generator, device=cpu)[:pixels]
        scene.append(torch.stack([top + chosen // cols, left + chosen % cols], dim=1))
    scene = torch.stack(scene)  # (B, P, 2)
    row_offsets, column_offsets = torch.arange(view_h), torch.arange(view_w)
    views, indices = [], []
    for v in range(2):
        rows = tops[v][:, None] + row_offsets  # (B, vh)
        columns = lefts[v][:, None] + torch.where(flips[v][:, None], view_w - 1 - column_offsets, column_offsets)
        image = torch.arange(batch)[:, None, None]
        view = crops[image.to(crops.device), :, rows[:, :, None].to(crops.device), columns[:, None, :].to(crops.device)]
        views.append(view.permute(0, 3, 1, 2).contiguous())  # (B, vh, vw, C) -> (B, C, vh, vw)
        view_row = scene[..., 0] - tops[v][:, None]
        view_column = scene[..., 1] - lefts[v][:, None]
        view_column = torch.where(flips[v][:, None], view_w - 1 - view_column, view_column)
        indices.append((view_row * view_w + view_column).to(crops.device))
    return PixelViews(views[0], views[1], indices[0], indices[1], scene.to(crops.device))


def gather_pixels(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps at (B, P) flat indices -> (B, C, P)."""
    flat = maps.flatten(2)
    return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1))


class PixelContrastObjective(_MomentumObjective):
    """Pixel-level contrast (VADeR, Pinheiro et al. 2020; PixContrast, Xie et al. 2021) for an
    encoder-decoder whose ``features`` are dense at the input resolution (the U-Net).

    Two overlapping views of each crop of ``batch.observed_q`` (``overlapping_views``), brightness/contrast
    jittered; query: model.features(view 1) at ``pixels_per_image`` sampled scene pixels -> per-pixel
    projection (``projection_mlp`` C -> C -> projection_dim, i.e. 1x1 convs) -> L2 normalisation; keys: view 2
    through the momentum copies. Each query pixel's positive is the same scene pixel in view 2; its
    negatives are the other B * P - 1 key pixels of the batch and the queue. InfoNCE / temperature;
    then the keys are enqueued.
    """

    def __init__(
        self,
        momentum: float = 0.99,
        queue_size: int = 2048,
        temperature: float = 0.2,
        projection_dim: int = 64,
        pixels_per_image: int = 32,
        view_fraction: float = 0.75,
        jitter: float = 0.2,
        flip: bool = True,
    ):
        super().__init__()
        if not 0.5 < view_fraction <= 1:
            raise ValueError(f"PixelContrastObjective: view_fraction must be in (0.5, 1], got {view_fraction}")
        if temperature <= 0 or pixels_per_image < 1 or not 0 <= jitter < 1:
            raise ValueError(
                "PixelContrastObjective: need temperature > 0, pixels_per_image >= 1 and 0 <= jitter < 1, got "
                f"{temperature}, {pixels_per_image}, {jitter}"
            )
        # momentum 0.99 rather than MoCo's 0.999: see MoCoObjective (short runs)
        self.temperature, self.jitter, self.flip = temperature, jitter, flip
        self.pixels_per_image, self.view_fraction = pixels_per_image, view_fraction
        self.projection_dim = projection_dim
        self.contrast = MomentumContrast(queue_size, projection_dim, momentum)

    def _embed(self, model: nn.Module, projection: nn.Module, view: torch.Tensor, index: torch.Tensor):
        maps = model.features(view)
        if maps.shape[-2:] != view.shape[-2:]:
            raise ValueError(
                f"pixel contrast needs features at the input resolution, got {tuple(maps.shape[-2:])} "
                f"for a view of {tuple(view.shape[-2:])}"
            )
        # the per-pixel projection (1x1 convs) applied to the sampled pixels only, as rows of (B * P, C)
        pixels = gather_pixels(maps, index).permute(0, 2, 1).flatten(0, 1)
        return F.normalize(projection(pixels), dim=1)  # (B * P, D)

    def embeddings(self, model: nn.Module, batch: CropBatch, generator: torch.Generator):
        """(q, k): (B * P, projection_dim) normalised query pixel embeddings (with gradient) and the keys of
        the same scene pixels (without), image-major."""
        self._check_started()
        views = overlapping_views(batch.observed_q, self.view_fraction, self.pixels_per_image, self.flip, generator)
        first = _jitter(views.first, self.jitter, generator)
        second = _jitter(views.second, self.jitter, generator)
        q = self._embed(model, self.projection, first, views.index_first)
        with torch.no_grad():
            k = self._embed(self.contrast.key("model"), self.contrast.key("projection"), second, views.index_second)
        return q, k

    def forward(self, model: nn.Module, batch: CropBatch, generator: torch.Generator):
        q, k = self.embeddings(model, batch, generator)
        candidates = torch.cat([k, self.contrast.queue.clone()])
        target = torch.arange(q.shape[0], device=q.device)
        loss, accuracy = info_nce(q, candidates, target, self.temperature)
        self.contrast.enqueue(k)
        return loss, {"pixcl": loss.detach(), "pixcl_top1": accuracy}
