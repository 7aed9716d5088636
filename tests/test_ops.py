"""Per-op tests of the public distances on every backend that runs here, against float64
oracles written independently of the library (tests/utils.py: numpy double sums and closed forms): values at
the edges of the float range, accuracy of the exact MMD, gradients over several seeds, second
derivatives (supported or refused, never silently zero), option validation in the compute
precision, and one contract for the native and Triton op libraries. Property-based fuzzing of
the same oracles is in test_fuzz.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from utils import (
    ALL_BACKENDS,
    NATIVE_BACKENDS,
    as_numpy,
    assert_close_to_oracle,
    backend_device,
    bd_oracle,
    emd_oracle,
    mmd_oracle,
    relative_error,
    seeded_pair,
)

import rcl_ops


def _mmd_method(backend: str) -> str:
    return "grid" if backend == "triton" else "direct"


# ---- values at the edges of the float range --------------------------------------------------
# Each distance has a scaling law: EMD(s q, s k) = s EMD(q, k); MMD with bandwidth s h equals
# MMD with h at scale 1; BD with eps s^2 eps equals BD with eps. The oracle runs at scale 1 on
# the very values the backend saw (divided back by s in float64).

SCALES = {torch.float32: [1e-20, 1e20, 1e30], torch.float64: [1e-150, 1e150]}
SCALE_CASES = [(dtype, s) for dtype, scales in SCALES.items() for s in scales]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(("dtype", "scale"), SCALE_CASES, ids=[f"{d}-{s:g}" for d, s in SCALE_CASES])
def test_values_at_extreme_scales(backend, dtype, scale):
    device = backend_device(backend)
    q0, k0 = seeded_pair(torch.float64)
    q, k = (q0 * scale).to(dtype).to(device), (k0 * scale).to(dtype).to(device)
    qn, kn = as_numpy(q) / scale, as_numpy(k) / scale
    assert_close_to_oracle(rcl_ops.pairwise_emd(q, k, backend=backend) / scale, emd_oracle(qn, kn), dtype)
    assert_close_to_oracle(
        rcl_ops.pairwise_bd(q, k, eps=1e-6 * scale**2, backend=backend), bd_oracle(qn, kn, 1e-6), dtype
    )
    method = _mmd_method(backend)
    mmd = rcl_ops.pairwise_mmd(q, k, bandwidth=0.9 * scale, method=method, backend=backend)
    want = mmd_oracle(qn, kn, [0.9])
    if method == "grid":  # the grid's own accuracy: 1e-3 relative (test_mmd_grid.py)
        assert relative_error(mmd, want) < 1e-3
    else:
        assert_close_to_oracle(mmd, want, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_default_bandwidth_and_moments_do_not_overflow_float32(backend):
    # Values near 1e20: the variance (1e40) overflows float32, the distances do not.
    device = backend_device(backend)
    q, k = (t * 1e20 for t in seeded_pair(torch.float32))
    q, k = q.to(device), k.to(device)
    bandwidth = rcl_ops.default_bandwidth(q, k)
    pooled = np.concatenate([as_numpy(q).ravel(), as_numpy(k).ravel()])
    assert bandwidth.dtype == torch.float64 and abs(bandwidth.item() / pooled.std() - 1) < 1e-6
    mmd = rcl_ops.pairwise_mmd(q, k, method=_mmd_method(backend), backend=backend)
    assert torch.isfinite(mmd).all() and (mmd > 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_true_overflow_is_reported(backend):
    # |q - k| = 6e38 overflows float32: with the finite check on (CPU default) it is an error.
    device = backend_device(backend)
    q = torch.full((2, 8), 3e38, device=device)
    with rcl_ops_check_finite(True):
        with pytest.raises(OverflowError, match="pairwise_emd: the distances are not finite in torch.float32"):
            rcl_ops.pairwise_emd(q, -q, backend=backend)
    # ... and in float64 it is an ordinary number.
    assert torch.isfinite(rcl_ops.pairwise_emd(q.double(), -q.double(), backend=backend)).all()


class rcl_ops_check_finite:
    """Context: the NaN/Inf check on or off for every device type, restored after."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        rcl_ops.set_check_finite(self.enabled)

    def __exit__(self, *exc):
        rcl_ops.set_check_finite(None)


