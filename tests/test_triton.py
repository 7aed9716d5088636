"""The "triton" backend itself: its registration, the binned-grid MMD against the native CPU op
and the exact sum, its kernels and ops (opcheck, argument checks), compilation for NVIDIA GPUs,
autotuning and launches. (The distances on every backend against the reference, Triton
included: test_ops.py.)

On CPU-only machines the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton), so sizes are small. On a GPU machine run
with TRITON_INTERPRET=0 and the same tests run compiled on CUDA tensors.
"""

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import rcl_ops  # noqa: E402
from rcl_ops import _backend  # noqa: E402

if "triton" not in _backend._registry:
    pytest.skip(
        f"the triton backend did not register: {_backend._unavailable_reasons.get('triton')}", allow_module_level=True
    )

from rcl_ops.triton import _common, _register  # noqa: E402

TRITON = _backend._registry["triton"]
DEVICES = [d for d in ("cpu", "cuda") if d in TRITON.device_types and (d == "cpu" or torch.cuda.is_available())]
# Without CUDA and with TRITON_INTERPRET unset only the compile check below runs; the
# device-parametrised tests then skip with an empty parameter set.
HAS_NATIVE_CPU = "cpu" in rcl_ops.available_backends("cpu")
ops = torch.ops.rcl_ops_triton

if _common.INTERPRET:
    try:  # a kernel with loops over runtime bounds (they break triton 3.6's interpreter on numpy >= 2.4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ops.moments(torch.randn(2, 3))
    except Exception as error:
        pytest.skip(f"the Triton interpreter cannot run the kernels here: {error}", allow_module_level=True)

# triton 3.6's interpreter warns on every loop with a runtime bound (numpy >= 1.25); harmless
# with the numpy < 2.4 of requirements-test.txt.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.mark.parametrize("device", DEVICES)
def test_moments_far_from_zero_in_float32(device):
    # |mean| >> std: the shifted two-pass moments keep float32 accurate where raw sums would not.
    x = (1000.0 + 0.01 * torch.randn(3, 6000, dtype=torch.float64)).to(device)
    mean, var = ops.moments(x.float())
    torch.testing.assert_close(mean.double(), x.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x.var(1), rtol=1e-4, atol=0)


def test_backend_registration():
    assert TRITON.mmd_methods == ("grid",)
    assert set(TRITON.device_types) == ({"cpu", "cuda"} if _common.INTERPRET else {"cuda"})
    # "auto" never picks triton on CPU, and prefers the native CUDA kernels until
    # `make gpu-check` measurements say otherwise (see rcl_ops/triton/__init__.py).
    assert "triton" not in _backend._AUTO_ORDER.get("cpu", ())
    assert _backend._AUTO_ORDER["cuda"][0] == "cuda"
    for device in DEVICES:
        q = torch.randn(2, 5, device=device)
        with pytest.raises(ValueError, match="supports methods"):
            rcl_ops.pairwise_mmd(q, q, method="direct", backend="triton")


# ---- binned-grid MMD ----------------------------------------------------------------------


