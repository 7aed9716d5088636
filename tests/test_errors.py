"""Bad input gets a clear exception, on every backend."""

import pytest
import torch
from utils import NATIVE_BACKENDS, backend_device

import rcl_ops

BACKENDS = ["reference", *NATIVE_BACKENDS]
DISTANCES = [rcl_ops.pairwise_emd, rcl_ops.pairwise_mmd, rcl_ops.pairwise_bd]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _pair(backend, shape=(3, 2, 4, 4), dtype=torch.float32):
    device = backend_device(backend)
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("fn", DISTANCES)
def test_integer_input(fn, backend):
    q, k = _pair(backend)
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        fn(q.long(), k, backend=backend)
    with pytest.raises(TypeError, match="k must be a floating-point tensor"):
        fn(q, k.int(), backend=backend)


@pytest.mark.parametrize("fn", DISTANCES)
def test_empty_inputs(fn, backend):
    q, k = _pair(backend)
    with pytest.raises(ValueError, match="empty batch"):
        fn(q[:0], k, backend=backend)
    with pytest.raises(ValueError, match="no values"):
        fn(q, k[:, :0], backend=backend)
    with pytest.raises(ValueError, match=r"shape \(B, \.\.\.\)"):
        fn(q[:, 0, 0, 0], k, backend=backend)


@pytest.fixture
def check_finite_everywhere():
    """The NaN/Inf check on for every device type (on CUDA it is opt-in)."""
    rcl_ops.set_check_finite(True)
    yield
    rcl_ops.set_check_finite(None)


