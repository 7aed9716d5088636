"""The pre-training objectives and losses: Noise2Self masking, RAW consistency, residual distances, method
names, RCL's parts and its controls, the reductions and distance scale, finite gradients of every method."""

from __future__ import annotations

import math

import pytest
import torch

from rcl_ops.train.config import build_config
from rcl_ops.train.data import (
    DENOISING_TASK,
    CleanImage,
    CropBatch,
    CropSampler,
    make_records,
    task_input,
)
from rcl_ops.train.losses import (
    Noise2SelfObjective,
    RawConsistencyLoss,
    n2s_mask,
    neighbour_interpolation,
    residual_distance_gaps,
)
from rcl_ops.train.methods import METHODS, canonical_method
from rcl_ops.train.models import (
    ResNet50Encoder,
    UNet,
    build_model,
)
from rcl_ops.train.noise import (
    mosaic,
)
from train.helpers import objective_of


@pytest.mark.parametrize("raw", [False, True])
def test_noise2self_masking_is_j_invariant(raw):
    x = torch.rand(1, 1, 16, 16)
    grid, phase = 4, (1, 2)
    mask = n2s_mask(16, 16, grid, phase)
    assert int(mask.sum()) == 16
    # the replacement value at a masked pixel depends on no masked pixel (J-invariance)
    perturbed = x.clone()
    perturbed[mask] += 1.0
    replaced = neighbour_interpolation(x, raw)
    assert torch.allclose(neighbour_interpolation(perturbed, raw)[mask], replaced[mask])
    if raw:  # only same-colour (distance-2) neighbours
        single = torch.zeros(1, 1, 16, 16)
        single[0, 0, 8, 8] = 1
        touched = neighbour_interpolation(single, raw=True)[0, 0].nonzero()
        assert all((int(i) - 8) % 2 == 0 and (int(j) - 8) % 2 == 0 for i, j in touched)
    with pytest.raises(ValueError, match="grid"):
        Noise2SelfObjective(2, raw=True)


def test_raw_consistency_loss_is_differentiable():
    restored = torch.rand(2, 3, 12, 12, requires_grad=True)
    loss = RawConsistencyLoss(0.5)(mosaic(restored.detach()), restored, torch.Generator().manual_seed(0))
    loss.backward()
    assert restored.grad is not None and torch.isfinite(restored.grad).all()


def test_distance_gaps():
    distances = torch.tensor([[0.0, 2.0, 3.0], [1.0, 0.5, 4.0], [1.0, 1.0, 1.0]])
    gaps = residual_distance_gaps(distances)
    assert torch.equal(gaps, torch.tensor([2.0, 3.0, 0.5, 3.5, 0.0, 0.0]))


def test_method_names():
    assert canonical_method("rcl", "bd") == "rcl-bd"
    assert canonical_method("RCL-MMD", "emd") == "rcl-mmd"
    with pytest.raises(ValueError, match="unknown method"):
        canonical_method("simclr", "emd")
    assert canonical_method("moco", "emd") == "moco"
    assert canonical_method("sl-denoise", "emd", "raw") == "sl-jdd"
    with pytest.raises(ValueError, match="not defined for --modality raw"):
        canonical_method("pixcl", "emd", "raw")
    with pytest.raises(ValueError, match="not defined for --modality rgb"):
        canonical_method("m2m", "emd", "rgb")
    with pytest.raises(ValueError, match="a --modality raw task"):
        canonical_method("sl-jdd", "emd", "rgb")


def test_rcl_parts_report_chance_and_retrieval():
    from rcl_ops.train.data import CropBatch
    from rcl_ops.train.losses import FeatureConsistencyLoss, RCLObjective, contrastive_loss

    objective = RCLObjective(
        contrastive_loss("emd", 0.1, False, "auto", None), FeatureConsistencyLoss(ResNet50Encoder(1)), 1e-3, 1.0, False
    )
    observed = torch.rand(4, 3, 16, 16)
    batch = CropBatch(observed, observed.clone(), None, None, observed, observed)
    identity = torch.nn.Identity()
    terms = objective.compute(identity, batch, torch.Generator())
    # the identity map has zero residuals: every distance is 0, the loss is exactly chance, no retrieval
    assert float(terms.parts["contrast_per_query"]) == pytest.approx(math.log(4))
    assert terms.parts["contrast_chance"] == pytest.approx(math.log(4))
    assert terms.parts["retrieval_top1"] == 0.0
    assert float(terms.consistency) == 0.0
    assert torch.equal(terms.loss, terms.contrast + terms.consistency)


