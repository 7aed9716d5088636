"""The native (C++ CPU / CUDA) op library itself: the sort order, the choice of backend and of
MMD method, opcheck of every op, argument checks, strided gradients. (The distances on every
backend against the reference, torch.compile included: test_ops.py.)"""

import pytest
import torch
from utils import NATIVE_BACKENDS, assert_close_to_oracle, backend_device

import rcl_ops

pytestmark = pytest.mark.skipif(not NATIVE_BACKENDS, reason="the native extension rcl_ops._C is not built")


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [40, 5000, 30000])  # the float32 CPU sort's insertion, two- and three-pass rows
def test_sort_order_is_the_stable_sort_permutation(backend, dtype, count):
    # Ties (integers), signed zeros and long rows: the radix sort (float32) and the
    # comparison sort (float64) must both give torch's stable order, as int32.
    device = backend_device(backend)
    x = torch.randint(-50, 51, (3, count), device=device).to(dtype)
    x[0, :7] = torch.tensor([0.0, -0.0, 0.0, -0.0, 1e-30, -1e-30, 0.0], dtype=dtype)
    # Values a few float32 ulps apart, shuffled: the float32 sort's two-pass fast path
    # leaves them unordered and must fall back to all three radix passes.
    x[2] = (1.0 + torch.randint(0, 1000, (count,), device=device) * 2.0**-23).to(dtype)
    sorted_x, order = torch.ops.rcl_ops.sorted_quantiles(x, x.shape[1])
    expected_values, expected_order = torch.sort(x, dim=1, stable=True)
    assert order.dtype == torch.int32
    torch.testing.assert_close(sorted_x, expected_values, atol=0, rtol=0)
    torch.testing.assert_close(torch.gather(x, 1, order.long()), sorted_x, atol=0, rtol=0)
    ties_resolved_by_index = expected_order[:, 1:] > expected_order[:, :-1]
    same_value = expected_values[:, 1:] == expected_values[:, :-1]
    assert bool((ties_resolved_by_index | ~same_value).all())
    # Signed zeros tie like any equal values: the same permutation as torch's, everywhere.
    assert torch.equal(order.long(), expected_order)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_int64_sort_order_is_rejected(backend):
    device = backend_device(backend)
    sorted_x, order = torch.ops.rcl_ops.sorted_quantiles(torch.randn(2, 9, device=device), 9)
    with pytest.raises(RuntimeError, match="order_q must be int32"):
        torch.ops.rcl_ops.emd_exact_backward(
            torch.ones(2, 2, device=device), sorted_x, order.long(), sorted_x, order, [True, True]
        )
    with pytest.raises(RuntimeError, match="order must be int32"):
        torch.ops.rcl_ops.sorted_quantiles_backward(sorted_x, order.long())


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    from rcl_ops import _backend

    monkeypatch.setattr(_backend, "_registry", {"reference": _backend._registry["reference"]})
    monkeypatch.setattr(_backend, "_warned_fallback", set())
    q, k = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.warns(RuntimeWarning, match="falling back to the slow pure-PyTorch reference"):
        first = rcl_ops.pairwise_emd(q, k)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(rcl_ops.pairwise_emd(q, k), first)


def test_auto_picks_native_backend(monkeypatch):
    q, k = torch.randn(3, 10), torch.randn(3, 10)
    calls = []
    original = torch.ops.rcl_ops.emd_exact
    monkeypatch.setattr(torch.ops.rcl_ops, "emd_exact", lambda *a: calls.append(1) or original(*a))
    rcl_ops.pairwise_emd(q, k)
    assert calls


# ---- opcheck of every op ------------------------------------------------------------------


