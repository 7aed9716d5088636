"""Fixtures of the trainer tests (tests/conftest.py, which sets TRITON_INTERPRET, applies here too)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import io

from train.helpers import smooth_image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(8):
        io.imsave(folder / f"img{index}.png", smooth_image(rng, 36), check_contrast=False)
    return folder
