"""Image data for the trainer: fixed noisy observations, the tasks' inputs and random crops (loading, the
train/test split and tiles: images.py).

Clean images are (3, H, W) float32 tensors in [0, 1] (grey images are replicated to three
channels). Each image gets its own noise level (Eq. 16-17) and one fixed noisy observation
(plus, for noise2noise, a second independent draw at the same level), seeded from
``noise_seed`` and the image's ``seed_name`` (its path inside the data folder, a bundled image's name), so
every method and every training seed sees the same noisy data set, as a real collection of noisy
photographs would be, wherever the folder lies.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .images import CleanImage, check_image_sizes
from .noise import (
    NoiseLevel,
    add_noise,
    bayer_masks_at,
    demosaic_bilinear,
    downsample,
    mosaic,
    sample_noise_level,
    upsample,
)

MODALITIES = ("rgb", "raw")


def image_seed(base_seed: int, name: str, draw: int) -> np.random.Generator:
    """A numpy generator determined by (base_seed, image name, draw index)."""
    return np.random.default_rng([base_seed, zlib.crc32(name.encode()), draw])


@dataclass
class ImageRecord:
    """One image of the experiment.

    clean: (3, H, W) RGB ground truth. observed: the noisy observation, (3, H, W) for RGB or
    (1, H, W) for RAW (mosaicked, then noise added). observed_second: an independent noisy
    draw at the same noise level (noise2noise), or None. observed_clean: what the sensor
    would see without noise (clean, or mosaic(clean) for RAW). H and W are even (multiples of 4 when a
    task needs it). burst: mosaic2mosaic's extra frames of the same scene (RAW), each
    ((dy, dx), frame): the sensor moved by (dy, dx) pixels, so frame[i, j] records the scene at
    (i - dy, j - dx) with the pattern's colour at (i, j) (top rows/left columns replicated), and its own
    noise at the image's level; empty unless asked for.
    """

    name: str
    clean: torch.Tensor
    observed: torch.Tensor
    observed_clean: torch.Tensor
    noise_level: NoiseLevel | None
    observed_second: torch.Tensor | None = None
    task_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    burst: list[tuple[tuple[int, int], torch.Tensor]] = field(default_factory=list)
    seed_name: str | None = None  # what its noise is seeded from (CleanImage.seed_name); None: name

    def __post_init__(self):
        if self.seed_name is None:
            self.seed_name = self.name


# mosaic2mosaic's sensor shifts, one frame each: an odd shift changes the colour the sensor records at a scene
# pixel; with the unshifted frame (a second draw, as noise2noise's) every colour is a target at every
# pattern position (without it, nothing would teach red at the red sites).
BURST_SHIFTS = ((0, 0), (0, 1), (1, 0), (1, 1))


def shifted_frame(clean: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """The (3, H, W) scene as a sensor moved by ``shift`` = (dy, dx) >= 0 sees it: pixel (i, j) shows the
    scene at (i - dy, j - dx), the first dy rows / dx columns replicating the scene's edge."""
    dy, dx = shift
    padded = torch.nn.functional.pad(clean[None], (dx, 0, dy, 0), mode="replicate")[0]
    return padded[:, : clean.shape[1], : clean.shape[2]].contiguous()


