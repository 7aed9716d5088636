"""The fused InfoNCE op (rcl_ops::info_nce) behind residual_contrastive_loss: against torch's cross
entropy (the reference backend's loss) and a float64 double sum, its first and second derivatives,
its argument checks, and which path the loss takes."""

from __future__ import annotations

import math

import pytest
import torch
from utils import NATIVE_BACKENDS, OpNames, backend_device

import rcl_ops

pytestmark = pytest.mark.skipif(not NATIVE_BACKENDS, reason="the native extension is not built")

# (Bq, Bk, symmetric, first_positive)
LAYOUTS = [(5, 5, False, 0), (6, 6, True, 0), (3, 9, False, 2), (4, 11, False, 0), (1, 2, False, 0)]
LAYOUT_IDS = ["square", "symmetric", "offset", "extra-negatives", "smallest"]


def _distances(bq, bk, dtype, device, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.rand(bq, bk, generator=generator, dtype=torch.float64)).to(dtype).to(device)


def _double_sum_losses(distances: torch.Tensor, temperature: float, symmetric: bool, first_positive: int):
    """Per-row InfoNCE by explicit float64 sums over Python floats (an independent formula)."""
    d = distances.double().cpu().tolist()
    rows, columns = len(d), len(d[0])

    def line_loss(values, target):
        logits = [-v / temperature for v in values]
        top = max(logits)
        return top + math.log(sum(math.exp(v - top) for v in logits)) - logits[target]

    losses = []
    for i in range(rows):
        loss = line_loss(d[i], first_positive + i)
        if symmetric:
            loss = 0.5 * (loss + line_loss([d[r][i] for r in range(rows)], i))
        losses.append(loss)
    assert columns >= 2
    return torch.tensor(losses, dtype=torch.float64)


@pytest.fixture(params=NATIVE_BACKENDS)
def device(request):
    return backend_device(request.param)


@pytest.mark.parametrize(("bq", "bk", "symmetric", "first_positive"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_fused_loss_matches_torch_cross_entropy(device, bq, bk, symmetric, first_positive, reduction):
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        distances = _distances(bq, bk, dtype, device, scale=3.0).requires_grad_()
        fused = rcl_ops.residual_contrastive_loss(distances, 0.2, symmetric, reduction, first_positive)
        expected = rcl_ops.residual_contrastive_loss(
            distances, 0.2, symmetric, reduction, first_positive, backend="reference"
        )
        torch.testing.assert_close(fused, expected, rtol=tolerance, atol=tolerance)
        weights = torch.rand(fused.shape, dtype=dtype, device=device)
        (got,) = torch.autograd.grad((fused * weights).sum(), distances)
        (want,) = torch.autograd.grad((expected * weights).sum(), distances)
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(("bq", "bk", "symmetric", "first_positive"), LAYOUTS, ids=LAYOUT_IDS)
def test_fused_loss_matches_a_float64_double_sum(device, bq, bk, symmetric, first_positive):
    # Logits up to 1e4 apart: the max-shifted sums stay exact where a naive exp would overflow.
    distances = _distances(bq, bk, torch.float64, device, scale=100.0, seed=1)
    temperature = 0.01
    got = rcl_ops.residual_contrastive_loss(distances, temperature, symmetric, "none", first_positive)
    expected = _double_sum_losses(distances, temperature, symmetric, first_positive)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(("bq", "bk", "symmetric", "first_positive"), LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_first_and_second_derivatives(device, bq, bk, symmetric, first_positive):
    distances = _distances(bq, bk, torch.float64, device, scale=2.0).requires_grad_()

    def losses(d):
        return torch.ops.rcl_ops.info_nce(d, 0.3, symmetric, first_positive)[0]

    assert torch.autograd.gradcheck(losses, (distances,))
    # A gradient penalty needs the second derivative: computed by differentiable ops, never zero.
    assert torch.autograd.gradgradcheck(losses, (distances,))


def test_the_loss_takes_the_fused_op_unless_the_reference_is_asked_for(device):
    distances = _distances(4, 4, torch.float32, device)
    for backend, fused in (("auto", True), ("reference", False)):
        with OpNames() as seen:
            rcl_ops.residual_contrastive_loss(distances, 0.1, backend=backend)
        assert ("rcl_ops::info_nce" in seen.names) == fused, (backend, sorted(seen.names))
    with OpNames() as seen:  # half distances: torch's cross entropy (the op takes float32/float64)
        rcl_ops.residual_contrastive_loss(distances.to(torch.bfloat16), 0.1)
    assert "rcl_ops::info_nce" not in seen.names


def test_module_with_the_reference_backend_keeps_torch_ops(device):
    q, k = torch.randn(4, 30, device=device), torch.randn(4, 30, device=device)
    fused = rcl_ops.ResidualContrastiveLoss("bd", temperature=0.1)(q, k)
    reference = rcl_ops.ResidualContrastiveLoss("bd", temperature=0.1, backend="reference")(q, k)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "temperature", "symmetric", "first_positive", "message"),
    [
        ((3,), 0.1, False, 0, "must be 2-D"),
        ((3, 3), 0.0, False, 0, "temperature must be positive and finite"),
        ((3, 3), math.inf, False, 0, "temperature must be positive and finite"),
        ((3, 4), 0.1, True, 0, "symmetric needs a square matrix"),
        ((3, 4), 0.1, False, 2, "Bk >= max"),
        ((1, 1), 0.1, False, 0, "Bk >= max"),
        ((3, 3), 0.1, False, -1, "first_positive must be >= 0"),
    ],
)
def test_the_op_refuses_bad_arguments(device, shape, temperature, symmetric, first_positive, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rcl_ops.info_nce(torch.rand(shape, device=device), temperature, symmetric, first_positive)


def test_the_op_refuses_integer_distances(device):
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.rcl_ops.info_nce(torch.ones(3, 3, dtype=torch.int64, device=device), 0.1, False, 0)


def test_an_overflowing_temperature_still_names_itself(device):
    # float32 logits near 1e30 overflow the float32 loss the op returns: the loss's check names it.
    distances = _distances(3, 3, torch.float32, device, scale=1e10)
    with pytest.raises(OverflowError, match="temperature 1e-30"):
        rcl_ops.residual_contrastive_loss(distances, 1e-30)