def _op_samples(device, dtype):
    x = torch.randn(3, 17, device=device, dtype=dtype)
    y = torch.randn(4, 17, device=device, dtype=dtype) * 2
    h = torch.tensor([0.5, 1.5], device=device, dtype=dtype)
    mean, var = torch.ops.rcl_ops.moments(x)
    mean_k, var_k = torch.ops.rcl_ops.moments(y)
    sorted_x, order = torch.ops.rcl_ops.sorted_quantiles(x, 17)
    sorted_y, order_y = torch.ops.rcl_ops.sorted_quantiles(y, 17)
    grad = torch.randn(3, 4, device=device, dtype=dtype)
    ops = torch.ops.rcl_ops
    _, grid, w_x, w_y = ops.mmd_grid(x, y, h, 64, False)
    _, used_h, statistic, _ = ops.mmd_direct(x, y, None, False, False)
    # Above the CPU's fused size (csrc/cpu/mmd_direct.cpp): the composite of the kernel-sum ops.
    big_x, big_y = torch.randn(20, 40, device=device, dtype=dtype), torch.randn(20, 40, device=device, dtype=dtype)
    _, _, big_statistic, _ = ops.mmd_direct(big_x, big_y, h, True, False)
    big_grad = torch.randn(20, 20, device=device, dtype=dtype)
    no_sums = torch.empty(0, device=device, dtype=torch.float64)
    direct = [
        (ops.mmd_direct.default, (x, y, h, False, False)),
        (ops.mmd_direct.default, (x, y, None, True, False)),
        (ops.mmd_direct.default, (big_x, big_y, h, True, False)),
        (ops.mmd_direct_backward.default, (grad, x, y, used_h, statistic, no_sums, False, [True, True])),
        (ops.mmd_direct_backward.default, (big_grad, big_x, big_y, h, big_statistic, no_sums, True, [False, True])),
    ]
    if device == "cpu":  # the derivative sums are CPU-only
        _, _, _, sums = ops.mmd_direct(x, y, used_h, False, True)
        direct.append((ops.mmd_direct.default, (x, y, None, False, True)))
        direct.append((ops.mmd_direct_backward.default, (grad, x, y, used_h, statistic, sums, False, [True, False])))
    return direct + [
        (ops.moments.default, (x,)),
        (ops.moments_backward.default, (mean.clone(), var.clone(), x, mean)),
        (ops.bd_pair.default, (mean, var, mean_k, var_k, 1e-6)),
        (ops.bd_pair_backward.default, (grad, mean, var, mean_k, var_k, 1e-6, [True, True])),
        (ops.bd_pair_backward.default, (grad, mean, var, mean_k, var_k, 1e-6, [False, True])),
        (ops.bd.default, (x, y, 1e-6)),
        (ops.bd_backward.default, (grad, x, y, mean, var, mean_k, var_k, 1e-6, [True, True])),
        (ops.bd_backward.default, (grad, x, y, mean, var, mean_k, var_k, 1e-6, [True, False])),
        (ops.sorted_quantiles.default, (x, 17)),
        (ops.sorted_quantiles.default, (x, 5)),
        (ops.sorted_quantiles_backward.default, (torch.randn(3, 5, device=device, dtype=dtype), order)),
        (ops.emd_pair.default, (sorted_x, sorted_y)),
        (ops.emd_pair_backward.default, (grad, sorted_x, sorted_y, [True, True])),
        (ops.emd_pair_backward.default, (grad, sorted_x, sorted_y, [False, True])),
        (ops.emd_exact.default, (x, y)),
        (ops.emd_exact_backward.default, (grad, sorted_x, order, sorted_y, order_y, [True, True])),
        (ops.emd_exact_backward.default, (grad, sorted_x, order, sorted_y, order_y, [True, False])),
        (ops.mmd_grid.default, (x, y, h, 64, False)),
        (ops.mmd_grid.default, (x, y, h, 64, True)),
        (ops.mmd_grid_backward.default, (grad, x, y, h, grid, w_x, w_y, 64, False, [True, True])),
        (ops.mmd_grid_backward.default, (grad, x, y, h, grid, w_x, w_y, 64, False, [False, True])),
        (ops.mmd_grid_backward.default, (grad, x, y, h, grid, w_x, w_y, 64, True, [True, True])),
        (ops.gaussian_kernel_sums.default, (x, y, h, False)),
        (ops.gaussian_kernel_sums.default, (x, x, h, True)),
        (ops.gaussian_kernel_sums_backward.default, (grad, x, y, h, False, [True, True])),
        (ops.gaussian_kernel_sums_backward.default, (grad, x, y, h, False, [True, False])),
        (ops.pooled_std.default, (x, y)),
        (ops.pooled_std.default, (big_x, big_y)),
        (ops.info_nce.default, (grad, 0.3, False, 0)),
        (ops.info_nce.default, (torch.rand(4, 4, device=device, dtype=dtype), 0.3, True, 0)),
        (ops.info_nce.default, (torch.rand(2, 7, device=device, dtype=dtype), 0.5, False, 3)),
    ]


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_opcheck_every_op(backend):
    device = backend_device(backend)
    samples = _op_samples(device, torch.float64)
    checked = {op._name for op, _ in samples}
    defined = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("rcl_ops::")}
    assert defined <= checked, f"ops without an opcheck sample: {sorted(defined - checked)}"
    for op, args in samples:
        differentiable = op._name.split("::")[1] in (
            "moments",
            "bd_pair",
            "bd",
            "sorted_quantiles",
            "emd_pair",
            "emd_exact",
            "mmd_grid",
            "mmd_direct",
            "gaussian_kernel_sums",
            "info_nce",
        )
        args = tuple(
            a.clone().requires_grad_(differentiable and a.is_floating_point()) if isinstance(a, torch.Tensor) else a
            for a in args
        )
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_native_ops_reject_bad_arguments(backend):
    device = backend_device(backend)
    ops = torch.ops.rcl_ops
    x = torch.randn(3, 5, device=device)
    with pytest.raises(RuntimeError, match="rcl_ops::moments: x must be 2-D"):
        ops.moments(x[0])
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ops.moments(x.half())
    with pytest.raises(RuntimeError, match="same K"):
        ops.emd_pair(x, x[:, :4])
    with pytest.raises(RuntimeError, match="rcl_ops::emd_exact: q and k must"):
        ops.emd_exact(x, x[:, :4])
    with pytest.raises(RuntimeError, match="rcl_ops::emd_exact: q and k must"):
        ops.emd_exact(x, x.double())
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ops.emd_exact(x[0], x)
    for num_bins in (1, (1 << 24) + 1, 1 << 62):  # 2^62: the FFT size's doubling would overflow
        with pytest.raises(RuntimeError, match=r"num_bins must be in \[2, 16777216\]"):
            ops.mmd_grid(x, x, torch.ones(1, device=device), num_bins, False)
    if device == "cpu":  # CUDA skips this check: it would need a host sync (ops.py validates)
        with pytest.raises(RuntimeError, match="bandwidths must be positive"):
            ops.gaussian_kernel_sums(x, x, -torch.ones(1, device=device), False)


