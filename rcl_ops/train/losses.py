"""Pre-training objectives: RCL (Eq. 5 + Eq. 9-11), noise2noise, noise2self, mosaic2mosaic and supervised
pre-training on a task (the Oracle, "SL (Den)"); MoCo and the pixel-level contrast are in baselines.py.

Each objective is called as ``objective(model, batch, generator) -> (loss, parts)`` with a
``CropBatch`` of two crops of B distinct noisy images; ``parts`` maps names to detached
scalars for logging. Observations x are (B, 3, h, w) RGB or (B, 1, h, w) RGGB RAW; the
model returns RGB images (B, 3, h, w).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ResidualContrastiveLoss, residual_contrastive_loss
from .data import CropBatch
from .diagnostics import contrastive_chance, gradient_norm_ratio, retrieval_accuracy
from .models import ResNet50Encoder
from .noise import keys_translate, mosaic


class Objective(nn.Module):
    """The protocol of every pre-training objective: ``objective(model, batch, generator) -> (loss, parts)``
    plus hooks that default to nothing, so the pre-training loop treats every method alike.

    start: called once before the first step (and before a checkpoint is restored) with the model and the
    sampler's generator. extra_parameters: trainable parameters that are not the model's (optimised with
    it). after_step: after each optimizer step. checkpoint_state: the module whose state is saved with the
    pre-training checkpoints (None: nothing besides the model). step_diagnostics: extra logged numbers of
    the step just computed, on logging steps in a single process (before the backward pass).
    divergence_advice: what to try when the loss becomes non-finite.
    """

    divergence_advice = "a lower --lr"

    def start(self, model: nn.Module, generator: torch.Generator) -> None:
        pass

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def after_step(self, model: nn.Module) -> None:
        pass

    def checkpoint_state(self) -> nn.Module | None:
        return None

    def step_diagnostics(self, model: nn.Module) -> dict[str, float]:
        return {}


def observe(restored: torch.Tensor, raw: bool) -> torch.Tensor:
    """What the sensor would record of an RGB image: itself, or its RGGB mosaic for RAW."""
    return mosaic(restored) if raw else restored


def residual(observed: torch.Tensor, restored: torch.Tensor, raw: bool) -> torch.Tensor:
    """n(x) = x - f(x) (Eq. 4), or x - mosaic(f(x)) for RAW input (Sec. 3.5); shape of ``observed``."""
    return observed - observe(restored, raw)


def reduce_per_crop(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """'mean': the mean of all values; 'sum': each crop's (first dimension) sum, averaged over crops."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.flatten(1).sum(dim=1).mean()
    raise ValueError(f"unknown reduction {reduction!r}; choose mean or sum")