# ---- accuracy of the exact MMD and of the reference ------------------------------------------


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_direct_mmd_of_close_distributions_is_accurate(backend, unbiased):
    # q and k differ by 1e-3 noise: MMD^2 ~ 1e-10..1e-3 of kernel means ~ 1, where float32
    # sums cancelled to 1e-3 relative errors (and negative V-statistics).
    device = backend_device(backend)
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1500, generator=generator)
    k = q + 1e-3 * torch.randn(2, 1500, generator=generator)
    got = rcl_ops.pairwise_mmd(
        q.to(device), k.to(device), bandwidth=1.0, method="direct", unbiased=unbiased, backend=backend
    )
    want = mmd_oracle(as_numpy(q), as_numpy(k), [1.0], unbiased)
    assert relative_error(got, want, floor=1e-9) < 1e-4
    if not unbiased:
        assert (got >= 0).all()
    if backend in NATIVE_BACKENDS:  # at least as accurate as the grid
        grid = rcl_ops.pairwise_mmd(
            q.to(device), k.to(device), bandwidth=1.0, method="grid", unbiased=unbiased, backend=backend
        )
        assert relative_error(got, want, floor=1e-9) <= relative_error(grid, want, floor=1e-9)


def test_reference_is_float64_accurate_in_float32():
    # BD near equal variances (the log term ~1e-20: 7 digits lost by ln(1/4 (a/b + b/a + 2)))
    # and EMD over a million values (float32 cdist: 1e-3 off at M = 4e6).
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4096, generator=generator, dtype=torch.float64)
    q, k = x.float(), (x * (1 + 1e-9)).float()
    assert_close_to_oracle(
        rcl_ops.pairwise_bd(q, k, backend="reference"), bd_oracle(as_numpy(q), as_numpy(k), 1e-6), torch.float32
    )
    big_q = torch.randn(2, 1 << 20, generator=generator)
    big_k = 0.5 * torch.randn(2, 1 << 20, generator=generator) + 3.0
    want = np.abs(np.sort(as_numpy(big_q), axis=1)[:, None] - np.sort(as_numpy(big_k), axis=1)[None]).mean(axis=2)
    assert relative_error(rcl_ops.pairwise_emd(big_q, big_k, backend="reference"), want) < 1e-6


# ---- gradients ----------------------------------------------------------------------------------

DISTANCES = {
    "emd": (rcl_ops.pairwise_emd, {}),
    "emd_quantiles": (rcl_ops.pairwise_emd, {"num_quantiles": 5}),
    "mmd": (rcl_ops.pairwise_mmd, {"bandwidth": [0.7, 2.0]}),
    "bd": (rcl_ops.pairwise_bd, {}),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_over_seeds(backend, distance, seed):
    fn, options = DISTANCES[distance]
    if distance == "mmd":
        options = {**options, "method": _mmd_method(backend)}
        if backend == "triton":  # the grid is smooth in the values only between bin edges
            options["num_bins"] = 1 << 14
    device = backend_device(backend)
    q, k = seeded_pair(torch.float64, bq=2, bk=3, m=6, seed=seed)
    q, k = q.to(device).requires_grad_(True), k.to(device).requires_grad_(True)
    atol = 1e-4 if options.get("method") == "grid" else 1e-5
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, backend=backend, **options), (q, k), atol=atol)


@pytest.mark.parametrize("distance", ["emd", "bd"])
def test_reference_supports_double_backward(distance):
    fn, options = DISTANCES[distance]
    q, k = seeded_pair(torch.float64, bq=2, bk=3, m=6)
    q, k = q.requires_grad_(True), k.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda a, b: fn(a, b, backend="reference", **options), (q, k))


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "reference"] + ["reference-mmd"])
@pytest.mark.parametrize("distance", ["emd", "emd_quantiles", "mmd", "bd"])
def test_second_derivative_raises_where_not_implemented(backend, distance):
    # A gradient penalty on the contrastive loss: d/dq ||dL/dq||^2 needs second derivatives.
    if backend == "reference-mmd":
        if distance != "mmd":
            pytest.skip("the reference supports double backward of EMD and BD")
        backend = "reference"
    fn, options = DISTANCES[distance]
    if distance == "mmd":
        options = {**options, "method": _mmd_method(backend)}
    device = backend_device(backend)
    q, k = seeded_pair(torch.float64, bq=3, bk=3, m=6)
    q = q.to(device).requires_grad_(True)
    k = k.to(device)
    loss = rcl_ops.residual_contrastive_loss(-fn(q, k, backend=backend, **options), temperature=0.5)
    (grad_q,) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented|no autograd formula was registered|once_differentiable"):
        grad_q.square().sum().backward()


