"""Accuracy of the binned-grid MMD against the exact float64 double sum.

Value within 1e-3 relative and gradient cosine similarity >= 0.999 for data range / bandwidth
from 0.1 to 100, on Gaussian and heavy-tailed residuals.
"""

import pytest
import torch
from utils import NATIVE_BACKENDS, backend_device

import rcl_ops

pytestmark = pytest.mark.skipif(not NATIVE_BACKENDS, reason="the native extension rcl_ops._C is not built")


def _samples(kind: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """(4, count) residuals with different scales and shifts."""
    if kind == "gaussian":
        base = torch.randn(4, count, generator=generator, dtype=torch.float64)
    else:  # Student-t with 2 degrees of freedom: heavy tails, range dominated by outliers
        normal = torch.randn(4, count, generator=generator, dtype=torch.float64)
        chi2 = torch.randn(4, count, 2, generator=generator, dtype=torch.float64).square().sum(-1)
        base = normal / (chi2 / 2).sqrt()
    scale = torch.tensor([1.0, 1.2, 0.8, 1.0], dtype=torch.float64)[:, None]
    shift = torch.tensor([0.0, 0.1, -0.05, 0.3], dtype=torch.float64)[:, None]
    return base * scale + shift


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(), b.flatten()  # not F.cosine_similarity: its eps floors the tiny norms at large h
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("kind", ["gaussian", "student_t"])
@pytest.mark.parametrize("range_over_h", [0.1, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("unbiased", [False, True])
def test_grid_matches_exact(backend, kind, range_over_h, unbiased):
    generator = torch.Generator().manual_seed(int(range_over_h * 10) + (kind == "gaussian"))
    values = _samples(kind, 1000, generator)
    bandwidth = ((values.max() - values.min()) / range_over_h).item()
    q, k = values[:2], values[2:]
    weights = torch.randn(2, 2, generator=generator, dtype=torch.float64)

    def run(name, device, dtype, **options):
        qa = q.to(device, dtype).requires_grad_(True)
        ka = k.to(device, dtype).requires_grad_(True)
        out = rcl_ops.pairwise_mmd(qa, ka, bandwidth=bandwidth, unbiased=unbiased, backend=name, **options)
        grads = torch.autograd.grad((out * weights.to(device, dtype)).sum(), (qa, ka))
        return out.double().cpu(), [g.double().cpu() for g in grads]

    exact, exact_grads = run("reference", "cpu", torch.float64)
    device = backend_device(backend)
    for dtype in (torch.float64, torch.float32):
        got, got_grads = run(backend, device, dtype, method="grid")
        scale = exact.abs().max()
        assert ((got - exact).abs() / exact.abs().clamp_min(1e-3 * scale)).max() < 1e-3, (got, exact)
        for g, e in zip(got_grads, exact_grads):
            assert _cosine(g, e) >= 0.999


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_grid_with_several_bandwidths_and_tiny_mmd(backend):
    device = backend_device(backend)
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(3, 800, generator=generator, dtype=torch.float64)
    k = q + 1e-3 * torch.randn(3, 800, generator=generator, dtype=torch.float64)  # MMD^2 << its terms
    exact = rcl_ops.pairwise_mmd(q, k, bandwidth=[0.5, 5.0, 50.0], backend="reference")
    for dtype in (torch.float64, torch.float32):
        got = rcl_ops.pairwise_mmd(
            q.to(device, dtype), k.to(device, dtype), bandwidth=[0.5, 5.0, 50.0], backend=backend
        )
        assert ((got.double().cpu() - exact).abs() / exact.abs()).max() < 1e-2


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_grid_resolution_controls_error(backend):
    device = backend_device(backend)
    q = torch.randn(2, 500, dtype=torch.float64)
    k = 1.5 * torch.randn(2, 500, dtype=torch.float64)
    exact = rcl_ops.pairwise_mmd(q, k, bandwidth=0.1, backend="reference")
    errors = [
        (rcl_ops.pairwise_mmd(q.to(device), k.to(device), bandwidth=0.1, num_bins=g, backend=backend).cpu() - exact)
        .abs()
        .max()
        .item()
        for g in (64, 512, 4096)
    ]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_grid_on_large_residuals(backend):
    """3x128x128 values per residual: float32 agrees with float64, gradients are finite."""
    device = backend_device(backend)
    q = torch.randn(2, 3, 128, 128, device=device)
    k = 1.1 * torch.randn(3, 3, 128, 128, device=device)
    qa = q.requires_grad_(True)
    out = rcl_ops.pairwise_mmd(qa, k, backend=backend)
    out.sum().backward()
    assert torch.isfinite(qa.grad).all()
    out64 = rcl_ops.pairwise_mmd(q.detach().double(), k.double(), backend=backend)
    torch.testing.assert_close(out.double(), out64, rtol=1e-4, atol=1e-7)