class FeatureConsistencyLoss(nn.Module):
    """Consistency loss (Eq. 9) on (g_e(x) - g_e(f(x)))^2: its mean over all feature values
    (``reduction="mean"``, independent of the crop size) or its sum per crop, the squared L2 norm of
    Eq. 9, averaged over crops (``"sum"``). g_e is the frozen ``encoder``; x and f(x) are (B, 3, h, w).
    """

    def __init__(self, encoder: ResNet50Encoder, reduction: str = "mean"):
        super().__init__()
        self.encoder, self.reduction = encoder, reduction

    def forward(self, observed: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.encoder(observed)
        return reduce_per_crop((self.encoder(restored) - target).square(), self.reduction)


class RawConsistencyLoss(nn.Module):
    """RAW consistency loss (Eq. 11): mean |x - mosaic(T(f(x)))|.

    T is a linear interpolation (Keys cubic convolution): here a translation of f(x) by a
    random sub-pixel offset in [-max_shift, max_shift]^2, drawn per call from the generator.
    Matching the recorded mosaic only through a randomly resampled output means f cannot
    copy the noisy samples into their CFA positions; the loss favours outputs whose
    interpolated values agree with the observation on average, i.e. smooth, denoised ones.
    """

    def __init__(self, max_shift: float = 0.5, reduction: str = "mean"):
        super().__init__()
        if not 0 <= max_shift <= 1:
            raise ValueError(f"RawConsistencyLoss: max_shift must be in [0, 1] pixel, got {max_shift}")
        self.max_shift, self.reduction = max_shift, reduction

    def forward(self, observed: torch.Tensor, restored: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        shift_y, shift_x = ((torch.rand(2, generator=generator) * 2 - 1) * self.max_shift).tolist()
        return reduce_per_crop((observed - mosaic(keys_translate(restored, shift_y, shift_x))).abs(), self.reduction)


@dataclass
class RCLTerms:
    """One RCL step's terms: the weighted ``contrast`` and ``consistency`` (their sum is ``loss``), the
    (B, B) residual ``distances`` and the logged ``parts`` (detached numbers, diagnostics included)."""

    contrast: torch.Tensor
    consistency: torch.Tensor
    distances: torch.Tensor
    parts: dict[str, torch.Tensor | float]

    @property
    def loss(self) -> torch.Tensor:
        return self.contrast + self.consistency


class RCLObjective(Objective):
    """L_total = alpha * L_contrast + consistency_weight * L_consistency (Eq. 10).

    L_contrast is ``rcl_ops.ResidualContrastiveLoss`` on the residuals of the first crops
    (queries, B of them) against those of the second crops (keys): row i's positive is the
    other crop of image i. L_consistency (Eq. 9, or Eq. 11 for RAW) is averaged over all 2B crops;
    ``consistency`` None (with weight 0) leaves it out: the contrastive-only control. With alpha 0, the
    consistency-only control, L_contrast is still computed for the diagnostics.
    """

    def __init__(
        self,
        contrastive: ResidualContrastiveLoss,
        consistency: nn.Module | None,
        alpha: float,
        consistency_weight: float,
        raw: bool,
        distance_scale: float = 1.0,
    ):
        super().__init__()
        self.contrastive, self.consistency = contrastive, consistency
        self.alpha, self.consistency_weight, self.raw = alpha, consistency_weight, raw
        self.distance_scale = distance_scale

    def compute(self, model: nn.Module, batch: CropBatch, generator: torch.Generator) -> RCLTerms:
        """The step's terms, with the diagnostics of the distance matrix in ``parts``."""
        observed = torch.cat([batch.observed_q, batch.observed_k])
        restored = model(observed)
        residuals = residual(observed, restored, self.raw) * self.distance_scale
        half = batch.observed_q.shape[0]
        c = self.contrastive
        distances = c.distance_fn(residuals[:half], residuals[half:], **c.distance_kwargs)
        contrast = residual_contrastive_loss(distances, c.temperature, c.symmetric, c.reduction)
        if self.consistency is None:
            consistency = restored.new_zeros(())
        elif self.raw:
            consistency = self.consistency(observed, restored, generator)
        else:
            consistency = self.consistency(observed, restored)
        detached = distances.detach()
        parts = {
            "contrast": contrast.detach(),
            "consistency": consistency.detach(),
            "contrast_per_query": residual_contrastive_loss(detached, c.temperature, c.symmetric, "mean"),
            "contrast_chance": contrastive_chance(half),
            "retrieval_top1": retrieval_accuracy(detached),
        }
        return RCLTerms(self.alpha * contrast, self.consistency_weight * consistency, distances, parts)

    divergence_advice = "a lower --lr or a larger --temperature"

    def forward(self, model: nn.Module, batch: CropBatch, generator: torch.Generator):
        terms = self.compute(model, batch, generator)
        self._last_terms = terms
        return terms.loss, dict(terms.parts)

    def step_diagnostics(self, model: nn.Module) -> dict[str, float]:
        """How the two terms' gradients compare (``gradient_norm_ratio``), when both train the network: extra
        backward passes through the last step's graph that leave its training gradient unchanged."""
        terms = getattr(self, "_last_terms", None)
        if terms is None or not self.alpha > 0 or self.consistency is None:
            return {}
        return gradient_norm_ratio(terms.contrast, terms.consistency, model.parameters())

    def after_step(self, model: nn.Module) -> None:
        self._last_terms = None  # the step's graph is spent


class Noise2NoiseObjective(Objective):
    """noise2noise: mean (x' - obs(f(x)))^2 with x' a second noisy draw at the same noise level."""

    def __init__(self, raw: bool):
        super().__init__()
        self.raw = raw

    def forward(self, model: nn.Module, batch: CropBatch, generator: torch.Generator):
        if batch.second_q is None:
            raise ValueError("noise2noise needs a second noisy draw of every image (make_records(second_draw=True))")
        observed = torch.cat([batch.observed_q, batch.observed_k])
        target = torch.cat([batch.second_q, batch.second_k])
        loss = F.mse_loss(observe(model(observed), self.raw), target)
        return loss, {"n2n": loss.detach()}


def n2s_mask(height: int, width: int, grid: int, phase: tuple[int, int], device=None) -> torch.Tensor:
    """(1, 1, H, W) bool mask of the pixels (i, j) with i % grid == phase[0] and j % grid == phase[1]."""
    rows = torch.arange(height, device=device) % grid == phase[0]
    cols = torch.arange(width, device=device) % grid == phase[1]
    return (rows[:, None] & cols[None, :])[None, None]


def neighbour_interpolation(x: torch.Tensor, raw: bool) -> torch.Tensor:
    """Each pixel replaced by a weighted mean of its neighbours, excluding itself: (N, C, H, W) -> same.

    RGB: the 3x3 ring with weights [[.5, 1, .5], [1, 0, 1], [.5, 1, .5]] (as in noise2self's
    interpolating masker). RAW: the same ring at distance 2, i.e. same-colour RGGB neighbours.
    Neighbours outside the image are left out and the weights renormalised.
    """
    ring = torch.tensor([[0.5, 1.0, 0.5], [1.0, 0.0, 1.0], [0.5, 1.0, 0.5]], dtype=x.dtype, device=x.device)
    dilation = 2 if raw else 1
    kernel = ring.expand(x.shape[1], 1, 3, 3)
    weighted = F.conv2d(x, kernel, padding=dilation, dilation=dilation, groups=x.shape[1])
    inside = torch.ones_like(x[:1, :1])
    total_weight = F.conv2d(inside, ring[None, None], padding=dilation, dilation=dilation)
    return weighted / total_weight


class Noise2SelfObjective(Objective):
    """noise2self (J-invariant masking): the pixels of one random phase of a ``grid`` x ``grid``
    lattice are replaced by the mean of their neighbours, and the loss is the mean squared
    error between obs(f(masked x)) and x on those pixels only."""

    def __init__(self, grid: int, raw: bool):
        super().__init__()
        minimum = 3 if raw else 2
        if grid < minimum:
            raise ValueError(f"noise2self grid must be >= {minimum} for {'RAW' if raw else 'RGB'} data, got {grid}")
        self.grid, self.raw = grid, raw

    def forward(self, model: nn.Module, batch: CropBatch, generator: torch.Generator):
        observed = torch.cat([batch.observed_q, batch.observed_k])
        phase = tuple(torch.randint(self.grid, (2,), generator=generator).tolist())
        mask = n2s_mask(observed.shape[-2], observed.shape[-1], self.grid, phase, observed.device)
        masked_input = torch.where(mask, neighbour_interpolation(observed, self.raw), observed)
        prediction = observe(model(masked_input), self.raw)
        squared = (prediction - observed).square() * mask
        loss = squared.sum() / (mask.sum() * observed.shape[0] * observed.shape[1])
        return loss, {"n2s": loss.detach()}


class Mosaic2MosaicObjective(Objective):
    """mosaic2mosaic (Ehret et al. 2019) in the simulated setting: the network's RGB output for one noisy
    mosaic, sampled with the RGGB colours of another noisy mosaic of the same scene recorded under a sensor
    shift (a burst frame), against that mosaic: mean |masks_b * f(x_a) - x_b|, summed over colours. The
    shifts move the pattern, so every colour is a target at every pixel over the burst: the network
    learns to demosaic and (the frames' noise being independent) to denoise without clean images. The
    shifts are known integers here; the original estimates the motion of real bursts. L1: with zero-mean
    symmetric noise its minimiser is the clean value, as for the L2 of noise2noise."""

    def forward(self, model: nn.Module, batch: CropBatch, generator: torch.Generator):
        if batch.second_masks_q is None:
            raise ValueError("mosaic2mosaic needs burst frames (CropSampler(burst=True))")
        observed = torch.cat([batch.observed_q, batch.observed_k])
        target = torch.cat([batch.second_q, batch.second_k])
        masks = torch.cat([batch.second_masks_q, batch.second_masks_k])
        prediction = (model(observed) * masks).sum(dim=1, keepdim=True)
        loss = F.l1_loss(prediction, target)
        return loss, {"m2m": loss.detach()}


class SupervisedObjective(Objective):
    """Supervised pre-training on a downstream task, mean |f(x) - y| with clean targets y, on the batches'
    crops of the task's inputs (the Oracle of ``task``, or "SL (<task>)")."""

    def __init__(self, task: str):
        super().__init__()
        self.task = task

    def forward(self, model: nn.Module, batch: CropBatch, generator: torch.Generator):
        if batch.task_q is None:
            raise ValueError(f"supervised pre-training on {self.task} needs its task crops (CropSampler(task=...))")
        inputs = torch.cat([batch.task_q, batch.task_k])
        clean = torch.cat([batch.clean_q, batch.clean_k])
        loss = F.l1_loss(model(inputs), clean)
        return loss, {"l1": loss.detach()}


DISTANCE_SCALES = {"unit": 1.0, "8bit": 255.0}


def contrastive_loss(
    distance: str,
    temperature: float,
    symmetric: bool,
    backend: str,
    emd_quantiles: int | None,
    gather_distributed: bool = False,
    reduction: str = "mean",
) -> ResidualContrastiveLoss:
    """The library's residual contrastive loss with the trainer's options (gather_distributed:
    negatives from every rank, under torchrun)."""
    options: dict = {"backend": backend}
    if distance == "emd" and emd_quantiles is not None:
        options["num_quantiles"] = emd_quantiles
    return ResidualContrastiveLoss(
        distance=distance,
        temperature=temperature,
        symmetric=symmetric,
        reduction=reduction,
        gather_distributed=gather_distributed,
        **options,
    )


def residual_distance_gaps(distances: torch.Tensor) -> torch.Tensor:
    """From a (B, B) distance matrix, the B (B - 1) gaps D[i, j] - D[i, i], j != i
    (negative minus positive distance: positive when the positive pair is the closer one)."""
    batch = distances.shape[0]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=distances.device)
    return (distances - distances.diagonal()[:, None])[off_diagonal]


def fraction_positive(values: torch.Tensor) -> float:
    """Share of values > 0 (NaN if empty)."""
    return float((values > 0).float().mean()) if values.numel() else math.nan
