"""The CPU row sort (csrc/cpu/sort.{h,cpp}) on its own: rcl_ops::sorted_quantiles with K = M is
the sort and nothing else. Every path (insertion sort for short rows, two 12-bit radix passes
plus an insertion fix-up, the three-pass fallback, the float64 comparison sort) must give
torch.sort's stable order: values, and the index of each sorted value."""

import pytest
import torch
from utils import NATIVE_BACKENDS

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
