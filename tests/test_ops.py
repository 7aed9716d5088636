"""Per-op tests of the public distances: one tester class per op (TestEMD, TestMMD, TestBD),
each test parametrised over the backends that run here (utils.ALL_BACKENDS; the comparisons
with the reference over utils.KERNEL_BACKENDS, every backend but the reference). Against float64
oracles written independently of the library (utils: numpy double sums and closed forms) and
against the reference backend: values at the edges of the float range, accuracy of the exact
MMD, values and gradients on ragged tiles, odd layouts, constant and long residuals, half
inputs, gradients over several seeds and of one side only, second derivatives (supported or
refused, never silently zero), option validation in the compute precision, and torch.compile.
The tests every distance shares are written once, in DistanceTester (as torchvision's
RoIOpTester). Property-based fuzzing of the same oracles is in test_fuzz.py; the contract that
the native and Triton op libraries share is in test_op_contract.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from utils import (
    ALL_BACKENDS,
    KERNEL_BACKENDS,
    NATIVE_BACKENDS,
    ORACLE_RTOL,
    TOLERANCE,
    as_numpy,
    assert_close_to_oracle,
    assert_compiled_loss_matches_eager,
    backend_device,
    bd_oracle,
    compare_with_reference,
    emd_oracle,
    mmd_oracle,
    relative_error,
    seeded_pair,
)

import rcl_ops

# triton 3.6's interpreter warns on every loop with a runtime bound (numpy >= 1.25); harmless
# with the numpy < 2.4 of requirements-test.txt.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _mmd_method(backend: str) -> str:
    return "grid" if backend == "triton" else "direct"


class rcl_ops_check_finite:
    """Context: the NaN/Inf check on or off for every device type, restored after."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        rcl_ops.set_check_finite(self.enabled)

    def __exit__(self, *exc):
        rcl_ops.set_check_finite(None)


# Each distance has a scaling law: EMD(s q, s k) = s EMD(q, k); MMD with bandwidth s h equals
# MMD with h at scale 1; BD with eps s^2 eps equals BD with eps. The oracle runs at scale 1 on
# the very values the backend saw (divided back by s in float64).
SCALES = {torch.float32: [1e-20, 1e20, 1e30], torch.float64: [1e-150, 1e150]}
SCALE_CASES = [(dtype, s) for dtype, scales in SCALES.items() for s in scales]

# torch.compile per kernel backend: the native ops under inductor on 3x8x8 residuals, the Triton
# ops (interpreted on CPU tensors) under aot_eager on 3x5x7 ones.
COMPILE_SETTINGS = {"triton": ("aot_eager", (3, 5, 7))}
NATIVE_COMPILE_SETTINGS = ("inductor", (3, 8, 8))


