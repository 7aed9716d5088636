"""Clean images for the trainer: loading (a folder of images, SIDD-layout noisy/clean pairs or the bundled
scikit-image sample images), the train/test split and the cutting into tiles.

Clean images are (3, H, W) float32 tensors in [0, 1] (grey images are replicated to three channels).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# scikit-image sample images that ship inside the package (no download needed).
EMBEDDED_RGB = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "hubble_deep_field")
EMBEDDED_GREY = ("camera", "brick", "grass", "gravel", "moon", "coins", "cell", "clock", "page", "text")
EMBEDDED_IMAGES = EMBEDDED_RGB + EMBEDDED_GREY
BUNDLED_SETS = {"all": EMBEDDED_IMAGES, "rgb": EMBEDDED_RGB}


class DataError(ValueError):
    """A data folder or image that cannot be used: missing, empty, unreadable or too small."""


@dataclass
class CleanImage:
    """A clean image: ``pixels`` (3, H, W) float32 in [0, 1]; ``name`` identifies it in logs and results.
    ``noisy``: a real noisy photograph of the same scene (paired data such as SIDD), or None when the
    noise is simulated. ``seed_name``: what its noise is seeded from (default: ``name``): a file's path
    relative to the data folder, so that the noise does not depend on how --data-dir is spelled or where the
    folder lies; a bundled image's name."""

    name: str
    pixels: torch.Tensor
    noisy: torch.Tensor | None = None
    seed_name: str | None = None

    def __post_init__(self):
        if self.seed_name is None:
            self.seed_name = self.name


