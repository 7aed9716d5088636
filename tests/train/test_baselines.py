"""Tests of the Table 1 contrastive baselines: ResNet-FCN, the generalised replace_head, the shared momentum
contrast (EMA copies and FIFO queue), MoCo v2 and pixel-level contrast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rcl_ops.train.baselines import (
    MoCoObjective,
    MomentumContrast,
    PixelContrastObjective,
    ResNetFCN,
    gather_pixels,
    overlapping_views,
)
from rcl_ops.train.data import CropBatch
from rcl_ops.train.evaluate import ProxySettings, proxy_evaluate
from rcl_ops.train.models import UNet, freeze_all_but_head, replace_head
from train.helpers import assert_only_the_head_changed, denoising_records


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a busy machine they stall the
    tests (20-100x slower on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(batch: int = 4, size: int = 16, channels: int = 3, seed: int = 0) -> CropBatch:
    generator = torch.Generator().manual_seed(seed)
    first = torch.rand(batch, channels, size, size, generator=generator)
    second = torch.rand(batch, channels, size, size, generator=generator)
    return CropBatch(first, second, None, None, first.clone(), second.clone())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# ResNet-FCN


@pytest.mark.parametrize("raw", [False, True])
def test_resnet_fcn_shapes_and_features(raw):
    model = ResNetFCN(width=4, stages=3, raw=raw)
    size = (18, 22) if raw else (19, 23)  # odd sizes: padded to a multiple of the stride 4, cropped back
    x = torch.rand(2, 1 if raw else 3, *size)
    out = model(x)
    assert out.shape == (2, 3, *size)
    features = model.features(x)
    assert features.shape == (2, 16, math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert torch.equal(model.from_features(x, features), out)
    # the head is the whole decoder (transposed convs back to the input resolution), the body the encoder
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in model.head.modules()) == 2
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.body.modules())


def test_resnet_fcn_rejects_bad_sizes():
    with pytest.raises(ValueError, match="stages"):
        ResNetFCN(width=4, stages=0)


def test_proxy_evaluation_of_resnet_fcn_tunes_exactly_the_decoder():
    model = ResNetFCN(width=4, stages=2)
    model.train()
    model(torch.rand(4, 3, 16, 16))  # non-trivial BatchNorm statistics in the body
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = denoising_records(2, 20)
    settings = ProxySettings(steps=2, batch_size=2, crop_size=12, lr=1e-2)
    tuned, scores, _ = proxy_evaluate(
        model, "denoise", records, records[:1], settings, gen(0), torch.device("cpu"), False
    )
    after = tuned.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value) != key.startswith("head."), key
    assert math.isfinite(scores.psnr[0])


# ---------------------------------------------------------------------------------------------
# replace_head


def old_conv_head(old: nn.Conv2d, generator: torch.Generator) -> nn.Conv2d:
    """The single-Conv2d replace_head before it was generalised (the reference for bit-identity)."""
    new = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding, bias=old.bias is not None)
    bound = 1 / math.sqrt(old.in_channels * math.prod(old.kernel_size))
    with torch.no_grad():
        for parameter in new.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 * bound - bound)
    return new


@pytest.mark.parametrize("kernel", [1, 3])
def test_replace_head_conv2d_is_bit_identical_to_the_old_formula(kernel):
    model = UNet(width=4, depth=1)
    model.head = nn.Conv2d(4, 3, kernel, padding=kernel // 2)
    reference = old_conv_head(model.head, gen(7))
    replace_head(model, gen(7))
    assert torch.equal(model.head.weight, reference.weight)
    assert torch.equal(model.head.bias, reference.bias)


def test_replace_head_reinitialises_exactly_the_decoder_deterministically():
    model = ResNetFCN(width=4, stages=3)
    model.head.append(nn.BatchNorm2d(3))  # a normalisation layer in the head is reset too
    model.train()
    model(torch.rand(2, 3, 16, 16))
    with torch.no_grad():
        model.head[-1].weight.fill_(2.0)
        model.head[-1].bias.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    global_state = torch.get_rng_state()
    replace_head(first, gen(3))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is not used
    torch.manual_seed(2)
    replace_head(second, gen(3))
    after = first.state_dict()
    assert_only_the_head_changed(before, after)
    for key in before:
        assert torch.equal(second.state_dict()[key], after[key]), key  # same generator seed, same head
    third = copy.deepcopy(model)
    replace_head(third, gen(4))
    assert not torch.equal(third.head[0].weight, first.head[0].weight)
    norm = first.head[-1]
    assert torch.equal(norm.weight, torch.ones(3)) and torch.equal(norm.running_var, torch.ones(3))
    assert int(norm.num_batches_tracked) == 0
    assert all(p.requires_grad for p in first.head.parameters())


def test_replace_head_follows_torch_default_bounds():
    """ConvTranspose2d's fan_in is weight.shape[1] * kernel (out_channels here), not in_channels * kernel: the
    re-initialised values must span torch's own default range and no more."""
    layers = [nn.ConvTranspose2d(64, 4, 4), nn.Conv2d(4, 64, 3), nn.Linear(32, 256)]
    for layer in layers:
        holder = nn.Module()
        holder.head = copy.deepcopy(layer)
        replace_head(holder, gen(0))
        for name in ("weight", "bias"):
            ours = getattr(holder.head, name).abs().max()
            default = getattr(layer, name).abs().max()  # torch's reset_parameters draws
            fan_in = layer.weight.shape[1] * math.prod(layer.weight.shape[2:])
            assert ours <= 1 / math.sqrt(fan_in)
            assert ours > 0.8 * default, (type(layer).__name__, name, float(ours), float(default))