def test_contrast_reduction_and_distance_scale():
    from rcl_ops.train.data import CropBatch

    generator = torch.Generator().manual_seed(0)
    observed = torch.rand(4, 3, 16, 16, generator=generator)
    batch = CropBatch(observed, torch.rand(4, 3, 16, 16, generator=generator), None, None, observed, observed)
    model = UNet(width=4, depth=1)
    encoder = ResNet50Encoder(1)

    def terms(**options):
        config = build_config(crop_size=16, batch_size=4, alpha=1.0, **options)
        return objective_of("rcl-emd", config, encoder).compute(model, batch, torch.Generator())

    mean, summed = terms(contrast_reduction="mean"), terms(contrast_reduction="sum")
    assert float(summed.contrast.detach()) == pytest.approx(
        4 * float(mean.contrast.detach()), rel=1e-5
    )  # Algorithm 1 sums
    unit = terms(contrast_reduction="mean", distance_scale="unit")
    assert build_config().distance_scale == "8bit"
    assert torch.allclose(mean.distances, 255 * unit.distances, rtol=1e-4)  # EMD is linear in the scale
    per_crop = terms(consistency_reduction="sum")
    features = encoder(observed).shape[1:].numel()
    assert float(per_crop.consistency.detach()) == pytest.approx(features * float(mean.consistency.detach()), rel=1e-4)


def test_rcl_controls_leave_out_one_term():
    generator = torch.Generator().manual_seed(0)
    observed = torch.rand(4, 3, 16, 16, generator=generator)
    batch = CropBatch(observed[:2], observed[2:], None, None, observed[:2], observed[2:])
    model, encoder = UNet(width=4, depth=1), ResNet50Encoder(1)
    config = build_config(crop_size=16, batch_size=2, methods=["rcl", "consistency", "contrast"])
    assert config.methods == ["rcl-emd", "consistency", "contrast-emd"]
    assert config.variant_keys() == ["rcl-emd+random", "consistency+random", "contrast-emd"]
    with torch.no_grad():
        full = objective_of("rcl-emd", config, encoder).compute(model, batch, generator)
        consistency_only = objective_of("consistency", config, encoder).compute(model, batch, generator)
        contrast_only = objective_of("contrast-emd", config, None).compute(model, batch, generator)
    assert float(consistency_only.contrast) == 0 and float(consistency_only.consistency) == float(full.consistency)
    assert float(contrast_only.consistency) == 0 and float(contrast_only.contrast) == float(full.contrast)
    assert float(full.contrast) > 0 and float(full.consistency) > 0
    assert consistency_only.parts["contrast_per_query"] == full.parts["contrast_per_query"]  # still measured


@pytest.mark.parametrize("method", ["rcl-mmd", "rcl-bd", "rcl-emd", "n2n", "n2s", "sl", "m2m"])
@pytest.mark.parametrize("modality", ["rgb", "raw"])
def test_objectives_give_finite_gradients(method, modality):
    # MMD runs on the O(M^2) reference backend when no native backend is built: tiny crops
    if method == "m2m" and modality == "rgb":
        pytest.skip("mosaic2mosaic is a RAW method")
    task = DENOISING_TASK[modality]
    method = f"sl-{task}" if method == "sl" else method
    config = build_config(crop_size=8, batch_size=3, modality=modality, tasks=[task])
    raw = modality == "raw"
    images = [CleanImage(f"im{i}", torch.rand(3, 12, 12)) for i in range(3)]
    records = make_records(images, modality, 0, 20, 0, second_draw=True, burst=method == "m2m")
    for record in records:
        record.task_inputs = {task: task_input(task, record, modality)}
    model = build_model("unet", 4, 1, raw=raw)
    objective = objective_of(method, config, None if raw else ResNet50Encoder(1))
    sampler = CropSampler(
        records, 8, torch.Generator().manual_seed(0), raw=raw, task=METHODS[method].task, burst=METHODS[method].burst
    )
    loss, parts = objective(model, sampler.sample(3), sampler.generator)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(float(v)) for v in parts.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