def _mmd_run(backend, q, k, weights, **options):
    qa, ka = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    out = rcl_ops.pairwise_mmd(qa, ka, backend=backend, **options)
    grads = torch.autograd.grad((out * weights.to(out.dtype)).sum(), (qa, ka))
    return out, grads


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("bandwidth", [0.7, [0.3, 2.0]], ids=["one_h", "two_h"])
def test_mmd_grid(device, unbiased, bandwidth):
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 200, generator=generator, dtype=torch.float64)
    k = 1.2 * torch.randn(2, 200, generator=generator, dtype=torch.float64) + 0.1
    weights = torch.randn(2, 2, generator=generator, dtype=torch.float64)
    options = {"bandwidth": bandwidth, "unbiased": unbiased}
    exact, exact_grads = _mmd_run("reference", q, k, weights, **options)
    for dtype in (torch.float64, torch.float32):
        qd, kd = q.to(device, dtype), k.to(device, dtype)
        got, got_grads = _mmd_run("triton", qd, kd, weights.to(device), num_bins=256, **options)
        assert got.dtype == dtype
        if HAS_NATIVE_CPU:  # the same algorithm: equal up to rounding (binning order, FFT)
            native, native_grads = _mmd_run("cpu", q.to(dtype), k.to(dtype), weights, num_bins=256, **options)
            for a, b in zip((got, *got_grads), (native, *native_grads)):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
        # against the exact double sum: the grid's approximation error at G = 256
        got, exact_cpu = got.double().cpu(), exact.double()
        scale = exact_cpu.abs().max()
        assert ((got - exact_cpu).abs() / exact_cpu.abs().clamp_min(1e-2 * scale)).max() < 1e-2, (got, exact_cpu)
        for g, e in zip(got_grads, exact_grads):
            assert _cosine(g.cpu(), e) >= 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_grid_kernels_match_definition(device):
    # Binning and interpolation against a torch transcription of math.h's grid_position,
    # including values outside the grid (clamped) and the last bin.
    x = torch.tensor([[-1.0, 0.0, 0.3, 0.5, 2.49, 2.5, 9.0]], dtype=torch.float64, device=device)
    lo = torch.tensor(0.0, dtype=torch.float64, device=device)
    step = torch.tensor(0.5, dtype=torch.float64, device=device)
    num_bins = 6
    u = ((x - lo) / step).clamp(0, num_bins - 1)
    lower = u.floor().long().clamp(max=num_bins - 2)
    weight = u - lower
    expected = torch.zeros(1, num_bins, dtype=torch.float64, device=device)
    expected.scatter_add_(1, lower, (1 - weight) / x.shape[1]).scatter_add_(1, lower + 1, weight / x.shape[1])
    torch.testing.assert_close(ops.grid_bin(x, lo, step, num_bins), expected)
    field = torch.arange(num_bins, dtype=torch.float64, device=device).square().unsqueeze(0)
    interpolated = field.gather(1, lower) * (1 - weight) + field.gather(1, lower + 1) * weight
    for dtype in (torch.float64, torch.float32):
        got = ops.grid_interpolate(field, x.to(dtype), lo, step)
        assert got.dtype == dtype
        torch.testing.assert_close(got, interpolated.to(dtype))


# ---- opcheck of every op ------------------------------------------------------------------


def _op_samples(device, dtype):
    x = torch.randn(3, 17, device=device, dtype=dtype)
    y = torch.randn(4, 17, device=device, dtype=dtype) * 2
    h = torch.tensor([0.5, 1.5], device=device, dtype=dtype)
    mean, var = ops.moments(x)
    mean_k, var_k = ops.moments(y)
    sorted_x, order = ops.sorted_quantiles(x, 17)
    sorted_y, _ = ops.sorted_quantiles(y, 17)
    _, grid, w_x, w_y = ops.mmd_grid(x, y, h, 64, False)
    grad = torch.randn(3, 4, device=device, dtype=dtype)
    lo = x.min().double()
    step = (x.max().double() - lo) / 15
    return [
        (ops.moments.default, (x,)),
        (ops.moments_backward.default, (mean.clone(), var.clone(), x, mean)),
        (ops.bd_pair.default, (mean, var, mean_k, var_k, 1e-6)),
        (ops.bd_pair_backward.default, (grad, mean, var, mean_k, var_k, 1e-6, [True, True])),
        (ops.bd_pair_backward.default, (grad, mean, var, mean_k, var_k, 1e-6, [False, True])),
        (ops.sorted_quantiles.default, (x, 17)),
        (ops.sorted_quantiles.default, (x, 5)),
        (ops.sorted_quantiles_backward.default, (torch.randn(3, 5, device=device, dtype=dtype), order)),
        (ops.sorted_quantiles_backward.default, (torch.randn(3, 17, device=device, dtype=dtype), order)),
        (ops.emd_pair.default, (sorted_x, sorted_y)),
        (ops.emd_pair_backward.default, (grad, sorted_x, sorted_y, [True, True])),
        (ops.emd_pair_backward.default, (grad, sorted_x, sorted_y, [True, False])),
        (ops.grid_bin.default, (x, lo, step, 16)),
        (ops.grid_interpolate.default, (torch.randn(3, 16, device=device, dtype=torch.float64), x, lo, step)),
        (ops.mmd_grid.default, (x, y, h, 64, False)),
        (ops.mmd_grid.default, (x, y, h, 64, True)),
        (ops.mmd_grid_backward.default, (grad, x, y, h, grid, w_x, w_y, 64, False, [True, True])),
        (ops.mmd_grid_backward.default, (grad, x, y, h, grid, w_x, w_y, 64, False, [False, True])),
        (ops.mmd_grid_backward.default, (grad, x, y, h, grid, w_x, w_y, 64, True, [True, True])),
    ]