# ---- options validated in the precision of the computation ------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bandwidth_limits(backend):
    device = backend_device(backend)
    q, k = (t.to(device) for t in seeded_pair(torch.float32))
    method = _mmd_method(backend)
    # 1e-30 is 0 after squaring in float32, finite in float64 (where the kernels evaluate it):
    # the limit h -> 0 of the V-statistic, 1/M + 1/N for distinct values.
    if method == "direct":
        tiny = rcl_ops.pairwise_mmd(q, k, bandwidth=1e-30, method=method, backend=backend)
        torch.testing.assert_close(tiny.cpu(), torch.full((3, 4), 2 / 24))
    # Far beyond the data's range: every kernel value is 1, the MMD 0.
    assert rcl_ops.pairwise_mmd(q, k, bandwidth=1e30, method=method, backend=backend).abs().max() < 1e-6
    with pytest.raises(ValueError, match="overflows float64"):
        rcl_ops.pairwise_mmd(q, k, bandwidth=1e-200, backend=backend)
    for bad in (b"\x01", "1", bytearray(b"\x01")):
        with pytest.raises(TypeError, match="bandwidth must be a float or a sequence"):
            rcl_ops.pairwise_mmd(q, k, bandwidth=bad, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_eps_limits(backend):
    device = backend_device(backend)
    q, k = (t.to(device) for t in seeded_pair(torch.float32))
    # eps = 1e39 is inf in float32, but BD is computed from float64 moments: the limit ~0.
    huge = rcl_ops.pairwise_bd(q, k, eps=1e39, backend=backend)
    assert torch.isfinite(huge).all() and huge.max() < 1e-30
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="eps must be a non-negative finite float"):
            rcl_ops.pairwise_bd(q, k, eps=bad, backend=backend)
    with pytest.raises(TypeError, match="eps must be a real number"):
        rcl_ops.pairwise_bd(q, k, eps=b"1", backend=backend)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "reference"])
