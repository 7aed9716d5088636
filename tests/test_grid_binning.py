"""The binned-grid MMD's fixed-point binning (math.h's fixed_point_split): each value's unit mass
is 2^S integer units split between its two grid points, so the weights do not depend on the
order of the additions. Native CPU (which runs the shared split) and Triton against a Python
transcription in integers, bit for bit; order independence; the row-length bound; on a GPU, the
CUDA and compiled Triton MMD repeated and permuted, bit for bit, in deterministic mode."""

import math
import warnings
from fractions import Fraction

import pytest
import torch
from utils import NATIVE_BACKENDS

import rcl_ops
from rcl_ops import _backend
from rcl_ops._checks import MAX_GRID_VALUES

HAS_NATIVE_CPU = "cpu" in NATIVE_BACKENDS
HAS_TRITON = "triton" in _backend._registry
if HAS_TRITON:
    from rcl_ops.triton import _common

INTERPRETED_TRITON = HAS_TRITON and _common.INTERPRET
GPU_BACKENDS = [b for b in ("cuda", "triton") if b in rcl_ops.available_backends("cuda")]
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def fixed_point_bits(count: int) -> int:
    """S of math.h: min(52, 63 - bit_length(M))."""
    return min(52, 63 - count.bit_length())


def fixed_point_weights(x: torch.Tensor, lo: float, step: float, num_bins: int) -> torch.Tensor:
    """(B, M) float64 -> (B, G): math.h's grid_position, the split upper = round(w 2^S),
    lower = 2^S - upper summed as int64, then units / (M 2^S) in float64."""
    count, bits = x.shape[1], fixed_point_bits(x.shape[1])
    u = ((x - lo) * (1.0 / step)).clamp(0, num_bins - 1)
    lower = u.floor().long().clamp(max=num_bins - 2)
    upper_units = torch.floor((u - lower) * 2.0**bits + 0.5).long()
    units = torch.zeros(x.shape[0], num_bins, dtype=torch.int64)
    units.scatter_add_(1, lower, (1 << bits) - upper_units).scatter_add_(1, lower + 1, upper_units)
    assert bool((units.sum(1) == count << bits).all())  # exact conservation, M 2^S < 2^63
    return units.double() / torch.full(units.shape, math.ldexp(count, bits), dtype=torch.float64)


def _grid_of(x: torch.Tensor, num_bins: int) -> tuple[float, float]:
    lo, hi = x.min().item(), x.max().item()
    return lo, (hi - lo) / (num_bins - 1)


