"""Property-based fuzzing (hypothesis) of every backend against the float64 oracles of
tests/utils.py: odd shapes, ties, heavy tails and extreme magnitudes. The exact distances (EMD,
direct MMD, BD) must match the oracle to the rounding of their dtype."""

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")  # a GPU image without it still runs the other test files

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from utils import ALL_BACKENDS, ORACLE_RTOL, backend_device, bd_oracle, emd_oracle, mmd_oracle

import rcl_ops

# Fewer examples where every call runs the Triton interpreter.
EXAMPLES = {"triton": 8}


def fuzz_settings(backend: str, examples: int) -> settings:
    """Deterministic (derandomized, no example database) and without deadlines."""
    return settings(
        max_examples=EXAMPLES.get(backend, examples),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


@st.composite
def residual_pairs(draw):
    """(q, k, dtype): Bq, Bk in [1, 4]; M in [2, 33]; normal, tied, Cauchy or spiky values at a
    magnitude from 1e-15 to 1e15."""
    bq, bk = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    count = draw(st.integers(2, 33))
    kind = draw(st.sampled_from(["normal", "ties", "cauchy", "spikes"]))
    scale = 10.0 ** draw(st.integers(-15, 15))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (bq + bk, count)
    if kind == "normal":
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
    elif kind == "ties":
        values = torch.randint(-2, 3, shape, generator=generator).double()
    elif kind == "cauchy":
        values = torch.tan(torch.pi * (torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5))
    else:  # mostly zeros, a few large values
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * 1e-3
        values[:, 0] = 1e3
    values = (values * scale).to(dtype)
    # Constant rows (ties of one value) have no sample variance; BD then depends on eps alone.
    return values[:bq], values[bq:], dtype


def _check(backend, got, want, dtype, atol):
    """|got - want| <= 4 ORACLE_RTOL |want| + atol. The oracle runs on the same rounded values,
    so what is left is the output's rounding to its dtype and each side's float64 rounding
    where the result is ill-conditioned in it (atol)."""
    error = (got.detach().double().cpu() - torch.as_tensor(want)).abs()
    bound = 4 * ORACLE_RTOL[dtype] * torch.as_tensor(want).abs() + atol
    assert (error <= bound).all(), (backend, got, want)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fuzz_emd(backend):
    @fuzz_settings(backend, 40)
    @given(residual_pairs())
    def check(pair):
        q, k, dtype = pair
        device = backend_device(backend)
        got = rcl_ops.pairwise_emd(q.to(device), k.to(device), backend=backend)
        want = emd_oracle(q.double().numpy(), k.double().numpy())
        _check(backend, got, want, dtype, atol=1e-14 * float(want.max()))

    check()


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
def test_fuzz_direct_mmd(backend):
    @fuzz_settings(backend, 30)
    @given(residual_pairs(), st.floats(0.2, 5.0), st.booleans())
    def check(pair, relative_bandwidth, unbiased):
        q, k, dtype = pair
        qn, kn = q.double().numpy(), k.double().numpy()
        spread = float(np.concatenate([qn.ravel(), kn.ravel()]).std()) or 1.0
        h = relative_bandwidth * spread
        device = backend_device(backend)
        got = rcl_ops.pairwise_mmd(
            q.to(device), k.to(device), bandwidth=h, unbiased=unbiased, method="direct", backend=backend
        )
        # The kernel means are O(1) and cancel: float64 leaves ~1e-16 M N of absolute error.
        _check(backend, got, mmd_oracle(qn, kn, [h], unbiased), dtype, atol=1e-13)

    check()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fuzz_bd(backend):
    @fuzz_settings(backend, 40)
    @given(residual_pairs())
    def check(pair):
        q, k, dtype = pair
        qn, kn = q.double().numpy(), k.double().numpy()
        eps = 1e-6 * float(np.concatenate([qn.ravel(), kn.ravel()]).var() or 1.0)
        device = backend_device(backend)
        got = rcl_ops.pairwise_bd(q.to(device), k.to(device), eps=eps, backend=backend)
        want = bd_oracle(qn, kn, eps)
        # The log term is ill-conditioned in the variances (a float64 rounding of a moves it by
        # ~1e-16 sqrt(BD)): that much absolute error is the oracle's own.
        _check(backend, got, want, dtype, atol=1e-15 * float(np.sqrt(want.max())))

    check()
