"""The downstream tasks' degradation operators and the mosaic2mosaic bursts, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rcl_ops.train.config import build_config
from rcl_ops.train.data import (
    BURST_SHIFTS,
    MODALITY_TASKS,
    CropSampler,
    canonical_task,
    make_records,
    records_multiple,
    shifted_frame,
    task_input,
)
from rcl_ops.train.evaluate import ProxySettings, proxy_evaluate
from rcl_ops.train.images import CleanImage
from rcl_ops.train.losses import Mosaic2MosaicObjective, SupervisedObjective
from rcl_ops.train.models import build_model
from rcl_ops.train.noise import (
    RGGB_PATTERN,
    bayer_masks_at,
    demosaic_bilinear,
    downsample,
    mosaic,
    pack_raw,
    upsample,
)
from train.helpers import denoising_records


def pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL's bicubic resize of each channel of a (C, H, W) float32 image (mode 'F': no 8-bit rounding)."""
    return np.stack([np.asarray(Image.fromarray(c, mode="F").resize((width, height), Image.BICUBIC)) for c in image])


def keys_upsample_numpy(image: np.ndarray, factor: int, a: float = -0.75) -> np.ndarray:
    """Cubic-convolution upsampling written out in float64: output pixel i samples the input at
    (i + 0.5) / factor - 0.5 (pixel centres aligned), 4 taps per axis, indices clamped at the borders."""

    def weights(t: float) -> list[float]:
        def kernel(d: float) -> float:
            d = abs(d)
            if d <= 1:
                return (a + 2) * d**3 - (a + 3) * d**2 + 1
            if d < 2:
                return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
            return 0.0

        return [kernel(1 + t), kernel(t), kernel(1 - t), kernel(2 - t)]

    def along(axis_image: np.ndarray) -> np.ndarray:  # resample the last axis
        size = axis_image.shape[-1]
        out = np.zeros((*axis_image.shape[:-1], size * factor))
        for i in range(size * factor):
            position = (i + 0.5) / factor - 0.5
            base = int(np.floor(position))
            for tap, w in zip(range(base - 1, base + 3), weights(position - base)):
                out[..., i] += w * axis_image[..., min(max(tap, 0), size - 1)]
        return out

    rows = along(image.astype(np.float64))
    return along(rows.swapaxes(-1, -2)).swapaxes(-1, -2)


