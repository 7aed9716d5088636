"""rcl_ops::pooled_std, the native MMD's default bandwidth in one op, against the Python
definition (rcl_ops.default_bandwidth) and a float64 formula, on the cases its rules are for."""

from __future__ import annotations

import pytest
import torch
from utils import NATIVE_BACKENDS, OpNames, backend_device

import rcl_ops

pytestmark = pytest.mark.skipif(not NATIVE_BACKENDS, reason="the native extension is not built")


@pytest.fixture(params=NATIVE_BACKENDS)
def device(request):
    return backend_device(request.param)


def _op(q, k):
    return torch.ops.rcl_ops.pooled_std(q, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("bq", "m", "bk", "n"), [(3, 12, 4, 12), (2, 70000, 3, 40000), (1, 2, 1, 3)])
def test_matches_the_python_definition_and_a_float64_formula(device, dtype, bq, m, bk, n):
    generator = torch.Generator().manual_seed(bq * m + n)
    q = (2.0 * torch.randn(bq, m, generator=generator, dtype=torch.float64) + 5.0).to(dtype).to(device)
    k = (0.5 * torch.randn(bk, n, generator=generator, dtype=torch.float64) - 1.0).to(dtype).to(device)
    got = _op(q, k)
    assert got.shape == (1,) and got.dtype == torch.float64
    values = torch.cat([q.double().flatten(), k.double().flatten()])
    torch.testing.assert_close(got, values.std(correction=0).reshape(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        got, rcl_ops.default_bandwidth(q, k), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0
    )


def test_is_one_only_where_every_value_is_equal(device):
    q, k = torch.full((2, 5), 3.0, device=device), torch.full((3, 4), 3.0, device=device)
    assert _op(q, k).item() == 1.0
    two_constants = torch.tensor([3.0] * 10 + [4.0] * 12, dtype=torch.float64).std(correction=0)
    assert _op(q, k + 1.0).item() == pytest.approx(two_constants.item(), rel=1e-14)
    # Values near 1e-200: the squares underflow float64, the std is 0 (not the constant's 1), for
    # the callers' range check to name.
    tiny = torch.randn(2, 6, dtype=torch.float64, device=device) * 1e-200
    assert _op(tiny, tiny.flip(1)).item() == 0.0


def test_nan_stays_nan(device):
    q, k = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)
    q[1, 2] = float("nan")
    assert torch.isnan(_op(q, k)).all() and torch.isnan(_op(k, q)).all()
    constant = torch.full((2, 5), 2.0, device=device)
    constant[0, 0] = float("nan")  # NaN among equal values is not "all equal"
    assert torch.isnan(_op(constant, torch.full((1, 5), 2.0, device=device))).all()


def test_does_not_depend_on_the_thread_count():
    q, k = torch.randn(7, 50000, dtype=torch.float64), torch.randn(5, 30000, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append(_op(q, k))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_the_grid_mmd_uses_it_and_still_names_a_bandwidth_out_of_range(device):
    q, k = torch.randn(3, 200, device=device), torch.randn(4, 200, device=device)
    torch.testing.assert_close(
        rcl_ops.pairwise_mmd(q, k, method="grid", backend=NATIVE_BACKENDS[0] if device == "cpu" else "cuda"),
        rcl_ops.pairwise_mmd(q, k, bandwidth=float(rcl_ops.default_bandwidth(q, k)), method="grid"),
        rtol=1e-6,
        atol=1e-9,
    )
    with OpNames() as seen:
        rcl_ops.pairwise_mmd(q, k, method="grid")
    assert "rcl_ops::pooled_std" in seen.names, sorted(seen.names)
    tiny = q.double() * 1e-200
    with pytest.raises(ValueError, match="default bandwidth"):
        rcl_ops.pairwise_mmd(tiny, tiny.flip(1), method="grid")


def test_refuses_bad_arguments(device):
    with pytest.raises(RuntimeError, match="rcl_ops::pooled_std: q must be 2-D"):
        _op(torch.randn(3, device=device), torch.randn(2, 3, device=device))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _op(torch.randn(2, 3, device=device).half(), torch.randn(2, 3, device=device).half())
    with pytest.raises(RuntimeError, match="rcl_ops::pooled_std"):
        _op(torch.randn(2, 3, device=device), torch.randn(2, 3, device=device, dtype=torch.float64))
