"""The CPU row sort (csrc/cpu/sort.{h,cpp}) on its own: rcl_ops::sorted_quantiles with K = M is
the sort and nothing else. Every path (insertion sort for short rows, two 12-bit radix passes
plus an insertion fix-up, the three-pass fallback, the float64 comparison sort) must give
torch.sort's stable order: values, and the index of each sorted value."""

import pytest
import torch
from utils import NATIVE_BACKENDS, backend_device

pytestmark = pytest.mark.skipif("cpu" not in NATIVE_BACKENDS, reason="the native extension is not built")

# Row lengths on each side of the thresholds: 64 (insertion sort), 24,576 (two passes).
LENGTHS = [1, 2, 63, 64, 65, 1000, 24576, 24577]


def _values(kind: str, rows: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(count)
    if kind == "normal":
        return torch.randn(rows, count, generator=generator, dtype=dtype)
    if kind == "ties":  # few distinct values: the order of equal values must stay stable
        return torch.randint(-3, 4, (rows, count), generator=generator).to(dtype)
    if kind == "signed_zeros_and_infinities":
        choices = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0], dtype=dtype)
        return choices[torch.randint(0, 6, (rows, count), generator=generator)]
    if kind == "subnormal":
        tiny = torch.finfo(dtype).tiny
        return torch.randn(rows, count, generator=generator, dtype=dtype) * tiny / 8
    if kind == "crowded":  # values within 2^-20 relative of each other: the three-pass fallback
        return 1.0 + torch.rand(rows, count, generator=generator, dtype=dtype) * 2.0**-20
    raise ValueError(kind)


KINDS = ["normal", "ties", "signed_zeros_and_infinities", "subnormal", "crowded"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", LENGTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_sort_matches_torch_stable_sort(kind, count, dtype):
    x = _values(kind, 3, count, dtype)
    values, order = torch.ops.rcl_ops.sorted_quantiles(x, count)
    want_values, want_order = torch.sort(x, dim=1, stable=True)
    assert order.dtype == torch.int32
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    assert torch.equal(order.long(), want_order)


def test_sort_of_a_view_sorts_the_rows_of_the_view():
    x = torch.randn(6, 300)[::2, 7:250]  # not contiguous
    values, order = torch.ops.rcl_ops.sorted_quantiles(x, x.shape[1])
    want_values, want_order = torch.sort(x, dim=1, stable=True)
    assert torch.equal(values, want_values) and torch.equal(order.long(), want_order)


# ---- the float32 sort key (rcl_ops/math.h: float_sort_key, float_from_sort_key) -------------
# The CPU sort and the CUDA radix sort of the exact EMD both sort by the key and read the sorted
# values back from the sorted keys, so the sorted values check the round trip: bit for bit the
# input, except that -0.0 comes back as +0.0 and every NaN as the NaN 0x7FFFFFFF.

_FLOAT32 = torch.finfo(torch.float32)
SPECIAL_FLOAT32 = [0.0, -0.0, _FLOAT32.tiny, -_FLOAT32.tiny, 2.0**-149, -(2.0**-149), _FLOAT32.tiny - 2.0**-149]
SPECIAL_FLOAT32 += [-(_FLOAT32.tiny - 2.0**-149), _FLOAT32.max, -_FLOAT32.max, float("inf"), float("-inf"), 1.0, -1.0]


def _special_and_random_floats(rows: int, count: int) -> torch.Tensor:
    """Rows of the special values (signed zeros, the smallest and largest subnormals and normals,
    FLT_MAX, infinities), each repeated, shuffled among random bit patterns (every exponent; the
    NaN patterns replaced by -0.0)."""
    generator = torch.Generator().manual_seed(count)
    bits = torch.randint(-(2**31), 2**31, (rows, count), generator=generator, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    x = torch.where(torch.isnan(x), torch.tensor(-0.0), x)
    special = torch.tensor(SPECIAL_FLOAT32).repeat(max(1, count // (2 * len(SPECIAL_FLOAT32))))[: count // 2]
    for row in range(rows):
        where = torch.randperm(count, generator=generator)[: special.numel()]
        x[row, where] = special
    return x


def _decoded(values: torch.Tensor) -> torch.Tensor:
    """What a key round trip gives for finite and infinite values: -0.0 as +0.0 (bits)."""
    return (values + 0.0).view(torch.int32)


def _assert_sorted_like_torch(values: torch.Tensor, order: torch.Tensor, x: torch.Tensor) -> None:
    want_values, want_order = torch.sort(x.cpu(), dim=1, stable=True)
    assert torch.equal(values.cpu().view(torch.int32), _decoded(want_values))
    assert torch.equal(order.cpu().long(), want_order)


@pytest.mark.parametrize("count", [2, 64, 65, 1000, 24577])
def test_sort_keys_round_trip_special_values_bit_for_bit(count):
    x = _special_and_random_floats(3, count)
    values, order = torch.ops.rcl_ops.sorted_quantiles(x, count)
    _assert_sorted_like_torch(values, order, x)
    assert not torch.signbit(values[values == 0]).any()


@pytest.mark.parametrize("count", [5, 64, 65, 1000])
def test_sort_keys_put_every_nan_last(count):
    # NaNs (of either sign) sort last and stay NaN, as torch.sort puts them; the NaN/Inf check of
    # the distances refuses them when it is on, so only the raw op (or the check off) sees them.
    x = torch.randn(2, count)
    x[0, 1], x[1, 0], x[1, count - 1] = float("nan"), -float("nan"), float("nan")
    assert torch.signbit(x[1, 0])
    values, order = torch.ops.rcl_ops.sorted_quantiles(x, count)
    want_values, want_order = torch.sort(x, dim=1, stable=True)
    assert torch.equal(torch.isnan(values), torch.isnan(want_values))
    torch.testing.assert_close(values, want_values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(order.long(), want_order)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_exact_emd_sorts_signed_zeros_and_ties_like_torch(backend):
    # The exact EMD's own sort (on CUDA: one radix sort of both batches, the values decoded from
    # the sorted keys) gives torch.sort's stable order and the values through the key round trip.
    device = backend_device(backend)
    generator = torch.Generator().manual_seed(1)
    choices = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.0, 2.0**-149, float("inf")])
    for count in (7, 300):
        q = choices[torch.randint(0, len(choices), (5, count), generator=generator)]
        k = torch.cat([_special_and_random_floats(2, count), choices[torch.randint(0, 7, (1, count))]])
        _, sorted_q, order_q, sorted_k, order_k = torch.ops.rcl_ops.emd_exact(q.to(device), k.to(device))
        _assert_sorted_like_torch(sorted_q, order_q, q)
        _assert_sorted_like_torch(sorted_k, order_k, k)
