"""The public sketch API: pairing sketches equals the pairwise functions on residuals, on every
backend, values and gradients; layouts that cannot be paired raise errors that say why."""

from __future__ import annotations

import pytest
import torch
from utils import ALL_BACKENDS, backend_device

import rcl_ops


def _inputs(device, dtype=torch.float64):
    q = torch.randn(4, 3, 6, 6, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(5, 3, 6, 6, dtype=dtype, device=device, requires_grad=True)
    return q, k


def _values_and_grads(distances, q, k):
    grads = torch.autograd.grad((distances * torch.randn_like(distances)).sum(), (q, k))
    return distances.detach(), grads


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    ("distance", "options"), [("emd", {}), ("emd", {"num_quantiles": 7}), ("bd", {})], ids=["emd", "emd-K", "bd"]
)
def test_pairing_sketches_equals_the_pairwise_function(backend, distance, options):
    q, k = _inputs(backend_device(backend))
    pairwise = getattr(rcl_ops, f"pairwise_{distance}")
    sketch = getattr(rcl_ops, f"{distance}_sketch")
    torch.manual_seed(1)
    want, want_grads = _values_and_grads(pairwise(q, k, backend=backend, **options), q, k)
    torch.manual_seed(1)
    sketches = sketch(q, backend=backend, **options), sketch(k, backend=backend, **options)
    got, got_grads = _values_and_grads(pairwise(*sketches, backend=backend), q, k)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # A sketch beside residuals: the residuals are sketched alike.
    torch.testing.assert_close(pairwise(sketches[0], k, backend=backend).detach(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_sketches_on_the_batch_grid_match_the_grid_mmd(unbiased):
    q, k = _inputs("cpu")
    lo = min(q.min().item(), k.min().item())
    hi = max(q.max().item(), k.max().item())
    options = {"bandwidth": [0.7, 1.5], "unbiased": unbiased}
    torch.manual_seed(1)
    want, want_grads = _values_and_grads(rcl_ops.pairwise_mmd(q, k, method="grid", num_bins=512, **options), q, k)
    torch.manual_seed(1)
    sketches = [rcl_ops.mmd_sketch(x, value_range=(lo, hi), num_bins=512) for x in (q, k)]
    got, got_grads = _values_and_grads(rcl_ops.pairwise_mmd(*sketches, **options), q, k)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        assert ((a - b).norm() / b.norm()).item() < 1e-3
    assert torch.allclose(sketches[0].values.sum(1), torch.ones(4, dtype=torch.float64))


def test_mmd_value_range_clamps_onto_its_ends():
    x = torch.tensor([[-5.0, 0.0, 5.0]])
    weights = rcl_ops.mmd_sketch(x, value_range=(-1.0, 1.0), num_bins=3).values
    torch.testing.assert_close(weights, torch.full((1, 3), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(
        rcl_ops.pairwise_mmd(x, x, value_range=(-1.0, 1.0), num_bins=3, bandwidth=1.0),
        torch.zeros(1, 1),
        atol=1e-12,
        rtol=0,
    )


def test_sketch_errors_name_the_problem():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="cannot combine an? EMD sketch of 4 quantiles"):
        rcl_ops.pairwise_emd(rcl_ops.emd_sketch(x, num_quantiles=4), rcl_ops.emd_sketch(x, num_quantiles=5))
    with pytest.raises(ValueError, match="same value_range"):
        rcl_ops.pairwise_mmd(
            rcl_ops.mmd_sketch(x, value_range=(-1, 1)), rcl_ops.mmd_sketch(x, value_range=(-2, 2)), bandwidth=1.0
        )
    with pytest.raises(ValueError, match="q is a bd sketch"):
        rcl_ops.pairwise_emd(rcl_ops.bd_sketch(x), x)
    with pytest.raises(ValueError, match="lo < hi"):
        rcl_ops.mmd_sketch(x, value_range=(1.0, 1.0))
    with pytest.raises(TypeError, match="value_range must be a pair"):
        rcl_ops.mmd_sketch(x, value_range=1.0)
    with pytest.raises(ValueError, match="method='grid'"):
        rcl_ops.pairwise_mmd(x, x, value_range=(-1, 1), method="direct")
