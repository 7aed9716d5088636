"""Loading images: folder and image errors, pixel conversion, batches, tiles, the embedded images, SIDD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import io

from rcl_ops.train.config import build_config
from rcl_ops.train.data import CropSampler, make_records
from rcl_ops.train.images import (
    CleanImage,
    DataError,
    check_image_sizes,
    load_embedded_images,
    load_folder,
    load_split,
    to_rgb_float,
)
from train.helpers import make_sidd_folder


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        load_folder(tmp_path / "empty")


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_folder(tmp_path)


def test_images_smaller_than_the_crop(tmp_path):
    io.imsave(tmp_path / "big.png", np.zeros((40, 40, 3), np.uint8), check_contrast=False)
    io.imsave(tmp_path / "small.png", np.zeros((20, 50), np.uint8), check_contrast=False)
    images = load_folder(tmp_path)
    assert [img.pixels.shape for img in images] == [(3, 40, 40), (3, 20, 50)]
    with pytest.raises(DataError, match=r"small.png \(20x50\).*--crop-size"):
        check_image_sizes(images, 32, "training crop")


def test_folder_with_train_and_test_subfolders(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(count):
            io.imsave(tmp_path / split / f"{i}.png", np.full((8, 8, 3), 10 * i, np.uint8), check_contrast=False)
    train, test = load_split(str(tmp_path), 0.5, 0)
    assert len(train) == 3 and len(test) == 2


def test_pixel_conversion():
    assert to_rgb_float(np.full((2, 3), 65535, np.uint16), "x").shape == (3, 2, 3)
    assert float(to_rgb_float(np.full((2, 3, 4), 255, np.uint8), "x").max()) == 1.0
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        to_rgb_float(np.full((2, 2), 2.0), "x")
    with pytest.raises(DataError, match="shape"):
        to_rgb_float(np.zeros((2, 2, 5)), "x")


def test_batches_need_distinct_images():
    records = make_records([CleanImage(f"i{i}", torch.rand(3, 16, 16)) for i in range(3)], "rgb", 0, 20, 0, False)
    sampler = CropSampler(records, 8, torch.Generator().manual_seed(0), raw=False)
    with pytest.raises(ValueError, match="distinct images"):
        sampler.sample(4)


def test_tiles_and_colour_images(tmp_path):
    from rcl_ops.train.images import EMBEDDED_RGB, tile_images

    image = CleanImage("im", torch.arange(3 * 5 * 7, dtype=torch.float32).reshape(3, 5, 7) / 105)
    tiles = tile_images([image, CleanImage("small", torch.zeros(3, 1, 4))], 2)
    assert [t.name for t in tiles] == [f"im@{r},{c}" for r in range(2) for c in range(3)] + ["small"]
    assert torch.equal(tiles[4].pixels, image.pixels[:, 2:4, 2:4])
    records = make_records(tiles[:2], "rgb", 5, 20, 0, second_draw=False)
    assert records[0].noise_level != records[1].noise_level  # each tile its own noise level
    train, test = load_split(None, 0.25, 0, bundled="rgb", tile_size=128)
    photos = {t.name.split("@")[0] for t in train}, {t.name.split("@")[0] for t in test}
    assert photos[0] | photos[1] == set(EMBEDDED_RGB) and not photos[0] & photos[1]  # split before tiling
    assert all(t.pixels.shape == (3, 128, 128) for t in train + test)
    with pytest.raises(ValueError, match="--tile-size must be at least --crop-size 64"):
        build_config(crop_size=64, tile_size=48)


def test_embedded_images_load_offline():
    images = load_embedded_images(("camera", "astronaut"))
    assert [img.pixels.shape for img in images] == [(3, 512, 512), (3, 512, 512)]
    assert torch.equal(images[0].pixels[0], images[0].pixels[1])  # grey replicated to RGB


def test_sidd_loader_reads_a_tiny_folder(tmp_path):
    from rcl_ops.train.images import load_sidd_pairs

    root = make_sidd_folder(tmp_path / "sidd", scenes=3)
    pairs = load_sidd_pairs(root)
    assert len(pairs) == 3 and all(p.noisy is not None for p in pairs)
    first = root / "Data" / "0001_001_S6_00100_00060_3200_L"
    assert torch.equal(
        pairs[0].pixels, torch.from_numpy(io.imread(first / "0001_GT_SRGB_010.PNG") / 255).permute(2, 0, 1).float()
    )
    assert torch.equal(
        pairs[0].noisy, torch.from_numpy(io.imread(first / "0001_NOISY_SRGB_010.PNG") / 255).permute(2, 0, 1).float()
    )
    records = make_records(pairs, "rgb", 0, 20, 0, second_draw=True)
    assert torch.equal(records[0].observed, pairs[0].noisy) and records[0].observed_second is None
    (first / "0001_GT_SRGB_010.PNG").unlink()
    with pytest.raises(DataError, match="has no ground truth 0001_GT_SRGB_010.PNG"):
        load_sidd_pairs(root)
    with pytest.raises(ValueError, match="remove n2n"):
        build_config(data_format="sidd", data_dir=str(root))