def test_replace_head_rejects_unsupported_layers():
    holder = nn.Module()
    holder.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.PReLU())
    with pytest.raises(TypeError, match="PReLU"):
        replace_head(holder, gen(0))
    # parameter-free layers are fine, and the head is then trainable alone
    model = ResNetFCN(width=4, stages=2)
    replace_head(model, gen(0))
    assert len(freeze_all_but_head(model)) == 4


# ---------------------------------------------------------------------------------------------
# the momentum-contrast machinery


def test_momentum_update_is_the_ema_formula():
    query = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    contrast = MomentumContrast(queue_size=8, dim=2, momentum=0.9)
    contrast.reset({"net": query}, gen(0))
    key = contrast.copies["net"]
    assert all(not p.requires_grad for p in key.parameters())
    initial = {k: v.clone() for k, v in key.named_parameters()}
    with torch.no_grad():
        for parameter in query.parameters():
            parameter.add_(torch.randn(parameter.shape))
    query(torch.rand(2, 3, 6, 6))  # new running statistics
    contrast.update({"net": query})
    for name, parameter in query.named_parameters():
        expected = 0.9 * initial[name] + 0.1 * parameter.detach()
        torch.testing.assert_close(dict(key.named_parameters())[name], expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(expected, parameter)
    assert torch.equal(key[1].running_mean, query[1].running_mean)
    with pytest.raises(ValueError, match="expected modules"):
        contrast.update({"other": query})


def test_queue_is_fifo_with_wrap_around():
    contrast = MomentumContrast(queue_size=5, dim=2, momentum=0.9)
    contrast.reset({}, gen(0))
    initial = contrast.queue.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(5))
    first = torch.arange(6.0).view(3, 2)
    contrast.enqueue(first)
    assert torch.equal(contrast.queue[:3], first) and torch.equal(contrast.queue[3:], initial[3:])
    assert int(contrast.pointer) == 3
    second = -torch.arange(1.0, 7.0).view(3, 2)
    contrast.enqueue(second)
    assert torch.equal(contrast.queue[3:], second[:2]) and torch.equal(contrast.queue[0], second[2])
    assert torch.equal(contrast.queue[1:3], first[1:])
    assert int(contrast.pointer) == 1
    with pytest.raises(ValueError, match="enqueue"):
        contrast.enqueue(torch.zeros(6, 2))


# ---------------------------------------------------------------------------------------------
# the objectives


def test_moco_loss_matches_a_hand_computed_cross_entropy():
    model = ResNetFCN(width=4, stages=2).eval()  # eval: the query forward leaves no state behind
    objective = MoCoObjective(queue_size=16, temperature=0.2)
    objective.start(model, gen(0))
    batch = make_batch()
    queue = objective.contrast.queue.clone()
    loss, parts = objective(model, batch, gen(5))
    q, k = (t.detach() for t in objective.embeddings(model, batch, gen(5)))  # the same views
    expected, correct = 0.0, 0
    for i in range(q.shape[0]):
        positive = float(q[i] @ k[i]) / 0.2
        negatives = [float(q[i] @ queue[j]) / 0.2 for j in range(queue.shape[0])]
        expected += -positive + math.log(math.exp(positive) + sum(math.exp(n) for n in negatives))
        correct += positive > max(negatives)
    assert float(loss.detach()) == pytest.approx(expected / q.shape[0], rel=1e-5)
    assert float(parts["moco_top1"]) == correct / q.shape[0]
    torch.testing.assert_close(q.norm(dim=1), torch.ones(4))
    # the keys were enqueued after the loss was computed
    assert torch.equal(objective.contrast.queue[:4], k) and torch.equal(objective.contrast.queue[4:], queue[4:])