def test_grid_warns_where_its_accuracy_is_untested(backend):
    device = backend_device(backend)
    q, k = (t.to(device) for t in seeded_pair(torch.float32))
    with rcl_ops_check_finite(True):
        with pytest.warns(rcl_ops.GridAccuracyWarning, match=r"raise num_bins \(to \d+\) or use method='direct'"):
            rcl_ops.pairwise_mmd(q, k, bandwidth=0.01, method="grid", num_bins=256, backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("error", rcl_ops.GridAccuracyWarning)
            rcl_ops.pairwise_mmd(q, k, method="grid", backend=backend)  # default bandwidth: range / h ~ 8


# ---- one contract for the native and Triton op libraries ---------------------------------------

SHARED_OPS = [
    "sorted_quantiles",
    "sorted_quantiles_backward",
    "emd_pair",
    "emd_pair_backward",
    "moments",
    "moments_backward",
    "bd_pair",
    "bd_pair_backward",
    "mmd_grid",
    "mmd_grid_backward",
]
BOTH_LIBRARIES = NATIVE_BACKENDS and "triton" in rcl_ops.available_backends()


@pytest.mark.skipif(not BOTH_LIBRARIES, reason="needs the native and the Triton backends")
@pytest.mark.parametrize("name", SHARED_OPS)
def test_native_and_triton_ops_share_their_schema(name):
    native = getattr(torch.ops.rcl_ops, name).default._schema
    triton = getattr(torch.ops.rcl_ops_triton, name).default._schema
    assert [(a.name, str(a.type)) for a in native.arguments] == [(a.name, str(a.type)) for a in triton.arguments]
    assert [str(r.type) for r in native.returns] == [str(r.type) for r in triton.returns]


@pytest.mark.skipif(not BOTH_LIBRARIES, reason="needs the native and the Triton backends")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_and_triton_ops_agree_on_dtypes_and_values(dtype):
    device = backend_device("triton")
    native_device = "cuda" if device == "cuda" and "cuda" in NATIVE_BACKENDS else "cpu"
    q, k = seeded_pair(dtype)
    h = torch.tensor([0.8], dtype=torch.float64)
    outputs = {}
    for namespace, dev in (("rcl_ops", native_device), ("rcl_ops_triton", device)):
        ops = getattr(torch.ops, namespace)
        qd, kd, hd = q.to(dev), k.to(dev), h.to(dev)
        sq, order = ops.sorted_quantiles(qd, 7)
        sk, _ = ops.sorted_quantiles(kd, 7)
        moments_q, moments_k = ops.moments(qd), ops.moments(kd)
        outputs[namespace] = [
            sq,
            order,
            ops.emd_pair(sq, sk),
            *moments_q,
            ops.bd_pair(*moments_q, *moments_k, 1e-6),
            *ops.mmd_grid(qd, kd, hd, 64, False),
        ]
    for native, triton in zip(outputs["rcl_ops"], outputs["rcl_ops_triton"]):
        assert native.dtype == triton.dtype and native.shape == triton.shape
        torch.testing.assert_close(triton.cpu(), native.cpu(), rtol=1e-4, atol=1e-6)


# ---- backward ops skip the gradients nobody needs --------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("side", ["q", "k"])
def test_gradient_of_one_side_only(backend, distance, side):
    # One side held fixed (e.g. keys from a momentum encoder): the other's gradient is the one
    # computed with both sides differentiable.
    fn, options = DISTANCES[distance]
    if distance == "mmd":
        options = {**options, "method": _mmd_method(backend)}
    device = backend_device(backend)
    q, k = (t.to(device) for t in seeded_pair(torch.float64, bq=3, bk=4, m=10))
    weights = torch.randn(3, 4, dtype=torch.float64, device=device)

    def grads(requires_q, requires_k):
        a, b = q.clone().requires_grad_(requires_q), k.clone().requires_grad_(requires_k)
        wanted = [t for t in (a, b) if t.requires_grad]
        return torch.autograd.grad((fn(a, b, backend=backend, **options) * weights).sum(), wanted)

    both = grads(True, True)
    (only,) = grads(side == "q", side == "k")
    torch.testing.assert_close(only, both[0 if side == "q" else 1])


@pytest.mark.parametrize("namespace", ["rcl_ops", "rcl_ops_triton"])
def test_backward_ops_return_placeholders_for_masked_sides(namespace):
    if namespace == "rcl_ops" and not NATIVE_BACKENDS or namespace == "rcl_ops_triton" and "triton" not in ALL_BACKENDS:
        pytest.skip(f"{namespace} is not loaded")
    device = backend_device("triton" if namespace == "rcl_ops_triton" else NATIVE_BACKENDS[0])
    ops = getattr(torch.ops, namespace)
    q, k = (t.to(device) for t in seeded_pair(torch.float32))
    grad = torch.randn(3, 4, device=device)
    sq, sk = ops.sorted_quantiles(q, 24)[0], ops.sorted_quantiles(k, 24)[0]
    full_q, full_k = ops.emd_pair_backward(grad, sq, sk, [True, True])
    only_q, skipped_k = ops.emd_pair_backward(grad, sq, sk, [True, False])
    skipped_q, only_k = ops.emd_pair_backward(grad, sq, sk, [False, True])
    assert skipped_k.numel() == 0 and skipped_q.numel() == 0
    torch.testing.assert_close(only_q, full_q)
    torch.testing.assert_close(only_k, full_k)
    moments = (*ops.moments(q), *ops.moments(k))
    grads = ops.bd_pair_backward(grad, *moments, 1e-6, [False, True])
    assert [g.numel() for g in grads] == [0, 0, 4, 4]
    h = torch.tensor([0.8], dtype=torch.float64, device=device)
    _, grid, w_q, w_k = ops.mmd_grid(q, k, h, 64, False)
    grad_q, grad_k = ops.mmd_grid_backward(grad, q, k, h, grid, w_q, w_k, 64, False, [True, False])
    assert grad_q.shape == q.shape and grad_k.numel() == 0