DIFFERENTIABLE = {"moments", "bd_pair", "sorted_quantiles", "emd_pair", "mmd_grid"}


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    samples = _op_samples(device, torch.float64)
    checked = {op._name for op, _ in samples}
    defined = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith(f"{_common.NAMESPACE}::")}
    assert defined == {f"{op._namespace}::{op._name}" for op in _register.OPS}
    assert defined <= checked, f"ops without an opcheck sample: {sorted(defined - checked)}"
    for op, args in samples:
        differentiable = op._name.split("::")[1] in DIFFERENTIABLE
        args = tuple(
            a.clone().requires_grad_(differentiable and a.is_floating_point() and a.dim() == 2)
            if isinstance(a, torch.Tensor)
            else a
            for a in args
        )
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_reject_bad_arguments(device):
    x = torch.randn(3, 5, device=device)
    with pytest.raises(RuntimeError, match="rcl_ops_triton::moments: x must be 2-D"):
        ops.moments(x[0])
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ops.moments(x.half())
    with pytest.raises(RuntimeError, match="same K"):
        ops.emd_pair(x, x[:, :4])
    with pytest.raises(RuntimeError, match="share dtype"):
        ops.emd_pair(x, x.double())
    for num_bins in (1, (1 << 24) + 1, 1 << 62):  # 2^62: the FFT size's doubling would overflow
        with pytest.raises(RuntimeError, match=r"num_bins must be in \[2, 16777216\]"):
            ops.mmd_grid(x, x, torch.ones(1, device=device), num_bins, False)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        ops.bd_pair_backward(torch.ones(2, 2, device=device), *ops.moments(x), *ops.moments(x), 1e-6, [True, True])


@pytest.mark.gpu
@pytest.mark.skipif(_common.INTERPRET or not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU")
def test_autotuning_keeps_first_calls_quick():
    # Compile every config once at a small size (cold: seconds, or milliseconds from the
    # Triton disk cache), then the first call at the benchmarks' B=64, 3x64x64 only re-tunes:
    # it must take well under a second per distance.
    def step(fn, batch, shape):
        q = torch.randn(batch, *shape, device="cuda", requires_grad=True)
        k = torch.randn(batch, *shape, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(q, k, backend="triton").sum().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    # The warm-up size must specialise like the timed one: Triton compiles a variant per
    # integer argument equal to 1 and per divisibility by 16, so with 3x16x16 (768 values, one
    # 1024-value block per row) blocks_per_row == 1 and the timed call would compile anew.
    for fn in (rcl_ops.pairwise_emd, rcl_ops.pairwise_bd, rcl_ops.pairwise_mmd):
        cold = step(fn, 16, (3, 32, 32))
        first = step(fn, 64, (3, 64, 64))
        assert first < 1.0, f"{fn.__name__}: first call at B=64, 3x64x64 took {first:.2f} s (compile: {cold:.2f} s)"


PTXAS = Path(sys.modules["triton"].__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton has no NVIDIA backend (ptxas)")
def test_kernels_compile_for_ampere_and_hopper():
    # Every kernel and GPU config through Triton's whole pipeline down to cubin, for sm_80 and
    # sm_90, without a GPU (seconds when cold; the Triton cache makes reruns quick).
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "rcl_ops.triton._compile_check", "80", "90"]
    root = Path(__file__).parent.parent
    out = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    assert "0 failure(s)" in out.stdout


def test_launchers_switch_to_the_tensors_gpu(monkeypatch):
    # Triton launches on the current device: a launcher given tensors on cuda:1 while cuda:0 is
    # current must switch (and not switch when they already match, or for CPU tensors).
    entered = []

    class FakeDeviceContext:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class FakeCudaTensor:
        def __init__(self, index):
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)
    launched = _common.on_tensor_device(lambda x, y: (x, y))
    assert launched(FakeCudaTensor(1), 7)[1] == 7 and entered == [torch.device("cuda", 1)]
    launched(FakeCudaTensor(0), 7)
    launched(torch.zeros(1), 7)
    assert entered == [torch.device("cuda", 1)]