def make_records(
    images: list[CleanImage],
    modality: str,
    sigma_min: float,
    sigma_max: float,
    noise_seed: int,
    second_draw: bool,
    burst: bool = False,
    multiple: int = 2,
) -> list[ImageRecord]:
    """Crop each image to a multiple of ``multiple`` (even at least), draw its noise level and noisy
    observation(s) (``burst``: also mosaic2mosaic's shifted frames, RAW only); an image with a real noisy
    twin (``CleanImage.noisy``) keeps it as its observation (no noise level, no second draw)."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of {MODALITIES}")
    if burst and modality != "raw":
        raise ValueError("mosaic2mosaic bursts are RAW mosaics: use modality raw")
    if multiple < 2 or multiple % 2:
        raise ValueError(f"multiple must be an even number >= 2, got {multiple}")
    records = []
    for img in images:
        height, width = img.pixels.shape[1] // multiple * multiple, img.pixels.shape[2] // multiple * multiple
        clean = img.pixels[:, :height, :width].contiguous()
        observed_clean = mosaic(clean) if modality == "raw" else clean
        if img.noisy is not None:
            if modality != "rgb":
                raise ValueError("real noisy images (SIDD layout) are sRGB: use modality rgb")
            observed = img.noisy[:, :height, :width].contiguous()
            records.append(ImageRecord(img.name, clean, observed, observed_clean, None, None, seed_name=img.seed_name))
            continue
        name = img.seed_name
        level = sample_noise_level(image_seed(noise_seed, name, 0), sigma_min, sigma_max)
        observed = add_noise(observed_clean, level, image_seed(noise_seed, name, 1))
        second = add_noise(observed_clean, level, image_seed(noise_seed, name, 2)) if second_draw else None
        frames = [
            (shift, add_noise(mosaic(shifted_frame(clean, shift)), level, image_seed(noise_seed, name, 10 + n)))
            for n, shift in enumerate(BURST_SHIFTS if burst else ())
        ]
        records.append(
            ImageRecord(img.name, clean, observed, observed_clean, level, second, burst=frames, seed_name=name)
        )
    return records


# Downstream tasks of the proxy evaluation per modality (the target is always the clean RGB image at full
# resolution). RGB: Tables 1-2; RAW: Table 4.
RGB_TASKS = ("denoise", "sr2", "sr4", "jdensr2")
RAW_TASKS = ("jdd", "jdemsr2", "jddsr2")
TASKS = RGB_TASKS + RAW_TASKS
MODALITY_TASKS = {"rgb": RGB_TASKS, "raw": RAW_TASKS}
DENOISING_TASK = {"rgb": "denoise", "raw": "jdd"}  # the label study's task; "denoise" means jdd for RAW
TASK_TITLES = {
    "denoise": "Denoising",
    "sr2": "SR x2",
    "sr4": "SR x4",
    "jdensr2": "JDenSR x2",
    "jdd": "JDD",
    "jdemsr2": "JDemSR x2",
    "jddsr2": "JDDSR x2",
}
# Each image's height and width must be a multiple of this for the task (the low-resolution image of a RAW
# task is itself a mosaic, so it must be even).
TASK_MULTIPLE = {"denoise": 2, "sr2": 2, "sr4": 4, "jdensr2": 2, "jdd": 2, "jdemsr2": 4, "jddsr2": 4}
TASK_SCALE = {"sr2": 2, "sr4": 4, "jdensr2": 2, "jdemsr2": 2, "jddsr2": 2}
NOISY_TASKS = ("denoise", "jdensr2", "jdd", "jddsr2")


def canonical_task(task: str, modality: str) -> str:
    """The task's name for ``modality``: 'denoise' on RAW data is 'jdd' (the noisy mosaic to the clean
    RGB image); ValueError for a task the modality does not define."""
    if modality == "raw" and task == "denoise":
        task = "jdd"
    if task not in MODALITY_TASKS[modality]:
        other = "raw" if modality == "rgb" else "rgb"
        where = f" (a --modality {other} task)" if task in MODALITY_TASKS[other] else ""
        raise ValueError(
            f"unknown --tasks {task!r} for --modality {modality}{where}; choose from {MODALITY_TASKS[modality]}"
        )
    return task


def records_multiple(tasks: list[str]) -> int:
    """The multiple every image's height and width is cropped to for ``tasks`` (2 at least)."""
    return max([2, *(TASK_MULTIPLE[task] for task in tasks)])


def raw_on_high_resolution_grid(low_resolution_mosaic: torch.Tensor, factor: int) -> torch.Tensor:
    """A low-resolution RGGB mosaic (N, 1, h, w) brought to the target grid as the network's input:
    bilinear demosaicing, bicubic x``factor`` upsampling and the RGGB mosaic again, (N, 1, factor h, factor w).
    The RAW networks take a mosaic at the output resolution (as for RGB SR, whose input is the bicubic-
    upsampled image); the paper does not say how its RAW SR inputs were arranged."""
    return mosaic(upsample(demosaic_bilinear(low_resolution_mosaic), factor))