def _rows(count: int, seed: int = 0) -> torch.Tensor:
    """(3, count) float64 values, many per bin at small G, with weights of every magnitude."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, count, generator=generator, dtype=torch.float64)
    x[1] = x[1] * 1e-3 + 7.0  # far from zero: positions lose low bits
    return x


@pytest.mark.skipif(not HAS_NATIVE_CPU, reason="the native CPU extension is not built")
@pytest.mark.parametrize("count", [300, 5000])  # S = 52, S = 50
def test_native_cpu_binning_is_the_fixed_point_split(count):
    q = _rows(count)
    k = _rows(count, seed=1)
    _, grid, w_q, w_k = torch.ops.rcl_ops.mmd_grid(q, k, torch.ones(1, dtype=torch.float64), 64, False)
    lo, step = grid.tolist()
    assert torch.equal(w_q, fixed_point_weights(q, lo, step, 64))
    assert torch.equal(w_k, fixed_point_weights(k, lo, step, 64))


@pytest.mark.skipif(not HAS_NATIVE_CPU, reason="the native CPU extension is not built")
def test_native_cpu_binning_conserves_each_rows_mass_exactly():
    # Rows of M = 8 values on the grid 0, 1, ..., 63 (0 and 63 in every row), one in (0.25, 0.5),
    # where 1 - w rounds in float64, and five in distinct intervals [g, g + 1): no bin holds
    # two values' mass, so every weight units / 2^55 is exact and a row's weights sum to exactly
    # 1 (float64 splits 1/M (1 - w) + 1/M w lose the rounding of 1 - w).
    generator = torch.Generator().manual_seed(3)
    x = torch.zeros(16, 8, dtype=torch.float64)
    x[:, 1] = 0.25 + 0.25 * torch.rand(16, generator=generator, dtype=torch.float64)
    for row in x:
        row[2:7] = torch.randperm(60, generator=generator)[:5].double() + 2.0
    x[:, 2:7] += torch.rand(16, 5, generator=generator, dtype=torch.float64)
    x[:, 7] = 63.0
    _, grid, w, _ = torch.ops.rcl_ops.mmd_grid(x, x, torch.ones(1, dtype=torch.float64), 64, False)
    assert grid.tolist() == [0.0, 1.0]
    assert [sum(map(Fraction, row)) for row in w.tolist()] == [1] * 16  # exact sums, not rounded


@pytest.mark.skipif(not HAS_TRITON, reason="the triton backend is not available")
@pytest.mark.skipif(not INTERPRETED_TRITON, reason="on CPU tensors Triton runs interpreted")
def test_triton_binning_is_order_independent_and_matches_the_fixed_point_split():
    # 3000 values on 8 bins: float64 sums of their splits depend on the order of the additions.
    x = _rows(3000)
    lo, step = _grid_of(x, 8)
    lo_t, step_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(step, dtype=torch.float64)
    weights = torch.ops.rcl_ops_triton.grid_bin(x, lo_t, step_t, 8)
    permuted = x[:, torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(5))]
    assert torch.equal(torch.ops.rcl_ops_triton.grid_bin(permuted, lo_t, step_t, 8), weights)
    assert torch.equal(weights, fixed_point_weights(x, lo, step, 8))


@pytest.mark.skipif(not HAS_TRITON, reason="the triton backend is not available")
@pytest.mark.skipif(not INTERPRETED_TRITON, reason="on CPU tensors Triton runs interpreted")
def test_triton_grid_mmd_runs_in_deterministic_mode():
    q, k = _rows(200).float(), _rows(200, seed=2).float()
    q.requires_grad_(True)
    try:
        torch.use_deterministic_algorithms(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            rcl_ops.pairwise_mmd(q, k, method="grid", backend="triton").sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_rows_too_long_for_the_fixed_point_are_refused():
    # An expanded view: the checks run before anything reads the 2^39 values.
    x = torch.zeros(1, 1, dtype=torch.float64).expand(1, MAX_GRID_VALUES + 1)
    h = torch.ones(1, dtype=torch.float64)
    assert fixed_point_bits(MAX_GRID_VALUES) == 24
    namespaces = (["rcl_ops"] if HAS_NATIVE_CPU else []) + (["rcl_ops_triton"] if INTERPRETED_TRITON else [])
    for namespace in namespaces:
        with pytest.raises(RuntimeError, match="values per row"):
            getattr(torch.ops, namespace).mmd_grid(x, x, h, 64, False)


def _mmd_and_grads(backend: str, q: torch.Tensor, k: torch.Tensor, num_bins: int):
    qa, ka = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    out = rcl_ops.pairwise_mmd(qa, ka, method="grid", num_bins=num_bins, backend=backend)
    grads = torch.autograd.grad((out * torch.arange(out.numel(), device=out.device).view_as(out)).sum(), (qa, ka))
    return out, *grads


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS or INTERPRETED_TRITON, reason="needs a CUDA GPU (compiled Triton)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(
    ("count", "num_bins"),
    [(700, 512), (50000, 4096), (50000, 8192)],  # one block per row; row chunks; global atomics
)
def test_gpu_grid_mmd_is_bitwise_reproducible(backend, count, num_bins, monkeypatch):
    # Forward and backward, repeated and on permuted values, in deterministic mode (which
    # raised for the float64 atomics before): the same bits.
    if backend not in GPU_BACKENDS:
        pytest.skip(f"{backend} backend not loaded")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic mode's cuBLAS condition
    q, k = _rows(count).float().cuda(), _rows(count, seed=1).float().cuda()
    perm_q = torch.randperm(count, device="cuda")
    perm_k = torch.randperm(count, device="cuda")
    try:
        torch.use_deterministic_algorithms(True)  # raises if any step alerts
        first = _mmd_and_grads(backend, q, k, num_bins)
        again = _mmd_and_grads(backend, q, k, num_bins)
        permuted = _mmd_and_grads(backend, q[:, perm_q], k[:, perm_k], num_bins)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert torch.equal(permuted[0], first[0])
    assert torch.equal(permuted[1], first[1][:, perm_q]) and torch.equal(permuted[2], first[2][:, perm_k])
