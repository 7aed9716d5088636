"""Metrics (PSNR, SSIM with scikit-image's conventions) and the proxy evaluation of Sec. 4.1.3.

Proxy evaluation: copy the pre-trained network, replace its last layer (``head``) by a freshly
initialised one (all zeros for a network that predicts the residual, so that it starts at the identity,
f(x) = x, or the bilinear demosaic for RAW), freeze everything else (BatchNorm statistics included), fine-tune the head
with L1 on a labelled subset of the training images, and report PSNR/SSIM on the test set.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import CropSampler, ImageRecord
from .models import freeze_all_but_head, replace_head, scale_head_
from .noise import restoration_base


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (Eq. 12): 10 log10(data_range^2 / MSE).

    prediction, target: (N, C, H, W). Returns (N,) float64 (inf where MSE is 0), as
    ``skimage.metrics.peak_signal_noise_ratio(target, prediction, data_range=data_range)``.
    """
    _check_pair(prediction, target, "psnr")
    mse = (prediction.double() - target.double()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Mean structural similarity per image (Eq. 13) with scikit-image's default conventions.

    prediction, target: (N, C, H, W), H and W >= win_size. As
    ``skimage.metrics.structural_similarity(target, prediction, data_range=data_range,
    channel_axis=...)``: a uniform win_size x win_size window, sample (N-1) covariances,
    K1 = 0.01, K2 = 0.03, alpha = beta = gamma = 1, the map averaged over the pixels whose
    window lies inside the image, then over channels. Returns (N,) float64.
    """
    _check_pair(prediction, target, "ssim")
    if win_size % 2 == 0 or min(prediction.shape[-2:]) < win_size:
        raise ValueError(
            f"ssim: win_size must be odd and at most the image size, got {win_size} "
            f"for images of size {tuple(prediction.shape[-2:])}"
        )
    x, y = prediction.double(), target.double()
    channels = x.shape[1]
    # the uniform window is separable: a row then a column mean (2 w instead of w^2 taps per pixel)
    row = torch.full((channels, 1, 1, win_size), 1.0 / win_size, dtype=x.dtype, device=x.device)
    column = row.transpose(2, 3)

    def local_mean(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(image, row, groups=channels), column, groups=channels)

    num_points = win_size**2
    covariance_norm = num_points / (num_points - 1)
    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = covariance_norm * (local_mean(x * x) - mean_x * mean_x)
    var_y = covariance_norm * (local_mean(y * y) - mean_y * mean_y)
    cov_xy = covariance_norm * (local_mean(x * y) - mean_x * mean_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / (
        (mean_x.square() + mean_y.square() + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)


def _check_pair(prediction: torch.Tensor, target: torch.Tensor, where: str) -> None:
    if prediction.dim() != 4 or prediction.shape != target.shape:
        raise ValueError(
            f"{where}: expected two (N, C, H, W) tensors of the same shape, "
            f"got {tuple(prediction.shape)} and {tuple(target.shape)}"
        )


def center_crop(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """The central size x size window of (..., H, W) (even offsets, so RGGB phase is kept); None keeps all."""
    if size is None:
        return image
    height, width = image.shape[-2:]
    top, left = max(0, (height - size) // 4 * 2), max(0, (width - size) // 4 * 2)
    return image[..., top : top + size, left : left + size]


@dataclass
class TestScores:
    """Per-image PSNR/SSIM on the test set, their means, and a few (input, output, target) examples."""

    psnr: list[float]
    ssim: list[float]
    examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def mean_psnr(self) -> float:
        return sum(self.psnr) / len(self.psnr)

    @property
    def mean_ssim(self) -> float:
        return sum(self.ssim) / len(self.ssim)


@torch.no_grad()
def evaluate_restorer(
    restore: Callable[[torch.Tensor], torch.Tensor],
    records: list[ImageRecord],
    task: str,
    device: torch.device,
    eval_crop: int | None = None,
    keep_examples: int = 0,
) -> TestScores:
    """Run ``restore`` on each test image's task input (whole image, or its central ``eval_crop``),
    clip to [0, 1], and score against the clean image."""
    psnrs, ssims, examples = [], [], []
    for index, record in enumerate(records):
        inputs = center_crop(record.task_inputs[task], eval_crop)[None].to(device)
        target = center_crop(record.clean, eval_crop)[None].to(device)
        output = restore(inputs).clamp(0, 1)
        psnrs.append(float(psnr(output, target)[0]))
        if math.isnan(psnrs[-1]):
            raise FloatingPointError(f"the network's output on the {task} test image {record.name} is not a number")
        ssims.append(float(ssim(output, target)[0]))
        if index < keep_examples:
            examples.append((inputs[0].cpu(), output[0].cpu(), target[0].cpu()))
    return TestScores(psnrs, ssims, examples)


def evaluate_naive(
    records: list[ImageRecord], task: str, modality: str, eval_crop: int | None, keep_examples: int = 0
) -> TestScores:
    """Scores of the task input itself (no network): the floor every method should beat."""
    return evaluate_restorer(
        lambda x: restoration_base(x, modality == "raw"), records, task, torch.device("cpu"), eval_crop, keep_examples
    )


@dataclass
class ProxySettings:
    """Fine-tuning settings of the proxy evaluation."""

    steps: int
    batch_size: int
    crop_size: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    schedule: str = "constant"


SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(optimizer: torch.optim.Optimizer, schedule: str, steps: int):
    """A scheduler stepped once per optimisation step: 'cosine' anneals the learning rate from its value
    to 0 over ``steps`` (so the last steps refine rather than jump around), 'constant' keeps it."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose from {SCHEDULES}")