class DistanceTester:
    """The tests every distance shares. A subclass names its public function (``fn``), its
    name for the loss (``distance``), its cases against the reference (the ``options``
    fixture), its cases for the gradient tests (``gradient_options``) and how it checks values
    at an extreme scale (``check_at_scale``)."""

    fn = None
    distance = ""
    reference_has_double_backward = True

    @pytest.fixture(params=KERNEL_BACKENDS)
    def kernel_backend(self, request):
        """The backends with kernels of their own: every backend but the reference."""
        return request.param

    @pytest.fixture(params=KERNEL_BACKENDS)
    def compared_backend(self, request):
        """The backends compared with the reference on the ``options`` cases."""
        return request.param

    def with_method(self, backend: str, options: dict) -> dict:
        """``options`` with what ``backend`` needs beyond them (the MMD method)."""
        return options

    def gradcheck_options(self, backend: str, options: dict) -> dict:
        return self.with_method(backend, options)

    def check_at_scale(self, backend, q, k, qn, kn, scale, dtype) -> None:
        raise NotImplementedError

    # ---- every backend ---------------------------------------------------------------------

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    @pytest.mark.parametrize(("dtype", "scale"), SCALE_CASES, ids=[f"{d}-{s:g}" for d, s in SCALE_CASES])
    def test_values_at_extreme_scales(self, backend, dtype, scale):
        device = backend_device(backend)
        q0, k0 = seeded_pair(torch.float64)
        q, k = (q0 * scale).to(dtype).to(device), (k0 * scale).to(dtype).to(device)
        self.check_at_scale(backend, q, k, as_numpy(q) / scale, as_numpy(k) / scale, scale, dtype)

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_gradcheck_over_seeds(self, backend, gradient_options, seed):
        options = self.gradcheck_options(backend, gradient_options)
        device = backend_device(backend)
        q, k = seeded_pair(torch.float64, bq=2, bk=3, m=6, seed=seed)
        q, k = q.to(device).requires_grad_(True), k.to(device).requires_grad_(True)
        atol = 1e-4 if options.get("method") == "grid" else 1e-5
        assert torch.autograd.gradcheck(lambda a, b: self.fn(a, b, backend=backend, **options), (q, k), atol=atol)

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    def test_second_derivative(self, backend, gradient_options):
        # A gradient penalty on the contrastive loss: d/dq ||dL/dq||^2 needs second derivatives.
        # The reference's EMD and BD have them; everywhere else they raise, never silently zero.
        options = self.with_method(backend, gradient_options)
        if backend == "reference" and self.reference_has_double_backward:
            q, k = seeded_pair(torch.float64, bq=2, bk=3, m=6)
            q, k = q.requires_grad_(True), k.requires_grad_(True)
            assert torch.autograd.gradgradcheck(lambda a, b: self.fn(a, b, backend=backend, **options), (q, k))
            return
        device = backend_device(backend)
        q, k = seeded_pair(torch.float64, bq=3, bk=3, m=6)
        q = q.to(device).requires_grad_(True)
        k = k.to(device)
        loss = rcl_ops.residual_contrastive_loss(-self.fn(q, k, backend=backend, **options), temperature=0.5)
        (grad_q,) = torch.autograd.grad(loss, q, create_graph=True)
        with pytest.raises(
            RuntimeError, match="not implemented|no autograd formula was registered|once_differentiable"
        ):
            grad_q.square().sum().backward()

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    @pytest.mark.parametrize("side", ["q", "k"])
    def test_gradient_of_one_side_only(self, backend, gradient_options, side):
        # One side held fixed (e.g. keys from a momentum encoder): the other's gradient is the one
        # computed with both sides differentiable.
        options = self.with_method(backend, gradient_options)
        device = backend_device(backend)
        q, k = (t.to(device) for t in seeded_pair(torch.float64, bq=3, bk=4, m=10))
        weights = torch.randn(3, 4, dtype=torch.float64, device=device)

        def grads(requires_q, requires_k):
            a, b = q.clone().requires_grad_(requires_q), k.clone().requires_grad_(requires_k)
            wanted = [t for t in (a, b) if t.requires_grad]
            return torch.autograd.grad((self.fn(a, b, backend=backend, **options) * weights).sum(), wanted)

        both = grads(True, True)
        (only,) = grads(side == "q", side == "k")
        torch.testing.assert_close(only, both[0 if side == "q" else 1])

    # ---- the kernel backends: against the reference, half inputs, torch.compile ---------

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_matches_reference(self, compared_backend, options, dtype):
        device = backend_device(compared_backend)
        # Bq = 5 != Bk = 7: ragged tiles; M = 126, and M = K = 105: one ragged tile each way, K
        # not a multiple of BLOCK_D.
        for shape in ((3, 6, 7), (3, 5, 7)):
            q = torch.randn(5, *shape, dtype=dtype, device=device)
            k = (1.3 * torch.randn(7, *shape, dtype=dtype) + 0.1).to(device)
            compare_with_reference(self.fn, options, compared_backend, q, k)

    def test_gradcheck(self, compared_backend, options):
        device = backend_device(compared_backend)
        q = torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
        k = torch.randn(4, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: self.fn(a, b, backend=compared_backend, **options), (q, k))

    def test_layouts_and_edge_shapes(self, compared_backend, options):
        device = backend_device(compared_backend)
        base = torch.randn(4, 8, 6, 3, device=device, dtype=torch.float64)
        channels_last = base.permute(0, 3, 1, 2)  # (4, 3, 8, 6), channels-last strides
        assert not channels_last.is_contiguous()
        k = torch.randn(6, 3, 8, 6, device=device, dtype=torch.float64)[::2]  # strided batch
        compare_with_reference(self.fn, options, compared_backend, channels_last, k)
        compare_with_reference(self.fn, options, compared_backend, channels_last[:1], k[:1])  # B = 1
        compare_with_reference(self.fn, options, compared_backend, channels_last[:, 0, 0, :2], k[:, 0, 0, :2])  # M = 2

    def test_constant_residuals(self, compared_backend, options):
        device = backend_device(compared_backend)
        q = torch.full((3, 2, 4, 4), 0.25, dtype=torch.float64, device=device)
        k = torch.randn(2, 2, 4, 4, dtype=torch.float64, device=device)
        k[1] = -1.0
        reference_options = {key: value for key, value in options.items() if key != "method"}
        for a, b in ((q, k), (q, q)):
            expected = self.fn(a, b, backend="reference", **reference_options)
            got = self.fn(a, b, backend=compared_backend, **options)
            torch.testing.assert_close(got, expected, **TOLERANCE[torch.float64])
            assert torch.isfinite(got).all()

    def test_half_inputs(self, kernel_backend):
        device = backend_device(kernel_backend)
        for shape in ((3, 16, 16), (3, 6, 6)):
            q, k = torch.randn(4, *shape, device=device), torch.randn(4, *shape, device=device)
            expected = self.fn(q, k, backend=kernel_backend)
            for dtype in (torch.float16, torch.bfloat16):
                qh = q.to(dtype).requires_grad_(True)
                got = self.fn(qh, k.to(dtype), backend=kernel_backend)
                assert got.dtype == torch.float32
                torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
                got.sum().backward()
                assert qh.grad.dtype == dtype and torch.isfinite(qh.grad.float()).all()

    def test_compiled_loss_fullgraph(self, kernel_backend):
        device = backend_device(kernel_backend)
        compile_backend, shape = COMPILE_SETTINGS.get(kernel_backend, NATIVE_COMPILE_SETTINGS)
        loss_fn = rcl_ops.ResidualContrastiveLoss(self.distance, temperature=0.2, backend=kernel_backend)
        q = torch.randn(6, *shape, device=device, requires_grad=True)
        k = torch.randn(6, *shape, device=device, requires_grad=True)
        assert_compiled_loss_matches_eager(loss_fn, q, k, compile_backend=compile_backend)

    def test_compiled_loss_reduce_overhead(self, kernel_backend):
        # mode="reduce-overhead" replays the step from CUDA graphs (README, host overhead); on CPU it
        # is the default mode, tested above.
        if backend_device(kernel_backend) != "cuda" or kernel_backend == "triton":
            pytest.skip("CUDA graphs of the native CUDA ops need a CUDA device")
        loss_fn = rcl_ops.ResidualContrastiveLoss(self.distance, temperature=0.2, backend=kernel_backend)
        q = torch.randn(6, 3, 32, 32, device="cuda", requires_grad=True)
        k = torch.randn(6, 3, 32, 32, device="cuda", requires_grad=True)
        assert_compiled_loss_matches_eager(loss_fn, q, k, mode="reduce-overhead", calls=4)