def to_rgb_float(array: np.ndarray, name: str) -> torch.Tensor:
    """Convert an image array (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) of any dtype to (3, H, W)
    float32 in [0, 1].

    Integer images are divided by their dtype's maximum; float images must already lie in
    [0, 1]; grey is replicated to three channels and an alpha channel dropped (grey + alpha as RGBA).
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (1, 2, 3, 4):
        array = array[..., :3] if array.shape[2] > 2 else array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(
            f"image {name}: expected a grey, grey + alpha, RGB or RGBA image, got an array of shape {array.shape}"
        )
    if array.dtype == bool:
        pixels = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        pixels = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    elif np.issubdtype(array.dtype, np.floating):
        pixels = array.astype(np.float32)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise DataError(f"image {name}: float images must hold finite values in [0, 1]")
    else:
        raise DataError(f"image {name}: unsupported pixel type {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_image_file(path: Path, root: Path | None = None) -> CleanImage:
    """Read one image file (PNG/JPEG/BMP/TIFF) with scikit-image; DataError if it cannot be decoded. Its noise
    is seeded from its path relative to ``root`` (the data folder; default: the file's own folder)."""
    from skimage import io

    _refuse_16_bit_colour_png(path)
    try:
        with warnings.catch_warnings():  # imageio warns about legacy plugins while probing formats
            warnings.simplefilter("ignore", DeprecationWarning)
            array = io.imread(str(path))
    except Exception as error:  # decoders raise many types
        raise DataError(f"cannot read image {path}: {type(error).__name__}: {error}") from error
    return CleanImage(str(path), to_rgb_float(array, str(path)), seed_name=_relative_name(path, root))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {2: "RGB", 4: "grey + alpha", 6: "RGBA"}  # IHDR colour types Pillow reads at 8 bits if 16-bit


def _refuse_16_bit_colour_png(path: Path) -> None:
    """DataError for a 16-bit PNG with colour or alpha, which the PNG reader (Pillow, under scikit-image) decodes
    at 8 bits only; 16-bit grey PNGs are read at full precision. The header says it: the signature, then the
    IHDR chunk's bit depth (byte 24) and colour type (byte 25)."""
    try:
        with path.open("rb") as handle:
            header = handle.read(26)
    except OSError:
        return  # the reader names the file
    if len(header) < 26 or not header.startswith(PNG_SIGNATURE) or header[12:16] != b"IHDR":
        return
    if header[24] == 16 and header[25] in PNG_COLOUR_TYPES:
        raise DataError(
            f"image {path}: a 16-bit {PNG_COLOUR_TYPES[header[25]]} PNG, which the PNG reader (Pillow) would read at "
            "8 bits only: save it as a 16-bit TIFF (read at full precision), or as an 8-bit PNG"
        )


def _relative_name(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` (or its own folder), with / as separator: 'train/0001.png'."""
    return path.relative_to(root).as_posix() if root is not None else path.name


def list_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; DataError if the folder is missing or has none."""
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"data folder {folder} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"data folder {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def load_folder(folder: str | Path, root: str | Path | None = None) -> list[CleanImage]:
    """All images under ``folder``, sorted by path; their noise seeded from their paths relative to ``root``
    (the data folder; default ``folder``)."""
    folder = Path(folder)
    return [load_image_file(path, Path(root or folder)) for path in list_image_files(folder)]


def load_embedded_images(names: tuple[str, ...] = EMBEDDED_IMAGES) -> list[CleanImage]:
    """The scikit-image sample images that need no download (7 RGB, 10 grey)."""
    from skimage import data

    return [CleanImage(name=name, pixels=to_rgb_float(getattr(data, name)(), name)) for name in names]


def split_images(
    images: list[CleanImage], test_fraction: float, seed: int
) -> tuple[list[CleanImage], list[CleanImage]]:
    """Seeded random split into (train, test); at least one image on each side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(images) < 2:
        raise DataError(f"a train/test split needs at least 2 images, got {len(images)}")
    order = np.random.default_rng(seed).permutation(len(images))
    num_test = min(len(images) - 1, max(1, round(test_fraction * len(images))))
    test_ids = set(order[:num_test].tolist())
    train = [img for i, img in enumerate(images) if i not in test_ids]
    test = [img for i, img in enumerate(images) if i in test_ids]
    return train, test


DATA_FORMATS = ("clean", "sidd")
SIDD_NOISY_TAG, SIDD_CLEAN_TAG = "NOISY", "GT"


def load_sidd_pairs(folder: str | Path, root: str | Path | None = None) -> list[CleanImage]:
    """Paired real noisy/clean images in the SIDD layout: under ``folder`` (recursively), every image
    file whose name contains NOISY (e.g. ``Data/0001_001_S6_.../0001_NOISY_SRGB_010.PNG``) next to
    its ground truth, the same name with GT (``0001_GT_SRGB_010.PNG``). Sorted by path; DataError
    naming a noisy image without its ground truth or of another size."""
    files = list_image_files(Path(folder))
    noisy_files = [f for f in files if SIDD_NOISY_TAG in f.name.upper()]
    if not noisy_files:
        raise DataError(
            f"data folder {folder} holds no SIDD-layout pairs (image files named *NOISY*, each next to its *GT* twin)"
        )
    pairs = []
    for noisy_path in noisy_files:
        start = noisy_path.name.upper().index(SIDD_NOISY_TAG)
        clean_name = noisy_path.name[:start] + SIDD_CLEAN_TAG + noisy_path.name[start + len(SIDD_NOISY_TAG) :]
        clean_path = noisy_path.with_name(clean_name)
        if not clean_path.is_file():
            raise DataError(f"noisy image {noisy_path} has no ground truth {clean_path.name} next to it")
        clean, noisy = load_image_file(clean_path), load_image_file(noisy_path)
        if clean.pixels.shape != noisy.pixels.shape:
            raise DataError(
                f"{noisy_path} ({tuple(noisy.pixels.shape[1:])}) and its ground truth {clean_path.name} "
                f"({tuple(clean.pixels.shape[1:])}) differ in size"
            )
        seed_name = _relative_name(noisy_path, Path(root or folder))
        pairs.append(CleanImage(str(noisy_path), clean.pixels, noisy.pixels, seed_name))
    return pairs


def load_split(
    data_dir: str | None,
    test_fraction: float,
    split_seed: int,
    max_images: int | None = None,
    data_format: str = "clean",
    bundled: str = "all",
    tile_size: int | None = None,
) -> tuple[list[CleanImage], list[CleanImage]]:
    """(train, test) clean images (with their real noisy twins for ``data_format`` 'sidd').

    data_dir None: the embedded sample images, split by ``test_fraction``. A folder with
    ``train/`` and ``test/`` subfolders: those. Any other folder: all its images (or SIDD pairs), split.
    ``max_images`` keeps only the first N images (files sorted by path, the embedded ones in
    their listed order) before splitting, or the first N of each of train/ and test/. ``bundled``: which
    embedded images (a key of BUNDLED_SETS). ``tile_size``: after the split, cut every image into tiles
    (``tile_images``), so that no photograph is on both sides.
    """
    load = load_sidd_pairs if data_format == "sidd" else load_folder
    if data_dir is None:
        if bundled not in BUNDLED_SETS:
            raise ValueError(f"unknown bundled image set {bundled!r}; choose from {tuple(BUNDLED_SETS)}")
        images = load_embedded_images(BUNDLED_SETS[bundled])
    else:
        root = Path(data_dir)
        if (root / "train").is_dir() and (root / "test").is_dir():
            train, test = load(root / "train", root)[:max_images], load(root / "test", root)[:max_images]
            return (tile_images(train, tile_size), tile_images(test, tile_size)) if tile_size else (train, test)
        images = load(root)
    if max_images is not None:
        images = images[:max_images]
    train, test = split_images(images, test_fraction, split_seed)
    if tile_size:
        train, test = tile_images(train, tile_size), tile_images(test, tile_size)
    return train, test


_TILE_SUFFIX = re.compile(r"\d+,\d+")  # tile_images names a tile '<photograph>@<row>,<column>'


def photograph_of(name: str) -> str:
    """The photograph a test image comes from: a tile '<photograph>@<row>,<column>' (tile_images) ->
    '<photograph>'; any other name is a photograph itself."""
    head, at, tail = name.rpartition("@")
    return head if at and _TILE_SUFFIX.fullmatch(tail) else name


def tile_images(images: list[CleanImage], tile: int) -> list[CleanImage]:
    """Each image cut into non-overlapping ``tile`` x ``tile`` tiles, row by row from the top left (the
    remainder at the right and bottom dropped; an image smaller than a tile kept whole). A tile is named
    ``<name>@<row>,<column>`` and so gets its own noise level and noisy observation."""
    tiles = []
    for img in images:
        rows, columns = img.pixels.shape[1] // tile, img.pixels.shape[2] // tile
        if rows == 0 or columns == 0:
            tiles.append(img)
            continue
        for r in range(rows):
            for c in range(columns):
                window = (slice(None), slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile))
                noisy = None if img.noisy is None else img.noisy[window].contiguous()
                where = f"@{r},{c}"
                tiles.append(
                    CleanImage(img.name + where, img.pixels[window].contiguous(), noisy, img.seed_name + where)
                )
    return tiles


def check_image_sizes(
    images: list[CleanImage],
    min_size: int,
    purpose: str,
    advice: str = "pass a smaller --crop-size or remove them",
    multiple: int = 1,
) -> None:
    """DataError naming every image whose height or width, once cut to a multiple of ``multiple`` (as
    ``data.make_records`` cuts them), is below ``min_size``, with ``advice``."""
    small = []
    for img in images:
        height, width = img.pixels.shape[1:]
        cut = (height // multiple * multiple, width // multiple * multiple)
        if min(cut) < min_size:
            once_cut = f", {cut[0]}x{cut[1]} once cut to a multiple of {multiple}" if cut != (height, width) else ""
            small.append(f"{img.name} ({height}x{width}{once_cut})")
    if small:
        raise DataError(
            f"{len(small)} image(s) are smaller than the {min_size}x{min_size} {purpose}: {', '.join(small[:10])}"
            f"{' ...' if len(small) > 10 else ''}; {advice}"
        )