def fit_l1(
    predict: Callable[[torch.Tensor], torch.Tensor],
    parameters: list[nn.Parameter],
    task: str,
    labelled: list[ImageRecord],
    settings: ProxySettings,
    generator: torch.Generator,
    device: torch.device,
    raw: bool,
    advice: str,
    on_step: Callable[[int, float], None] | None = None,
    progress: Callable | None = None,
) -> float:
    """``settings.steps`` Adam steps (with ``settings.schedule``) on ``parameters`` of the L1 loss between
    ``predict(inputs)`` and the clean targets of random ``task`` crops of ``labelled``; returns the seconds.
    A non-finite loss raises FloatingPointError naming the step and ``advice``."""
    optimizer = torch.optim.Adam(parameters, lr=settings.lr, betas=settings.betas, eps=settings.eps)
    scheduler = learning_rate_schedule(optimizer, settings.schedule, settings.steps)
    sampler = CropSampler(labelled, settings.crop_size, generator, raw=raw)
    started = time.perf_counter()
    steps = range(settings.steps) if progress is None else progress(range(settings.steps))
    for step in steps:
        inputs, targets = sampler.sample_task(task, settings.batch_size)
        loss = F.l1_loss(predict(inputs.to(device)), targets.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"L1 loss on {task} became {float(loss.detach())} at step {step + 1}; {advice}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(step + 1, float(loss.detach()))
    # the loss is checked before each update; the weights after the last one
    if not all(bool(torch.isfinite(p).all()) for p in parameters):
        raise FloatingPointError(
            f"the last update of L1 training on {task} (step {settings.steps}) left non-finite weights; {advice}"
        )
    return time.perf_counter() - started


def proxy_evaluate(
    pretrained: nn.Module,
    task: str,
    labelled: list[ImageRecord],
    test: list[ImageRecord],
    settings: ProxySettings,
    generator: torch.Generator,
    device: torch.device,
    raw: bool,
    eval_crop: int | None = None,
    keep_examples: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    progress: Callable | None = None,
) -> tuple[nn.Module, TestScores, float]:
    """Fine-tune a fresh head on top of the frozen ``pretrained`` network and score it on ``test``.

    Returns (the fine-tuned copy, its test scores, the fine-tuning seconds). ``pretrained`` is
    not modified. The frozen part stays in eval mode (BatchNorm uses its running statistics
    and does not update them), so only the head's parameters change.
    """
    model = copy.deepcopy(pretrained).to(device)
    replace_head(model, generator)
    if getattr(model, "predicts_residual", False):
        # a residual network's fresh head starts at the identity, f(x) = base(x); replace_head's draws are kept,
        # so the fine-tuning crops that follow from ``generator`` are those of any other network
        scale_head_(model.head, 0.0)
    head_parameters = freeze_all_but_head(model)
    model.eval()

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = model.features(inputs)
        return model.from_features(inputs, features)

    advice = "fine-tuning diverged; try a lower --finetune-lr"
    seconds = fit_l1(
        predict, head_parameters, task, labelled, settings, generator, device, raw, advice, on_step, progress
    )
    try:
        scores = evaluate_restorer(model, test, task, device, eval_crop, keep_examples)
    except FloatingPointError as error:
        raise FloatingPointError(f"{error} after fine-tuning; {advice}") from error
    return model, scores, seconds


def train_supervised(
    model: nn.Module,
    task: str,
    labelled: list[ImageRecord],
    settings: ProxySettings,
    generator: torch.Generator,
    device: torch.device,
    raw: bool,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train every layer of ``model`` (in place) with L1 on ``labelled`` for ``settings.steps`` steps: SL
    from scratch, or RCL+SL when ``model`` is pre-trained (Tables 3 and 5). Returns the seconds taken."""
    model.to(device).train()
    advice = "supervised training diverged; try a lower --sl-lr"
    seconds = fit_l1(model, list(model.parameters()), task, labelled, settings, generator, device, raw, advice, on_step)
    model.eval()
    return seconds