class LinearDistanceTester(DistanceTester):
    """The shared tests of the distances whose reference is cheap on long rows (EMD and BD; the
    exact MMD is O(M N)): several tiles, long rows, 3x128x128 residuals."""

    def test_several_ragged_tiles(self, compared_backend, options):
        # Bq = 17, Bk = 19, K = 130: two tiles each way (the last ragged) over several K chunks.
        device = backend_device(compared_backend)
        q = torch.randn(17, 130, dtype=torch.float64, device=device)
        k = torch.randn(19, 130, dtype=torch.float64, device=device) * 0.7 - 0.2
        compare_with_reference(self.fn, options, compared_backend, q, k)

    def test_long_rows(self, compared_backend, options):
        # M = 5000: several blocks per row in the sketch, scatter and moments loops.
        device = backend_device(compared_backend)
        q = torch.randn(2, 5000, dtype=torch.float64, device=device) + 3.0
        k = torch.randn(3, 5000, dtype=torch.float64, device=device) * 2.0
        compare_with_reference(self.fn, options, compared_backend, q, k)

    def test_large_residuals(self, compared_backend, options):
        device = backend_device(compared_backend)
        q = torch.randn(3, 3, 128, 128, device=device)
        k = 0.5 * torch.randn(2, 3, 128, 128, device=device) + 0.01
        compare_with_reference(self.fn, options, compared_backend, q, k)


