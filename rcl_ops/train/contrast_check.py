"""Does the contrastive term reward denoising? Residual distances on fixed crop pairs of the training data.

Before an RCL pre-training the trainer compares, on the same crop pairs and with the run's distance, scale
and temperature, the InfoNCE loss per query (Eq. 5, mean over queries) of three residuals:

- an ideal denoiser's, the true noise x - obs(y);
- the network's at step 0 (what pre-training starts from);
- an over-smoothing denoiser's, x - obs(blur(x)) (a Gaussian blur of 1.5 pixels: noise plus image edges),
  for information: a loss that prefers it to the true noise rewards keeping image content in the residual.

The contrastive term rewards denoising when the true noise scores lower than the network at step 0, on
``CHECK_BATCHES`` batches of crop pairs (a generator seeded by --split-seed; the first --density-batches of
them give the Fig. 2 distance gaps).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import rcl_ops

from .data import CropBatch, CropSampler
from .diagnostics import contrastive_chance, retrieval_accuracy
from .losses import residual
from .noise import restoration_base
from .seeding import seeded_generator

OVERSMOOTHING_SIGMA = 1.5  # pixels: a blur that removes most noise and the finest image detail
# Crop-pair batches of the check. The loss per batch is heavy-tailed (heteroscedastic noise: the two crops
# of one image can differ in brightness and so in noise level; on the quick data the true noise's EMD loss
# had median 0.24 and maximum 17 over 32 batches), so a mean over a handful of batches can flip the answer
# (6 batches did, 32 did not).
CHECK_BATCHES = 32
PAIRWISE = rcl_ops.DISTANCES  # the library's distance functions by name


def gaussian_blur(images: torch.Tensor, sigma: float = OVERSMOOTHING_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) images, reflect-padded, truncated at 3 sigma."""
    radius = max(1, int(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    blurred = F.pad(images, (radius,) * 4, mode="reflect")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def crop_pair_batches(records: list, crop_size: int, batch_size: int, count: int, seed: int, raw: bool):
    """``count`` fixed batches of crop pairs (at most ``batch_size`` distinct images each); [] when fewer
    than two images. The same seed gives the same crops, so every model is measured on the same pairs."""
    batch_size = min(len(records), batch_size)
    if batch_size < 2:
        return []
    sampler = CropSampler(records, crop_size, seeded_generator(seed, "density"), raw)
    return [sampler.sample(batch_size) for _ in range(count)]


ResidualFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (observed, clean) -> residual


@torch.no_grad()
def residual_distances(
    residual_of: ResidualFn, batches: list[CropBatch], distance_fn: Callable, scale: float, device: torch.device
) -> list[torch.Tensor]:
    """The (B, B) distances d(r(x_i), r(x'_j)) of each batch, the residuals multiplied by ``scale``."""
    matrices = []
    for batch in batches:
        batch = batch.to(device)
        q = residual_of(batch.observed_q, batch.clean_q) * scale
        k = residual_of(batch.observed_k, batch.clean_k) * scale
        matrices.append(distance_fn(q, k).cpu())
    return matrices


def true_noise(raw: bool) -> ResidualFn:
    """The residual of an ideal denoiser: x - obs(y)."""
    return lambda observed, clean: residual(observed, clean, raw)


def network_residual(model: nn.Module, raw: bool) -> ResidualFn:
    """The residual x - obs(f(x)) of ``model`` as it is (its train/eval mode is the caller's)."""
    return lambda observed, clean: residual(observed, model(observed), raw)


def oversmoothing_residual(raw: bool) -> ResidualFn:
    """The residual of a Gaussian-blur denoiser (of the bilinear demosaic for RAW)."""
    return lambda observed, clean: residual(observed, gaussian_blur(restoration_base(observed, raw)), raw)


def contrast_per_query(matrices: list[torch.Tensor], temperature: float, symmetric: bool) -> float:
    """The InfoNCE loss per query, averaged over the batches' (B, B) distance matrices."""
    return statistics.fmean(
        float(rcl_ops.residual_contrastive_loss(d, temperature, symmetric, "mean")) for d in matrices
    )


def _score(residual_of: ResidualFn, batches, distance_fn, scale, temperature, symmetric, device) -> tuple[float, float]:
    """(InfoNCE loss per query, top-1 retrieval) of ``residual_of``'s residuals, averaged over the batches."""
    matrices = residual_distances(residual_of, batches, distance_fn, scale, device)
    return contrast_per_query(matrices, temperature, symmetric), statistics.fmean(map(retrieval_accuracy, matrices))


def reference_scores(
    batches: list[CropBatch],
    distance_fn: Callable,
    scale: float,
    temperature: float,
    symmetric: bool,
    raw: bool,
    device: torch.device,
) -> dict:
    """The scores that do not depend on the network: the true noise's ("ideal") and the over-smoothing
    denoiser's, with their top-1 retrieval and chance (ln B); computed once per distance, shared by the seeds."""
    options = (batches, distance_fn, scale, temperature, symmetric, device)
    (ideal, ideal_top1), (smooth, smooth_top1) = (
        _score(true_noise(raw), *options),
        _score(oversmoothing_residual(raw), *options),
    )
    return {
        "ideal": ideal,
        "oversmoothing": smooth,
        "ideal_top1": ideal_top1,
        "oversmoothing_top1": smooth_top1,
        "chance": contrastive_chance(batches[0].observed_q.shape[0]),
    }


def check_contrast(
    model: nn.Module,
    batches: list[CropBatch],
    distance_fn: Callable,
    scale: float,
    temperature: float,
    symmetric: bool,
    raw: bool,
    device: torch.device,
    references: dict | None = None,
) -> dict:
    """The InfoNCE loss per query of the true noise ("ideal"), of ``model``'s residuals as at step 0 of
    training ("step0": a copy in train mode, so BatchNorm uses batch statistics and ``model`` is left
    untouched) and of the over-smoothing denoiser; ``rewards_denoising``: ideal < step0. ``references``:
    ``reference_scores`` of the same batches and settings, when already computed."""
    options = (batches, distance_fn, scale, temperature, symmetric, raw, device)
    references = references or reference_scores(*options)
    network = copy.deepcopy(model).to(device).train()
    step0, step0_top1 = _score(
        network_residual(network, raw), batches, distance_fn, scale, temperature, symmetric, device
    )
    return {
        "ideal": references["ideal"],
        "step0": step0,
        "oversmoothing": references["oversmoothing"],
        "ideal_top1": references["ideal_top1"],
        "step0_top1": step0_top1,
        "oversmoothing_top1": references["oversmoothing_top1"],
        "chance": references["chance"],
        "rewards_denoising": references["ideal"] < step0,
    }


def check_sentence(check: dict) -> str:
    """'an ideal denoiser scores X, the network at step 0 scores Y: the contrastive term rewards denoising:
    yes/no', with the over-smoothing reference and chance."""
    verdict = "yes" if check["rewards_denoising"] else "NO"
    prefers_content = (
        "; an over-smoothing denoiser (blur, noise + image edges in its residual) scores lower still: the loss "
        "also rewards keeping image content"
        if check["oversmoothing"] < check["ideal"]
        else ""
    )
    return (
        f"L_contrast per query: an ideal denoiser (the true noise) scores {check['ideal']:.3f}, the network at "
        f"step 0 scores {check['step0']:.3f} (chance ln B = {check['chance']:.3f}; over-smoothing denoiser "
        f"{check['oversmoothing']:.3f}): the contrastive term rewards denoising: {verdict}{prefers_content}"
    )


def distance_matrices_of(
    model: nn.Module | None, batches: list[CropBatch], distance: str, scale: float, backend: str, raw: bool, device
) -> list[torch.Tensor]:
    """Fig. 2's distances: ``model``'s residuals (in eval mode) or, for None, the true noise's."""
    if model is not None:
        model.eval()
    residual_of = true_noise(raw) if model is None else network_residual(model, raw)
    distance_fn = lambda q, k: PAIRWISE[distance](q, k, backend=backend)  # noqa: E731
    return residual_distances(residual_of, batches, distance_fn, scale, device)