@pytest.mark.parametrize("factor", [2, 4])
def test_downsampling_is_pils_antialiased_bicubic(factor):
    image = np.random.default_rng(factor).random((3, 32, 24)).astype(np.float32)
    ours = downsample(torch.from_numpy(image)[None], factor)[0].numpy()
    np.testing.assert_allclose(ours, pil_resize(image, 32 // factor, 24 // factor), atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4])
def test_upsampling_is_cubic_convolution(factor):
    image = np.random.default_rng(factor).random((2, 7, 5)).astype(np.float32)
    ours = upsample(torch.from_numpy(image)[None], factor)[0].numpy()
    np.testing.assert_allclose(ours, keys_upsample_numpy(image, factor), atol=1e-5)
    # PIL's bicubic (Keys a = -0.5) differs by its kernel parameter only: close on a smooth image
    y, x = np.mgrid[0:16, 0:12] / 16
    smooth = np.stack([0.5 + 0.3 * np.sin(2 * y + 3 * x), 0.5 + 0.3 * np.cos(3 * y - x)]).astype(np.float32)
    ours = upsample(torch.from_numpy(smooth)[None], factor)[0].numpy()
    inner = (slice(None), slice(2 * factor, -2 * factor), slice(2 * factor, -2 * factor))  # away from the borders
    assert np.abs(ours - pil_resize(smooth, 16 * factor, 12 * factor))[inner].max() < 1e-2


def test_resampling_refuses_shapes_it_cannot_take():
    with pytest.raises(ValueError, match="multiples of 4"):
        downsample(torch.rand(1, 3, 6, 8), 4)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        upsample(torch.rand(3, 6, 8), 2)


def test_shifted_bayer_masks_follow_the_sensor_pattern():
    for phase in ((0, 0), (0, 1), (1, 0), (1, 1)):
        masks = bayer_masks_at(5, 6, phase)
        for i in range(5):
            for j in range(6):
                colour = RGGB_PATTERN[(phase[0] + i) % 2][(phase[1] + j) % 2]
                assert masks[:, i, j].tolist() == [float(c == colour) for c in range(3)]


def constant_colour_image(height: int, width: int, colour=(0.2, 0.5, 0.8)) -> torch.Tensor:
    return torch.tensor(colour).view(3, 1, 1).expand(3, height, width).clone()


def test_task_inputs_match_their_definitions():
    image = torch.rand(3, 16, 16)
    rgb = make_records([CleanImage("a", image)], "rgb", 0, 0, 0, second_draw=False, multiple=4)[0]
    for task, factor in (("sr2", 2), ("sr4", 4), ("jdensr2", 2)):  # noise-free: jdensr2 is sr2
        expected = upsample(downsample(image[None], factor), factor)[0]
        assert torch.equal(task_input(task, rgb, "rgb"), expected)
    assert torch.equal(task_input("denoise", rgb, "rgb"), rgb.observed)
    raw = make_records([CleanImage("a", image)], "raw", 0, 0, 0, second_draw=False, multiple=4)[0]
    assert torch.equal(task_input("jdd", raw, "raw"), raw.observed)
    assert torch.equal(task_input("denoise", raw, "raw"), raw.observed)  # 'denoise' means jdd on RAW
    low_mosaic = mosaic(downsample(image[None], 2))
    expected = mosaic(upsample(demosaic_bilinear(low_mosaic), 2))[0]
    for task in ("jdemsr2", "jddsr2"):
        assert torch.equal(task_input(task, raw, "raw"), expected)


def test_raw_super_resolution_input_of_a_constant_colour_is_its_mosaic():
    """A flat colour survives downsampling, mosaicing, bilinear demosaicing and upsampling exactly, so the
    network input is the full-resolution mosaic of that colour: the geometry of the pipeline is right."""
    image = constant_colour_image(12, 16)
    record = make_records([CleanImage("flat", image)], "raw", 0, 0, 0, second_draw=False, multiple=4)[0]
    torch.testing.assert_close(task_input("jdemsr2", record, "raw"), mosaic(image[None])[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("task", "modality"), [("jdensr2", "rgb"), ("jddsr2", "raw")])
def test_noisy_super_resolution_adds_the_images_noise_at_low_resolution(task, modality):
    """With a flat grey image the low-resolution noise is iid N(0, shot * 0.5 + read); after the upsampling
    (and for RAW the demosaicing) its variance is that of the same pipeline applied to fresh iid noise."""
    grey = constant_colour_image(128, 128, (0.5, 0.5, 0.5))
    record = make_records([CleanImage("grey", grey)], modality, 10.0, 20.0, 3, second_draw=False, multiple=4)[0]
    clean_task = "sr2" if modality == "rgb" else "jdemsr2"
    noise = task_input(task, record, modality, noise_seed=3) - task_input(clean_task, record, modality)
    level = record.noise_level
    std = (level.shot * 0.5 + level.read) ** 0.5
    fresh = torch.from_numpy(np.random.default_rng(9).standard_normal((1, 1 if modality == "raw" else 3, 64, 64)))
    fresh = (fresh * std).float()
    simulated = upsample(fresh, 2) if modality == "rgb" else mosaic(upsample(demosaic_bilinear(fresh), 2))
    inner = (Ellipsis, slice(8, -8), slice(8, -8))
    ratio = noise[inner].var() / simulated[0][inner].var()
    assert 0.85 < float(ratio) < 1.15
    assert abs(float(noise.mean())) < 0.1 * std
    # the draw is the image's: the same seed gives the same input, another seed another
    assert torch.equal(task_input(task, record, modality, noise_seed=3), task_input(task, record, modality, 3))
    assert not torch.equal(task_input(task, record, modality, noise_seed=3), task_input(task, record, modality, 4))


def test_images_are_cropped_to_the_multiple_the_tasks_need():
    config = build_config(modality="raw", tasks=["jdd", "jdemsr2"], crop_size=8)
    assert records_multiple(config.tasks) == 4 and records_multiple(["denoise", "sr2"]) == 2
    records = make_records([CleanImage("a", torch.rand(3, 22, 19))], "raw", 0, 0, 0, False, multiple=4)
    assert records[0].clean.shape == (3, 20, 16)


def test_tasks_are_checked_per_modality():
    for modality, tasks in MODALITY_TASKS.items():
        assert build_config(modality=modality, tasks=list(tasks), crop_size=8).tasks == list(tasks)
    assert canonical_task("denoise", "raw") == "jdd"
    with pytest.raises(ValueError, match="a --modality raw task"):
        build_config(modality="rgb", tasks=["jdd"])
    with pytest.raises(ValueError, match="a --modality rgb task"):
        build_config(modality="raw", tasks=["sr4"])
    with pytest.raises(ValueError, match="simulate noise"):
        build_config(data_format="sidd", data_dir=".", tasks=["jdensr2"], methods=["rcl-emd"])
    with pytest.raises(ValueError, match="simulate noise"):
        build_config(data_format="sidd", data_dir=".", tasks=["denoise"], methods=["rcl-emd", "sl-jdensr2"])


def test_burst_frames_show_the_scene_under_the_sensor_shift():
    """Noise-free frame (dy, dx) at (i, j) records the scene at (i - dy, j - dx) in the colour of the
    pattern at (i, j): checked pixel by pixel."""
    image = torch.rand(3, 10, 12)
    record = make_records([CleanImage("a", image)], "raw", 0, 0, 0, second_draw=False, burst=True)[0]
    assert [shift for shift, _ in record.burst] == list(BURST_SHIFTS)
    for (dy, dx), frame in record.burst:
        for i in range(10):
            for j in range(12):
                colour = RGGB_PATTERN[i % 2][j % 2]
                scene = image[colour, max(i - dy, 0), max(j - dx, 0)]
                assert frame[0, i, j] == scene
    # each frame its own noise draw, independent of the observation's and of noise2noise's second draw
    noisy = make_records([CleanImage("a", image)], "raw", 5, 20, 0, second_draw=True, burst=True)[0]
    noises = [frame - mosaic(shifted_frame(image, shift)[None])[0] for shift, frame in noisy.burst]
    noises += [noisy.observed - noisy.observed_clean, noisy.observed_second - noisy.observed_clean]
    for i in range(len(noises)):
        for j in range(i):
            assert abs(float(torch.corrcoef(torch.stack([noises[i].flatten(), noises[j].flatten()]))[0, 1])) < 0.5


def test_burst_crops_cover_the_same_scene_window():
    """The burst crop of a sampled pair holds exactly what its frame's colours record of the first crop's
    scene window (noise-free), and over the shifts every colour is a target at every pattern position."""
    images = [CleanImage(f"im{i}", torch.rand(3, 20, 22)) for i in range(4)]
    records = make_records(images, "raw", 0, 0, 0, second_draw=False, burst=True)
    sampler = CropSampler(records, 8, torch.Generator().manual_seed(0), raw=True, burst=True)
    seen = torch.zeros(3, 2, 2, dtype=torch.bool)
    for _ in range(20):
        batch = sampler.sample(4)
        for clean, second, masks in zip(batch.clean_q, batch.second_q, batch.second_masks_q):
            torch.testing.assert_close(second[0], (masks * clean).sum(0), rtol=0, atol=0)
            seen |= masks[:, :2, :2].bool()
    assert seen.all()
    # and the objective is zero for a network that restores the scene exactly
    batch = sampler.sample(4)

    def exact(observed: torch.Tensor) -> torch.Tensor:
        assert torch.equal(observed, torch.cat([batch.observed_q, batch.observed_k]))
        return torch.cat([batch.clean_q, batch.clean_k])

    loss, _ = Mosaic2MosaicObjective()(exact, batch, sampler.generator)
    assert float(loss) == 0.0
    loss, _ = Mosaic2MosaicObjective()(lambda x: torch.cat([batch.clean_k, batch.clean_q]), batch, None)
    assert float(loss) > 0.01  # the other crops' scenes: the targets are where they should be
    with pytest.raises(ValueError, match="burst"):
        Mosaic2MosaicObjective()(exact, CropSampler(records, 8, torch.Generator(), raw=True).sample(2), None)


def test_supervised_pretraining_on_a_task_uses_its_inputs():
    images = [CleanImage(f"im{i}", torch.rand(3, 16, 16)) for i in range(3)]
    records = make_records(images, "rgb", 0, 20, 0, second_draw=False)
    for record in records:
        record.task_inputs["sr2"] = 2 * record.clean  # a stand-in whose crops are recognisable
    sampler = CropSampler(records, 8, torch.Generator().manual_seed(0), raw=False, task="sr2")
    batch = sampler.sample(3)
    assert torch.equal(batch.task_q, 2 * batch.clean_q) and torch.equal(batch.task_k, 2 * batch.clean_k)
    loss, _ = SupervisedObjective("sr2")(lambda x: x / 2, batch, sampler.generator)
    assert float(loss) == 0.0  # halving the task input restores the target: the task crops were used
    with pytest.raises(ValueError, match="task crops"):
        SupervisedObjective("sr2")(lambda x: x, CropSampler(records, 8, torch.Generator(), raw=False).sample(2), None)
    with pytest.raises(ValueError, match="task 'sr4'"):
        CropSampler(records, 8, torch.Generator(), raw=False, task="sr4")


def test_packed_raw_holds_each_pattern_position_in_its_channel():
    raw = torch.rand(2, 1, 6, 8)
    packed = pack_raw(raw)
    assert packed.shape == (2, 4, 3, 4)
    for channel, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):  # R, G, G, B
        assert torch.equal(packed[:, channel], raw[:, 0, dy::2, dx::2])
    with pytest.raises(ValueError, match="H and W even"):
        pack_raw(torch.rand(1, 1, 5, 8))


@pytest.mark.parametrize(("model", "output"), [("unet", "residual"), ("unet", "image"), ("dncnn", "residual")])
def test_packed_raw_networks_return_full_resolution_rgb(model, output):
    """Footnote 3's packed input: the network works at half resolution and its 12-channel head is
    pixel-shuffled into the RGB image, one colour triple per pixel of each 2x2 block."""
    torch.manual_seed(0)
    network = build_model(model, 4, 2 if model == "unet" else 3, raw=True, raw_input="packed", unet_output=output)
    x = torch.rand(2, 1, 12, 20)
    features = network.features(x)
    assert features.shape[-2:] == (6, 10) and network.head.out_channels == 12
    out = network(x)
    assert out.shape == (2, 3, 12, 20)
    with torch.no_grad():  # a head that writes channel c * 4 + k reaches colour c at block position k
        network.head.weight.zero_()
        network.head.bias.zero_()
        network.head.bias[1 * 4 + 2] = 1.0  # green at (1, 0) of every block
    image = network.from_features(x, features)
    residual = output == "residual"  # f = demosaic(x) - head, or f = head for a U-Net that predicts the image
    base = demosaic_bilinear(x) if residual else torch.zeros_like(image)
    sign = -1 if residual else 1
    expected = torch.zeros_like(image)
    expected[:, 1, 1::2, 0::2] = 1.0
    torch.testing.assert_close(image, base + sign * expected)
    # the proxy evaluation replaces the 12-channel head and trains only it
    records = denoising_records(3, 16, "raw")
    settings = ProxySettings(steps=2, batch_size=2, crop_size=8, lr=1e-2)
    tuned, scores, _ = proxy_evaluate(network, "jdd", records, records, settings, torch.Generator(), "cpu", True)
    assert tuned.head.out_channels == 12 and len(scores.psnr) == 3


def test_packed_input_is_for_raw_data():
    assert build_config(modality="raw", tasks=["jdd"], raw_input="packed").raw_input == "packed"
    with pytest.raises(ValueError, match="--raw-input packed"):
        build_config(modality="rgb", raw_input="packed")
