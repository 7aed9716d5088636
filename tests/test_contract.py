"""The probes of issue 25 (the library's part): each failed on the code before the fix, grouped as
the issue groups them (silent wrong results, documented promises broken, unclear errors), then
the shared validation layer of the options (what must be true, point 2)."""

from __future__ import annotations

import pytest
import torch

import rcl_ops


def _pair(dtype=torch.float64, bq=3, bk=4, m=12, requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(bq, m, generator=generator, dtype=torch.float64).to(dtype)
    k = (1.3 * torch.randn(bk, m, generator=generator, dtype=torch.float64) + 0.2).to(dtype)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


def _gradient_penalty_backward(distance_fn) -> None:
    """A loss plus a penalty on its own input gradient, backward: needs the second derivative."""
    q, k = _pair(requires_grad=True)
    loss = distance_fn(q, k).sum()
    (grad_q,) = torch.autograd.grad(loss, q, create_graph=True)
    (loss + grad_q.square().sum()).backward()


# ---- silent wrong results --------------------------------------------------------------------


class TestSilentWrongResults:
    def test_reference_mmd_gradient_penalty_raises(self):
        # grad(D.sum()) has a constant incoming gradient: once_differentiable let it through as a
        # constant, so the penalty contributed nothing.
        with pytest.raises(RuntimeError, match="second derivative.*not implemented"):
            _gradient_penalty_backward(lambda q, k: rcl_ops.pairwise_mmd(q, k, bandwidth=1.0, backend="reference"))

    def test_grid_mmd_through_sketches_has_no_second_derivative(self):
        # The binning's backward was differentiated as written: 1.8% off finite differences.
        def grid_mmd(q, k):
            return rcl_ops.pairwise_mmd(q, k, value_range=(-5.0, 5.0), num_bins=64, bandwidth=1.0)

        with pytest.raises(RuntimeError, match="second derivative.*not implemented"):
            _gradient_penalty_backward(grid_mmd)