def task_input(task: str, record: ImageRecord, modality: str, noise_seed: int = 0) -> torch.Tensor:
    """The downstream task's input for a whole image (the target is always ``record.clean``).

    RGB: denoise, the noisy observation; sr2/sr4, the clean image downsampled x2/x4 (antialiased bicubic)
    and upsampled back (bicubic), so the network restores detail at the target resolution; jdensr2, the
    same with noise at the image's noise level added to the low-resolution image (its own draw).
    RAW: jdd, the noisy mosaic; jdemsr2, the RGGB mosaic of the x2-downsampled clean image brought to
    the target grid by ``raw_on_high_resolution_grid``; jddsr2, the same with noise added to the
    low-resolution mosaic. The noise of jdensr2/jddsr2 comes from (``noise_seed``, the image's seed_name).
    """
    task = canonical_task(task, modality)
    if task in ("denoise", "jdd"):
        return record.observed
    scale = TASK_SCALE[task]
    low = downsample(record.clean[None], scale)
    if task in ("jdemsr2", "jddsr2"):
        low = mosaic(low)
    if task in NOISY_TASKS:
        if record.noise_level is None:
            raise ValueError(f"the {task} task simulates noise, which real noisy pairs (--data-format sidd) lack")
        low = add_noise(low, record.noise_level, image_seed(noise_seed, record.seed_name, 3))
    if modality == "raw":
        return raw_on_high_resolution_grid(low, scale)[0]
    return upsample(low, scale)[0]