# ---- the MMD method, strided gradients ----------------------------------------------------


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_mmd_auto_takes_the_exact_sum_for_tiny_residuals(backend, monkeypatch):
    # 4 M N <= num_bins: the direct sum is exact and cheaper than a 4096-bin grid.
    device = backend_device(backend)
    q, k = torch.randn(8, 1, 4, 4, device=device), torch.randn(8, 1, 4, 4, device=device)
    direct = rcl_ops.pairwise_mmd(q, k, method="direct", backend=backend)
    torch.testing.assert_close(rcl_ops.pairwise_mmd(q, k, backend=backend), direct, rtol=0, atol=0)
    calls = []
    original = torch.ops.rcl_ops.mmd_grid
    monkeypatch.setattr(torch.ops.rcl_ops, "mmd_grid", lambda *a: calls.append(1) or original(*a))
    rcl_ops.pairwise_mmd(q, k, backend=backend, num_bins=1023)  # 4 * 16 * 16 > 1023: the grid
    assert calls
    q, k = torch.randn(4, 300, device=device), torch.randn(4, 300, device=device)
    rcl_ops.pairwise_mmd(q, k, backend=backend)
    assert len(calls) == 2
    q, k = torch.randn(3, 32, device=device), torch.randn(2, 32, device=device)  # 4 * 32 * 32 = 4096
    rcl_ops.pairwise_mmd(q, k, backend=backend)
    assert len(calls) == 2