@pytest.mark.parametrize("fn", DISTANCES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_names_batch_index(fn, backend, bad, check_finite_everywhere):
    q, k = _pair(backend)
    k[2, 1, 0, 3] = bad
    with pytest.raises(ValueError, match="k contains NaN or Inf at batch index 2"):
        fn(q, k, backend=backend)


def test_finite_values_whose_sum_overflows_pass_the_check():
    # The check's fast path sums the values; an overflowing sum of finite values must fall
    # through to the exact per-value check and pass.
    q = torch.full((3, 64), 3e38)
    q[:, ::2] = 1e38  # a finite BD: values spread over the range
    k = -q[:2]
    rcl_ops.pairwise_bd(q, k, backend="reference")
    q[1, 5] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN or Inf at batch index 1"):
        rcl_ops.pairwise_bd(q, k, backend="reference")


def test_finite_check_can_be_disabled():
    q, k = _pair("reference")
    q[1, 0, 0, 0] = float("nan")
    rcl_ops.set_check_finite(False)
    try:
        assert not rcl_ops.check_finite_enabled()
        assert torch.isnan(rcl_ops.pairwise_bd(q, k, backend="reference")[1]).all()
    finally:
        rcl_ops.set_check_finite(None)
    assert rcl_ops.check_finite_enabled("cpu")


def test_check_finite_defaults_per_device():
    # On by default for CPU tensors; opt-in elsewhere (a host-device sync per call on a GPU).
    assert rcl_ops.check_finite_enabled("cpu") and not rcl_ops.check_finite_enabled("cuda")
    try:
        rcl_ops.set_check_finite(True, "cuda")
        assert rcl_ops.check_finite_enabled("cuda") and rcl_ops.check_finite_enabled("cpu")
        rcl_ops.set_check_finite(False)
        assert not rcl_ops.check_finite_enabled("cpu") and not rcl_ops.check_finite_enabled("cuda")
        rcl_ops.set_check_finite(True)
        assert rcl_ops.check_finite_enabled("cuda") and rcl_ops.check_finite_enabled("meta")
    finally:
        rcl_ops.set_check_finite(None)
    assert rcl_ops.check_finite_enabled("cpu") and not rcl_ops.check_finite_enabled("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nan_check_on_cuda_is_opt_in():
    q, k = torch.randn(3, 40, device="cuda"), torch.randn(3, 40, device="cuda")
    q[2, 5] = float("nan")
    assert torch.isnan(rcl_ops.pairwise_bd(q, k)[2]).all()  # off by default: no sync
    rcl_ops.set_check_finite(True, "cuda")
    try:
        with pytest.raises(ValueError, match="q contains NaN or Inf at batch index 2"):
            rcl_ops.pairwise_bd(q, k)
    finally:
        rcl_ops.set_check_finite(None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mismatched_devices():
    q, k = _pair("reference")
    with pytest.raises(ValueError, match="q is on cpu but k is on cuda"):
        rcl_ops.pairwise_emd(q, k.cuda())


def test_mismatched_devices_meta():
    q, k = _pair("reference")
    with pytest.raises(ValueError, match="q is on cpu but k is on meta"):
        rcl_ops.pairwise_emd(q, k.to("meta"))


def test_emd_unequal_counts_needs_quantiles(backend):
    q, _ = _pair(backend)
    k = torch.randn(3, 5, device=q.device)
    with pytest.raises(ValueError, match="pass num_quantiles=K"):
        rcl_ops.pairwise_emd(q, k, backend=backend)
    assert rcl_ops.pairwise_emd(q, k, num_quantiles=5, backend=backend).shape == (3, 3)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_quantiles must be a positive integer"):
            rcl_ops.pairwise_emd(q, k, num_quantiles=bad, backend=backend)
    for bad in (2.5, True, "3", b"3"):
        with pytest.raises(TypeError, match="num_quantiles must be a positive integer"):
            rcl_ops.pairwise_emd(q, k, num_quantiles=bad, backend=backend)


def test_bad_options(backend):
    q, k = _pair(backend)
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        rcl_ops.pairwise_mmd(q, k, bandwidth=0.0, backend=backend)
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        rcl_ops.pairwise_mmd(q, k, bandwidth=[1.0, -1.0], backend=backend)
    with pytest.raises(ValueError, match="unknown method"):
        rcl_ops.pairwise_mmd(q, k, method="fft", backend=backend)
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        rcl_ops.pairwise_bd(q, k, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="at least 2 values"):
        rcl_ops.pairwise_bd(q[:, :1, :1, :1], k, backend=backend)


def test_unknown_and_unavailable_backend():
    q, k = _pair("reference")
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*available on cpu: \['reference'"):
        rcl_ops.pairwise_emd(q, k, backend="fast")
    if "cuda" not in rcl_ops.available_backends():
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
            rcl_ops.pairwise_emd(q, k, backend="cuda")
    elif not torch.cuda.is_available():
        with pytest.raises(ValueError, match="does not run on cpu tensors"):
            rcl_ops.pairwise_emd(q, k, backend="cuda")


def test_select_backend_names_the_backend_or_says_why_not():
    # The public check of a backend name (the trainer's preflight uses it): the same choice and
    # the same errors as the distances, with messages starting with `where`.
    assert rcl_ops.select_backend("reference", "cpu") == "reference"
    if "cpu" in NATIVE_BACKENDS:
        assert rcl_ops.select_backend("auto", torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match=r"^--option: unknown backend 'fast'.*available on cpu: \['reference'"):
        rcl_ops.select_backend("fast", "cpu", where="--option")
    if "cuda" not in rcl_ops.available_backends():
        with pytest.raises(RuntimeError, match="^select_backend: backend 'cuda' is unavailable"):
            rcl_ops.select_backend("cuda", "cpu")
    elif not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^select_backend: backend 'cuda' does not run on cpu tensors"):
            rcl_ops.select_backend("cuda", "cpu")


def test_reference_has_no_grid_mmd():
    q, k = _pair("reference")
    with pytest.raises(ValueError, match="supports methods"):
        rcl_ops.pairwise_mmd(q, k, method="grid", backend="reference")


def test_loss_bad_inputs(backend, check_finite_everywhere):
    q, k = _pair(backend)
    loss = rcl_ops.ResidualContrastiveLoss("emd", backend=backend)
    with pytest.raises(ValueError, match="q has batch size 3 but k has 2"):
        loss(q, k[:2])
    with pytest.raises(ValueError, match="no negatives"):
        loss(q[:1], k[:1])
    with pytest.raises(TypeError, match="floating-point"):
        loss(q.long(), k)
    with pytest.raises(ValueError, match="a batch of 0 has no negatives"):
        loss(q[:0], k[:0])
    bad = k.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch index 1"):
        loss(q, bad)


def test_loss_bad_configuration():
    for temperature in (0.0, -0.1, float("inf")):
        with pytest.raises(ValueError, match="temperature must be positive"):
            rcl_ops.ResidualContrastiveLoss("emd", temperature=temperature)
    with pytest.raises(ValueError, match="unknown distance 'kl'"):
        rcl_ops.ResidualContrastiveLoss("kl")
    with pytest.raises(ValueError, match="unknown reduction"):
        rcl_ops.ResidualContrastiveLoss("emd", reduction="avg")
    with pytest.raises(TypeError, match="takes no option"):
        rcl_ops.ResidualContrastiveLoss("emd", bandwidth=1.0)
    wrong_shape = rcl_ops.ResidualContrastiveLoss(lambda a, b: a.flatten(1)[:, :1])
    with pytest.raises(ValueError, match=r"must return a \(3, 3\) tensor"):
        wrong_shape(*_pair("reference"))


@pytest.mark.parametrize(
    ("num_bins", "error"),
    [(1, ValueError), ((1 << 24) + 1, ValueError), (1 << 62, ValueError)]
    + [(bad, TypeError) for bad in ("64", b"64", 64.0, True)],
)
def test_mmd_num_bins_is_a_bounded_integer(num_bins, error):
    q, k = _pair("reference")
    with pytest.raises(error, match="num_bins must be"):
        rcl_ops.pairwise_mmd(q, k, num_bins=num_bins)


def test_functional_loss_validates_like_the_module():
    d = torch.rand(4, 4)
    loss = rcl_ops.residual_contrastive_loss
    with pytest.raises(ValueError, match="unknown reduction 'Mean'"):
        loss(d, 0.1, reduction="Mean")
    for temperature in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be positive and finite"):
            loss(d, temperature)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        loss(d, "0.1")
    with pytest.raises(ValueError, match=r"\(B, B\) matrix"):
        loss(torch.rand(4, 3), 0.1)
    with pytest.raises(ValueError, match=r"\(B, B\) matrix"):
        loss(torch.rand(1, 1), 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        loss(torch.ones(4, 4, dtype=torch.long), 0.1)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        loss(d, 0.1, symmetric="yes")
    assert loss(d, 0.1, reduction="none").shape == (4,)