class TestEMD(LinearDistanceTester):
    fn = staticmethod(rcl_ops.pairwise_emd)
    distance = "emd"

    @pytest.fixture(params=[{}, {"num_quantiles": 37}, {"num_quantiles": 150}], ids=["exact", "k37", "k150"])
    def options(self, request):
        return request.param

    @pytest.fixture(params=[{}, {"num_quantiles": 5}], ids=["exact", "k5"])
    def gradient_options(self, request):
        return request.param

    def check_at_scale(self, backend, q, k, qn, kn, scale, dtype):
        assert_close_to_oracle(rcl_ops.pairwise_emd(q, k, backend=backend) / scale, emd_oracle(qn, kn), dtype)

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    def test_a_true_overflow_is_reported(self, backend):
        # |q - k| = 6e38 overflows float32: with the finite check on (CPU default) it is an error.
        device = backend_device(backend)
        q = torch.full((2, 8), 3e38, device=device)
        with rcl_ops_check_finite(True):
            with pytest.raises(OverflowError, match="pairwise_emd: the distances are not finite in torch.float32"):
                rcl_ops.pairwise_emd(q, -q, backend=backend)
        # ... and in float64 it is an ordinary number.
        assert torch.isfinite(rcl_ops.pairwise_emd(q.double(), -q.double(), backend=backend)).all()

    def test_ties_in_sort(self, compared_backend):
        device = backend_device(compared_backend)
        q = torch.randint(-3, 4, (4, 200), device=device).float()
        k = torch.randint(-2, 3, (3, 200), device=device).float()
        expected = rcl_ops.pairwise_emd(q, k, backend="reference")
        torch.testing.assert_close(rcl_ops.pairwise_emd(q, k, backend=compared_backend), expected)

    def test_signed_zeros_and_ties_match_reference(self, compared_backend):
        # float32 rows of few distinct values, -0.0 among the zeros: the CUDA exact EMD reads its
        # sorted values back from the radix sort's keys (-0.0 as +0.0). Values against the
        # reference; gradients summed over each row's equal values (the sorted position a tied
        # value takes, and so its share, depends on the sort's tie order, which the reference's
        # torch.sort need not keep stable on every device).
        device = backend_device(compared_backend)
        choices = torch.tensor([0.0, -0.0, -0.0, 0.25, -0.25, 1.0, -3.0])
        q = choices[torch.randint(0, len(choices), (5, 2, 60))].to(device)
        k = (choices[torch.randint(0, len(choices), (6, 2, 60))] * 1.5).to(device)
        weights = torch.randn(5, 6, device=device)
        results = []
        for backend in (compared_backend, "reference"):
            qa, ka = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
            out = rcl_ops.pairwise_emd(qa, ka, backend=backend)
            grad_q, grad_k = torch.autograd.grad((out * weights).sum(), (qa, ka))
            results.append((out, _sums_over_equal_values(q, grad_q), _sums_over_equal_values(k, grad_k)))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