def test_cpu_kernel_values_are_within_an_ulp_of_exp():
    # The CPU kernel sums evaluate exp with a vectorised polynomial (csrc/cpu/fast_exp.h): each
    # single-pair sum is exp(-d^2 / (2 h^2)) within 1 ulp of libm's, subnormal results and
    # underflow to 0 included.
    torch.manual_seed(0)
    d = torch.cat([torch.rand(20000, dtype=torch.float64) * 30, torch.linspace(26.0, 27.3, 2000, dtype=torch.float64)])
    x, y = d.reshape(-1, 1), torch.zeros(d.numel(), 1, dtype=torch.float64)
    h = 0.7
    got = torch.ops.rcl_ops.gaussian_kernel_sums(x, y, torch.tensor([h], dtype=torch.float64), True)
    expected = torch.exp(-d * d * (0.5 / (h * h)))  # the kernels' argument, rounded as theirs
    ulp = (torch.nextafter(expected, torch.tensor(1.0, dtype=torch.float64)) - expected).abs()
    ulp = torch.where(expected == 0, torch.tensor(2.0**-1074, dtype=torch.float64), ulp)
    assert ((got - expected).abs() <= ulp).all()
    argument = d * d * (0.5 / (h * h))
    assert (got[argument > 746] == 0).all() and (got[(argument > 709) & (argument < 744)] > 0).all()


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mmd_direct_paths_agree_with_the_reference(backend, dtype):
    # mmd_direct's paths: fused on one thread (CPU, small), with or without the derivative sums
    # (CPU), and the composite of the kernel-sum ops (CUDA; CPU above the fused size), each with
    # the gradient of either side or both, odd counts (lane padding), two bandwidths, V and U.
    device = backend_device(backend)
    ops = torch.ops.rcl_ops
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-13}
    torch.manual_seed(1)
    for bq, bk, m, n in [(3, 2, 9, 17), (2, 5, 33, 8), (20, 21, 40, 38)]:
        q = torch.randn(bq, m, device=device, dtype=dtype)
        k = 1.3 * torch.randn(bk, n, device=device, dtype=dtype) + 0.2
        grad = torch.randn(bq, bk, device=device, dtype=dtype)
        for unbiased in (False, True):
            for h in (None, torch.tensor([0.3, 1.7], device=device, dtype=torch.float64)):
                for derivatives in (False, True) if device == "cpu" else (False,):
                    d, used_h, statistic, sums = ops.mmd_direct(q, k, h, unbiased, derivatives)
                    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
                    expected = rcl_ops.reference.pairwise_mmd(q64, k64, used_h, unbiased)
                    torch.testing.assert_close(d.double(), expected, **tol)
                    grad_q, grad_k = torch.autograd.grad(expected, (q64, k64), grad.double())
                    for mask in ([True, True], [True, False], [False, True]):
                        got_q, got_k = ops.mmd_direct_backward(grad, q, k, used_h, statistic, sums, unbiased, mask)
                        for got, want, wanted in ((got_q, grad_q, mask[0]), (got_k, grad_k, mask[1])):
                            if wanted:
                                torch.testing.assert_close(got.double(), want, **tol)
                            else:
                                assert got.numel() == 0


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [4096, 4097, 4098])
@pytest.mark.parametrize("storage_offset", [0, 1])
def test_moments_backward_rows_and_alignments(backend, dtype, count, storage_offset):
    # dL/dx = grad_mean / M + 2 grad_var (x - mean) / (M - 1) for values 1e4 + N(0, 1), from the
    # standalone op and the fused BD backward (either side or both): rows of M % 4 == 0 and not,
    # starting 16-byte aligned and not (the CUDA kernel's packed and single-value paths).
    device = backend_device(backend)
    ops = torch.ops.rcl_ops
    generator = torch.Generator().manual_seed(count + storage_offset)
    values = 1e4 + torch.randn(5 * count + storage_offset, generator=generator, dtype=torch.float64)
    x = values.to(dtype).to(device)[storage_offset:].view(5, count)
    q, k = x[:2], x[2:]
    grad = torch.randn(2, 3, generator=generator, dtype=torch.float64).to(dtype).to(device)
    _, *moments = ops.bd(q, k, 1e-6)
    grad_moments = ops.bd_pair_backward(grad, *moments, 1e-6, [True, True])
    expected = []
    for side, mean, grad_mean, grad_var in ((q, moments[0], *grad_moments[:2]), (k, moments[2], *grad_moments[2:])):
        side64 = side.double()
        expected.append(grad_mean[:, None] / count + 2 * grad_var[:, None] * (side64 - mean[:, None]) / (count - 1))
        got = ops.moments_backward(grad_mean, grad_var, side, mean)
        assert_close_to_oracle(got, expected[-1], dtype, floor=expected[-1].abs().max().item())
    for mask in ([True, True], [True, False], [False, True]):
        got_q, got_k = ops.bd_backward(grad, q, k, *moments, 1e-6, mask)
        for got, want, wanted in ((got_q, expected[0], mask[0]), (got_k, expected[1], mask[1])):
            if wanted:
                assert_close_to_oracle(got, want, dtype, floor=want.abs().max().item())
            else:
                assert got.numel() == 0


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_bd_and_mmd_backward_read_strided_gradients(backend):
    # Autograd hands over expanded (sum) and transposed gradients; the CPU kernels read them
    # through their strides instead of copying.
    device = backend_device(backend)
    ops = torch.ops.rcl_ops
    x = torch.randn(3, 20, device=device, dtype=torch.float64)
    y = torch.randn(4, 20, device=device, dtype=torch.float64) * 2
    _, *moments = ops.bd(x, y, 1e-6)
    for grad in (
        torch.randn(4, 3, device=device, dtype=torch.float64).t(),
        torch.ones((), device=device).double().expand(3, 4),
    ):
        got = ops.bd_backward(grad, x, y, *moments, 1e-6, [True, True])
        want = ops.bd_backward(grad.contiguous(), x, y, *moments, 1e-6, [True, True])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        pair_got = ops.bd_pair_backward(grad, *moments, 1e-6, [True, True])
        pair_want = ops.bd_pair_backward(grad.contiguous(), *moments, 1e-6, [True, True])
        for a, b in zip(pair_got, pair_want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        _, h, statistic, sums = ops.mmd_direct(x, y, None, False, device == "cpu")
        direct_got = ops.mmd_direct_backward(grad, x, y, h, statistic, sums, False, [True, True])
        direct_want = ops.mmd_direct_backward(grad.contiguous(), x, y, h, statistic, sums, False, [True, True])
        for a, b in zip(direct_got, direct_want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