@dataclass
class CropBatch:
    """Two crops of each of B distinct images, all (B, C, h, w); the optional fields are None unless the
    sampler was asked for them. ``second_*``: a second noisy observation of the same scene window: an
    independent draw (noise2noise), or a mosaic2mosaic burst frame, recorded under the RGGB colours
    ``second_masks_*`` (B, 3, h, w) (None: the first observation's pattern). ``task_*``: the crops of a
    downstream task's input (supervised pre-training on that task)."""

    observed_q: torch.Tensor
    observed_k: torch.Tensor
    second_q: torch.Tensor | None
    second_k: torch.Tensor | None
    clean_q: torch.Tensor
    clean_k: torch.Tensor
    second_masks_q: torch.Tensor | None = None
    second_masks_k: torch.Tensor | None = None
    task_q: torch.Tensor | None = None
    task_k: torch.Tensor | None = None

    def to(self, device) -> CropBatch:
        """The same batch on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return CropBatch(**{name: None if t is None else t.to(device, non_blocking=True) for name, t in moved.items()})


class CropSampler:
    """Random crops of ``crop_size`` from ``records``; the randomness comes from ``generator`` only.

    For RAW data crop corners are even, so every crop starts on the R of the RGGB pattern. ``task``: the
    batches also hold the crops of that downstream task's input. ``burst``: the second observation of
    each crop is one of the record's mosaic2mosaic frames (chosen at random), over the same scene window.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        crop_size: int,
        generator: torch.Generator,
        raw: bool,
        task: str | None = None,
        burst: bool = False,
    ):
        if crop_size < 2 or (raw and crop_size % 2):
            raise ValueError(f"crop_size must be >= 2 (and even for RAW data), got {crop_size}")
        margin = 1 if burst else 0  # a burst frame's window lies up to one pixel further down and right
        check_image_sizes([CleanImage(r.name, r.clean) for r in records], crop_size + margin, "training crop")
        if burst and not all(r.burst for r in records):
            raise ValueError("burst sampling needs records with mosaic2mosaic frames (make_records(burst=True))")
        if task is not None and not all(task in r.task_inputs for r in records):
            raise ValueError(f"every record needs the input of task {task!r} (ImageRecord.task_inputs)")
        self.records = records
        self.crop_size = crop_size
        self.generator = generator
        self.step = 2 if raw else 1
        self.task, self.burst, self.margin = task, burst, margin
        # the RGGB colours a burst crop was recorded with depend only on its frame's phase
        self.burst_masks = (
            {
                (dy, dx): bayer_masks_at(crop_size, crop_size, (dy, dx), records[0].observed.dtype)
                for dy in (0, 1)
                for dx in (0, 1)
            }
            if burst
            else {}
        )

    def _corner(self, record: ImageRecord) -> tuple[int, int]:
        height, width = record.clean.shape[1:]
        slots_y = (height - self.margin - self.crop_size) // self.step + 1
        slots_x = (width - self.margin - self.crop_size) // self.step + 1
        y = int(torch.randint(slots_y, (1,), generator=self.generator)) * self.step
        x = int(torch.randint(slots_x, (1,), generator=self.generator)) * self.step
        return y, x

    def _crop(self, image: torch.Tensor, corner: tuple[int, int]) -> torch.Tensor:
        y, x = corner
        return image[:, y : y + self.crop_size, x : x + self.crop_size]

    def image_indices(self, batch_size: int) -> list[int]:
        """``batch_size`` distinct image indices (a ValueError if there are fewer images)."""
        if batch_size > len(self.records):
            raise ValueError(
                f"a batch of {batch_size} distinct images needs at least {batch_size} training images, "
                f"but there are {len(self.records)}; lower --batch-size or add images"
            )
        return torch.randperm(len(self.records), generator=self.generator)[:batch_size].tolist()

    def _burst_crops(self, indices: list[int], corners: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each image, a random burst frame's crop over the scene window at ``corner`` (even), and the
        RGGB masks that frame's pixels were recorded with."""
        crops, masks = [], []
        for i, (y, x) in zip(indices, corners):
            frames = self.records[i].burst
            (dy, dx), frame = frames[int(torch.randint(len(frames), (1,), generator=self.generator))]
            crops.append(self._crop(frame, (y + dy, x + dx)))
            masks.append(self.burst_masks[dy % 2, dx % 2])
        return torch.stack(crops), torch.stack(masks)

    def sample(self, batch_size: int) -> CropBatch:
        """Two independent random crops of each of ``batch_size`` distinct images."""
        indices = self.image_indices(batch_size)
        corners = [(self._corner(self.records[i]), self._corner(self.records[i])) for i in indices]
        has_second = all(self.records[i].observed_second is not None for i in indices)

        def stack(attribute: str, which: int) -> torch.Tensor:
            return torch.stack(
                [self._crop(getattr(self.records[i], attribute), c[which]) for i, c in zip(indices, corners)]
            )

        batch = CropBatch(
            observed_q=stack("observed", 0),
            observed_k=stack("observed", 1),
            second_q=stack("observed_second", 0) if has_second else None,
            second_k=stack("observed_second", 1) if has_second else None,
            clean_q=stack("clean", 0),
            clean_k=stack("clean", 1),
        )
        if self.task is not None:
            inputs = [self.records[i].task_inputs[self.task] for i in indices]
            batch.task_q = torch.stack([self._crop(image, c[0]) for image, c in zip(inputs, corners)])
            batch.task_k = torch.stack([self._crop(image, c[1]) for image, c in zip(inputs, corners)])
        if self.burst:
            batch.second_q, batch.second_masks_q = self._burst_crops(indices, [c[0] for c in corners])
            batch.second_k, batch.second_masks_k = self._burst_crops(indices, [c[1] for c in corners])
        return batch

    def sample_task(self, task: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) crops for a downstream task: images drawn with replacement, one crop each."""
        indices = torch.randint(len(self.records), (batch_size,), generator=self.generator).tolist()
        inputs, targets = [], []
        for i in indices:
            corner = self._corner(self.records[i])
            inputs.append(self._crop(self.records[i].task_inputs[task], corner))
            targets.append(self._crop(self.records[i].clean, corner))
        return torch.stack(inputs), torch.stack(targets)