def _sums_over_equal_values(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, V): each row's gradient summed over its elements of each of the V distinct
    values of x (+0.0 and -0.0 one value), ascending."""
    rows = x.shape[0]
    distinct, which = torch.unique(x.reshape(rows, -1) + 0.0, return_inverse=True)
    sums = torch.zeros(rows, distinct.numel(), dtype=grad.dtype, device=grad.device)
    return sums.scatter_add_(1, which, grad.reshape(rows, -1))


class TestMMD(DistanceTester):
    fn = staticmethod(rcl_ops.pairwise_mmd)
    distance = "mmd"
    reference_has_double_backward = False  # the reference's exact sum is once_differentiable

    @pytest.fixture(params=NATIVE_BACKENDS)
    def compared_backend(self, request):
        """The backends whose exact sum is compared with the reference's: the Triton backend has
        only the grid (test_triton.py compares it with the native grid and the exact sum)."""
        return request.param

    @pytest.fixture(
        params=[
            {"method": "direct", "bandwidth": 0.8},
            {"method": "direct", "bandwidth": [0.4, 2.0], "unbiased": True},
        ],
        ids=["direct", "direct_unbiased"],
    )
    def options(self, request):
        return request.param

    @pytest.fixture(params=[{"bandwidth": [0.7, 2.0]}], ids=["two_h"])
    def gradient_options(self, request):
        return request.param

    def with_method(self, backend, options):
        return {**options, "method": _mmd_method(backend)}

    def gradcheck_options(self, backend, options):
        options = self.with_method(backend, options)
        if backend == "triton":  # the grid is smooth in the values only between bin edges
            options["num_bins"] = 1 << 14
        return options

    def check_at_scale(self, backend, q, k, qn, kn, scale, dtype):
        method = _mmd_method(backend)
        mmd = rcl_ops.pairwise_mmd(q, k, bandwidth=0.9 * scale, method=method, backend=backend)
        want = mmd_oracle(qn, kn, [0.9])
        if method == "grid":  # the grid's own accuracy: 1e-3 relative (test_mmd_grid.py)
            assert relative_error(mmd, want) < 1e-3
        else:
            assert_close_to_oracle(mmd, want, dtype)

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    def test_default_bandwidth_and_moments_do_not_overflow_float32(self, backend):
        # Values near 1e20: the variance (1e40) overflows float32, the distances do not.
        device = backend_device(backend)
        q, k = (t * 1e20 for t in seeded_pair(torch.float32))
        q, k = q.to(device), k.to(device)
        bandwidth = rcl_ops.default_bandwidth(q, k)
        pooled = np.concatenate([as_numpy(q).ravel(), as_numpy(k).ravel()])
        assert bandwidth.dtype == torch.float64 and abs(bandwidth.item() / pooled.std() - 1) < 1e-6
        mmd = rcl_ops.pairwise_mmd(q, k, method=_mmd_method(backend), backend=backend)
        assert torch.isfinite(mmd).all() and (mmd > 0).all()

    @pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
    @pytest.mark.parametrize("unbiased", [False, True])
    def test_direct_mmd_of_close_distributions_is_accurate(self, backend, unbiased):
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

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    def test_bandwidth_limits(self, backend):
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

    @pytest.mark.parametrize("backend", KERNEL_BACKENDS)
    def test_grid_warns_where_its_accuracy_is_untested(self, backend):
        device = backend_device(backend)
        q, k = (t.to(device) for t in seeded_pair(torch.float32))
        with rcl_ops_check_finite(True):
            with pytest.warns(rcl_ops.GridAccuracyWarning, match=r"raise num_bins \(to \d+\) or use method='direct'"):
                rcl_ops.pairwise_mmd(q, k, bandwidth=0.01, method="grid", num_bins=256, backend=backend)
            with warnings.catch_warnings():
                warnings.simplefilter("error", rcl_ops.GridAccuracyWarning)
                rcl_ops.pairwise_mmd(q, k, method="grid", backend=backend)  # default bandwidth: range / h ~ 8


class TestBD(LinearDistanceTester):
    fn = staticmethod(rcl_ops.pairwise_bd)
    distance = "bd"

    @pytest.fixture(params=[{}], ids=["default"])
    def options(self, request):
        return request.param

    @pytest.fixture(params=[{}], ids=["default"])
    def gradient_options(self, request):
        return request.param

    def check_at_scale(self, backend, q, k, qn, kn, scale, dtype):
        assert_close_to_oracle(
            rcl_ops.pairwise_bd(q, k, eps=1e-6 * scale**2, backend=backend), bd_oracle(qn, kn, 1e-6), dtype
        )

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    def test_eps_limits(self, backend):
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

    def test_many_rows(self, compared_backend):
        # More residuals than one BD tile (64 when interpreting, 32 compiled) on both sides.
        device = backend_device(compared_backend)
        q = torch.randn(67, 4, dtype=torch.float64, device=device)
        k = torch.randn(70, 4, dtype=torch.float64, device=device) + 0.5
        compare_with_reference(rcl_ops.pairwise_bd, {}, compared_backend, q, k)

    def test_gradient_far_from_zero_in_float32(self, kernel_backend):
        # Values 1e4 + N(0, 1) in float32, M = 3 * 128 * 128: the moments backward
        # dmean / M + 2 dvar (x - mean) / (M - 1), computed per element in float32 from per-row
        # coefficients, must not cancel. Norm-wise error against the float64 gradient of the
        # same (float32) values, at the float32 oracle tolerance.
        device = backend_device(kernel_backend)
        generator = torch.Generator().manual_seed(5)
        m = 3 * 128 * 128
        q = (1e4 + torch.randn(2, m, generator=generator, dtype=torch.float64)).float()
        k = (1e4 + 0.5 + 1.3 * torch.randn(3, m, generator=generator, dtype=torch.float64)).float()
        weights = torch.randn(2, 3, generator=generator, dtype=torch.float64)
        q64, k64 = q.double().requires_grad_(True), k.double().requires_grad_(True)
        (rcl_ops.pairwise_bd(q64, k64, backend="reference") * weights).sum().backward()
        got_q, got_k = q.to(device).requires_grad_(True), k.to(device).requires_grad_(True)
        (rcl_ops.pairwise_bd(got_q, got_k, backend=kernel_backend) * weights.float().to(device)).sum().backward()
        for got, want in ((got_q.grad, q64.grad), (got_k.grad, k64.grad)):
            assert got.dtype == torch.float32
            assert_close_to_oracle(got, want, torch.float32, floor=want.abs().max().item())
        # The tolerance catches the uncentred per-row form a + b x in float32 (a = dmean / M -
        # b mean, b = 2 dvar / (M - 1)), which cancels when |mean| >> std.
        x = q.double()
        grad_mean, grad_var = self._moment_gradients(q64.grad, x)
        slope = 2 * grad_var / (m - 1)
        uncentred = (grad_mean / m - slope * x.mean(1)).float()[:, None] + slope.float()[:, None] * q
        assert relative_error(uncentred, q64.grad, floor=q64.grad.abs().max().item()) > ORACLE_RTOL[torch.float32]

    @staticmethod
    def _moment_gradients(grad_x: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dL/dmean, dL/dvar) per row from dL/dx = dmean / M + 2 dvar (x - mean) / (M - 1):
        the sum over the row gives dmean, the sum against (x - mean) gives dvar."""
        m = x.shape[1]
        centred = x - x.mean(1, keepdim=True)
        grad_var = (grad_x * centred).sum(1) * (m - 1) / (2 * (centred * centred).sum(1))
        return grad_x.sum(1), grad_var