class CoordinateModel(nn.Module):
    """features(x) = scale * x: dense features that are a fixed function of each input pixel."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def features(self, x):
        return self.scale * x

    def forward(self, x):
        return self.features(x)


def coordinate_crops(batch: int, size: int) -> torch.Tensor:
    """Crops whose channels are (image, row, column): every pixel of the batch is distinct."""
    image, row, column = torch.meshgrid(
        torch.arange(batch, dtype=torch.float32),
        torch.arange(size, dtype=torch.float32),
        torch.arange(size, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([image, row, column], dim=1)


@pytest.mark.parametrize("raw", [False, True])
def test_pixel_views_pair_the_same_scene_pixel(raw):
    crops = coordinate_crops(6, 20)
    if raw:
        crops = crops[:, 1:2] * 20 + crops[:, 2:3]  # one channel, row * 20 + column
    views = overlapping_views(crops, 0.7, 12, flip=True, generator=gen(1))
    first, second = gather_pixels(views.first, views.index_first), gather_pixels(views.second, views.index_second)
    assert torch.equal(first, second)  # same scene pixel in both views
    scene = views.scene
    expected = scene[..., 0] * 20 + scene[..., 1] if raw else scene.permute(0, 2, 1).float()
    image = torch.arange(6.0)[:, None].expand(-1, 12)
    if raw:
        assert torch.equal(first[:, 0], expected.float())
        corner = views.first[:, 0, 0, 0]  # each view starts on an R: even row and column
        assert views.first.shape[-1] % 2 == 0 and bool((corner // 20 % 2 == 0).all() and (corner % 20 % 2 == 0).all())
    else:
        assert torch.equal(first[:, 0], image) and torch.equal(first[:, 1:], expected)
        assert len({tuple(p) for p in scene[0].tolist()}) == 12  # distinct pixels per image
    with pytest.raises(ValueError, match="overlap"):
        overlapping_views(crops, 0.55, 200, flip=True, generator=gen(1))


def test_pixel_objective_positives_match_exactly():
    model = CoordinateModel()
    objective = PixelContrastObjective(queue_size=32, pixels_per_image=8, view_fraction=0.75, jitter=0.0)
    objective.start(model, gen(0))
    crops = coordinate_crops(3, 16) / 16
    batch = CropBatch(crops, crops, None, None, crops, crops)
    q, k = objective.embeddings(model, batch, gen(2))
    assert q.shape == k.shape == (24, 64)
    # key copies equal the query networks at the start, so every positive pair embeds identically
    torch.testing.assert_close((q * k).sum(dim=1), torch.ones(24))
    torch.testing.assert_close(q, k)


def test_pixel_loss_matches_a_hand_computed_cross_entropy():
    model = UNet(width=4, depth=1)
    objective = PixelContrastObjective(queue_size=40, pixels_per_image=4, temperature=0.3)
    objective.start(model, gen(0))
    batch = make_batch(batch=3)
    queue = objective.contrast.queue.clone()
    loss, parts = objective(model, batch, gen(5))
    q, k = (t.detach() for t in objective.embeddings(model, batch, gen(5)))
    assert q.shape == k.shape == (12, 64)
    expected, correct = 0.0, 0
    for i in range(12):
        # positive: key pixel i (the same scene pixel); negatives: the other 11 key pixels and the queue
        logits = [float(q[i] @ k[j]) / 0.3 for j in range(12)] + [float(q[i] @ v) / 0.3 for v in queue]
        expected += -logits[i] + math.log(sum(math.exp(v) for v in logits))
        correct += logits[i] == max(logits)
    assert float(loss.detach()) == pytest.approx(expected / 12, rel=1e-5)
    assert float(parts["pixcl_top1"]) == correct / 12
    assert torch.equal(objective.contrast.queue[:12], k) and torch.equal(objective.contrast.queue[12:], queue[12:])


def fixed_queue_training(objective, model, batch, steps: int, lr: float):
    """(first loss, last loss) of Adam steps on one batch with the same views every step and the queue
    restored after each step (so the negatives stay the same and only learning changes the loss)."""
    optimizer = torch.optim.Adam([*model.parameters(), *objective.extra_parameters()], lr=lr)
    queue, pointer = objective.contrast.queue.clone(), objective.contrast.pointer.clone()
    losses = []
    for _ in range(steps + 1):
        loss, _ = objective(model, batch, gen(9))
        losses.append(float(loss.detach()))
        objective.contrast.queue.copy_(queue)
        objective.contrast.pointer.copy_(pointer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step(model)
    return losses[0], losses[-1]


def test_moco_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = ResNetFCN(width=4, stages=2)
    objective = MoCoObjective(queue_size=64, momentum=0.9)
    objective.start(model, gen(0))
    first, last = fixed_queue_training(objective, model, make_batch(), steps=15, lr=1e-2)
    assert last < first - 0.3, (first, last)  # seed 0: 1.21 -> 0.38


def test_pixel_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = UNet(width=8, depth=1)
    objective = PixelContrastObjective(queue_size=64, pixels_per_image=8, momentum=0.9)
    objective.start(model, gen(0))
    first, last = fixed_queue_training(objective, model, make_batch(), steps=15, lr=3e-3)
    assert last < first - 0.2, (first, last)  # seed 0: 3.49 -> 3.06


@pytest.mark.parametrize("kind", ["moco", "pixel"])
def test_gradients_reach_query_model_and_projection_only(kind):
    model = ResNetFCN(width=4, stages=2) if kind == "moco" else UNet(width=4, depth=1)
    objective = (
        MoCoObjective(queue_size=16) if kind == "moco" else PixelContrastObjective(queue_size=64, pixels_per_image=8)
    )
    objective.start(model, gen(0))
    loss, _ = objective(model, make_batch(), gen(1))
    loss.backward()
    body = model.body if kind == "moco" else model.encoders
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in body.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.extra_parameters())
    assert all(p.grad is None and not p.requires_grad for p in objective.contrast.copies.parameters())
    extra = {id(p) for p in objective.extra_parameters()}
    assert not extra & {id(p) for p in model.parameters()}
    assert not extra & {id(p) for p in objective.contrast.copies.parameters()}


def test_objectives_refuse_use_before_start():
    with pytest.raises(RuntimeError, match="start"):
        MoCoObjective().extra_parameters()


@pytest.mark.parametrize("kind", ["moco", "pixel"])
def test_state_dict_round_trip_resumes_bit_identically(kind):
    def build():
        torch.manual_seed(0)
        model = ResNetFCN(width=4, stages=2) if kind == "moco" else UNet(width=4, depth=1)
        objective = (
            MoCoObjective(queue_size=8) if kind == "moco" else PixelContrastObjective(queue_size=40, pixels_per_image=4)
        )
        return model, objective

    model, objective = build()
    objective.start(model, gen(0))
    optimizer = torch.optim.Adam([*model.parameters(), *objective.extra_parameters()], lr=1e-2)
    for step in range(3):  # 3 steps wrap the queue around for MoCo (3 * 4 > 8)
        loss, _ = objective(model, make_batch(seed=step), gen(10 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.after_step(model)
    resumed_model, resumed = build()
    resumed_model.load_state_dict(model.state_dict())
    resumed.start(resumed_model, gen(123))  # a different start, overwritten by the saved state
    resumed.load_state_dict(objective.state_dict())
    assert int(resumed.contrast.pointer) == int(objective.contrast.pointer) != 0
    expected, _ = objective(model, make_batch(seed=5), gen(20))
    got, _ = resumed(resumed_model, make_batch(seed=5), gen(20))
    assert torch.equal(got, expected)
    fresh_model, fresh = build()
    fresh_model.load_state_dict(model.state_dict())
    fresh.start(fresh_model, gen(123))
    assert not torch.equal(fresh(fresh_model, make_batch(seed=5), gen(20))[0], expected)  # the state matters


@pytest.mark.parametrize("kind", ["moco", "pixel"])
def test_objectives_run_on_raw_mosaics(kind):
    model = ResNetFCN(width=4, stages=2, raw=True) if kind == "moco" else UNet(width=4, depth=1, raw=True)
    objective = (
        MoCoObjective(queue_size=16) if kind == "moco" else PixelContrastObjective(queue_size=64, pixels_per_image=8)
    )
    objective.start(model, gen(0))
    loss, parts = objective(model, make_batch(channels=1), gen(1))
    assert math.isfinite(float(loss.detach())) and len(parts) == 2


def test_start_places_the_state_on_the_model_device():
    model = ResNetFCN(width=4, stages=2).to("meta")  # any device other than the objective's
    objective = MoCoObjective(queue_size=8)
    objective.start(model, gen(0))
    assert {tensor.device.type for tensor in objective.state_dict().values()} == {"meta"}


@pytest.mark.parametrize("kind", ["moco", "pixel"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_objectives_train_on_the_model_device(kind, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = (ResNetFCN(width=4, stages=2) if kind == "moco" else UNet(width=4, depth=1)).to(device)
    objective = (
        MoCoObjective(queue_size=16) if kind == "moco" else PixelContrastObjective(queue_size=64, pixels_per_image=8)
    )
    objective.start(model, gen(0))
    optimizer = torch.optim.Adam([*model.parameters(), *objective.extra_parameters()], lr=1e-3)
    for step in range(2):
        loss, parts = objective(model, make_batch(seed=step).to(device), gen(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.after_step(model)
    assert loss.device.type == device and math.isfinite(float(loss.detach()))
    assert all(value.device.type == device for value in parts.values())
    assert int(objective.contrast.pointer) == 2 * (4 if kind == "moco" else 32) % objective.contrast.queue.shape[0]
