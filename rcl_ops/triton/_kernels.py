"""Triton kernels of the "triton" backend and the plain (non-op) functions that launch them.

Every launcher takes contiguous 2-D float32/float64 tensors and returns fresh tensors; the
custom ops in ``_ops.py`` validate, make contiguous and call these. Arithmetic follows
csrc/include/rcl_ops/math.h: fp32 inputs accumulate in fp32 registers, fp64 inputs in fp64;
positions (quantile and grid) are computed in fp64 as the native kernels do.

When TRITON_INTERPRET=1 each autotuned kernel has a single config with large blocks (the
interpreter costs about the same per block whatever its size, and autotuning needs a driver).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _bench(kernel_call, quantiles):
    # Short timing runs: the default 25 ms warm-up + 100 ms per config would make the first
    # call of every new size take most of a second per kernel.
    return triton.testing.do_bench(kernel_call, warmup=2, rep=10, quantiles=quantiles)


def _autotune(interpret_config: triton.Config, gpu_configs: list[triton.Config], key: list[str]):
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=key)
    return triton.autotune(configs=gpu_configs, key=key, do_bench=_bench)


def _cfg(num_warps: int = 4, num_stages: int = 2, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def _next_pow2_bucket(n: int) -> int:
    """Autotuning key: sizes are bucketed by powers of two, so a new exact size reuses a tuning."""
    return triton.next_power_of_2(max(int(n), 1))


# Values per program of the element-wise kernels (sketch, scatter, binning, interpolation)
# and per loop step of the one-program-per-row moments.
_ELEMENT_BLOCK = 4096 if INTERPRET else 1024
_MOMENTS_BLOCK = 4096 if INTERPRET else 2048


def on_tensor_device(launcher):
    """Launch on the GPU of the launcher's first (tensor) argument: Triton launches on the
    current device, so tensors on cuda:1 with cuda:0 current would otherwise run on the wrong
    GPU (the native ops use a device guard for the same reason)."""

    @functools.wraps(launcher)
    def launch(x: torch.Tensor, *args, **kwargs):
        if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(x, *args, **kwargs)
        return launcher(x, *args, **kwargs)

    return launch


def alert_not_deterministic(what: str) -> None:
    """Honour torch.use_deterministic_algorithms for a kernel whose float atomics make the last
    bits depend on the order of the additions (as the native CUDA kernels do)."""
    if torch.are_deterministic_algorithms_enabled():
        message = (
            f"rcl_ops (triton): {what} adds with float atomics, so repeated runs can differ in the "
            "last bits; it does not have a deterministic implementation"
        )
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message + " (use torch.use_deterministic_algorithms(True, warn_only=True))")
        warnings.warn(message, UserWarning, stacklevel=3)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and not INTERPRET:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ---- EMD pair: D[i, j] = mean_d |sq[i, d] - sk[j, d]| ----------------------------------------

# (BLOCK_Q, BLOCK_K, BLOCK_D) register tiles of the |a - b| broadcast: 8-16 K elements per
# program, 4-8 warps. Starting points for Ampere/Hopper, to be re-tuned from `make gpu-check`.
_EMD_PAIR_CONFIGS = [
    _cfg(BLOCK_Q=32, BLOCK_K=32, BLOCK_D=8, num_warps=4),
    _cfg(BLOCK_Q=64, BLOCK_K=64, BLOCK_D=4, num_warps=8),
    _cfg(BLOCK_Q=16, BLOCK_K=16, BLOCK_D=32, num_warps=4),
]
_EMD_PAIR_INTERPRET = _cfg(BLOCK_Q=16, BLOCK_K=16, BLOCK_D=64)
# Split-K granule: each split covers a multiple of every config's BLOCK_D.
_EMD_SPLIT_GRANULE = 64 if INTERPRET else 256


@_autotune(_EMD_PAIR_INTERPRET, _EMD_PAIR_CONFIGS, key=["bucket_q", "bucket_k", "chunk"])
@triton.jit
def _emd_pair_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    Bq,
    Bk,
    K,
    chunk,
    bucket_q,
    bucket_k,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (i-tile, j-tile, split): sum over d in [split * chunk, (split + 1) * chunk) of
    # |q[i, d] - k[j, d]| / K, written to out[split, i, j].
    pid_q = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    rows_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rows_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_q = rows_q < Bq
    mask_k = rows_k < Bk
    base_q = rows_q.to(tl.int64) * K
    base_k = rows_k.to(tl.int64) * K
    start = split.to(tl.int64) * chunk
    acc = tl.zeros((BLOCK_Q, BLOCK_K), dtype=q_ptr.dtype.element_ty)
    for d0 in range(0, chunk, BLOCK_D):
        cols = start + d0 + tl.arange(0, BLOCK_D)
        mask_d = cols < K
        a = tl.load(q_ptr + base_q[:, None] + cols[None, :], mask=mask_q[:, None] & mask_d[None, :], other=0.0)
        b = tl.load(k_ptr + base_k[:, None] + cols[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(tl.abs(a[:, None, :] - b[None, :, :]), axis=2)
    out = acc / K
    offsets = (split.to(tl.int64) * Bq + rows_q[:, None]) * Bk + rows_k[None, :]
    tl.store(out_ptr + offsets, out, mask=mask_q[:, None] & mask_k[None, :])


def _emd_splits(bq: int, bk: int, k: int, device: torch.device) -> tuple[int, int]:
    """(number of K splits, values per split): enough programs to fill the GPU when the
    (Bq, Bk) tile grid alone is small; one split when interpreting."""
    granule = _EMD_SPLIT_GRANULE
    max_splits = triton.cdiv(k, granule)
    tiles = triton.cdiv(bq, 32) * triton.cdiv(bk, 32)
    splits = 1 if INTERPRET else max(1, min(max_splits, triton.cdiv(4 * _num_sms(device), tiles)))
    chunk = triton.cdiv(triton.cdiv(k, splits), granule) * granule
    return triton.cdiv(k, chunk), chunk


@on_tensor_device
def emd_pair(sq: torch.Tensor, sk: torch.Tensor) -> torch.Tensor:
    bq, n = sq.shape
    bk = sk.shape[0]
    splits, chunk = _emd_splits(bq, bk, n, sq.device)
    partial = torch.empty((splits, bq, bk), dtype=sq.dtype, device=sq.device)

    def grid(meta):
        return (triton.cdiv(bq, meta["BLOCK_Q"]), triton.cdiv(bk, meta["BLOCK_K"]), splits)

    _emd_pair_kernel[grid](sq, sk, partial, bq, bk, n, chunk, _next_pow2_bucket(bq), _next_pow2_bucket(bk))
    return partial.view(bq, bk) if splits == 1 else partial.sum(0)


# ---- EMD pair backward: one side at a time ---------------------------------------------------

# (BLOCK_X rows x BLOCK_D values) register blocks; the key rows are swept one at a time, so
# no 3-D intermediate goes through shared memory.
# (16 x 128, 4 warps and 16 x 256, 8 warps: 16 values per thread, no spills in fp64 on
# sm_80/sm_90 by ptxas -v; 32 x 128 spills ~96 bytes in fp64 only.)
_EMD_SIDE_CONFIGS = [
    _cfg(BLOCK_X=16, BLOCK_D=128, num_warps=4),
    _cfg(BLOCK_X=16, BLOCK_D=256, num_warps=8),
    _cfg(BLOCK_X=32, BLOCK_D=128, num_warps=8),
]
_EMD_SIDE_INTERPRET = _cfg(BLOCK_X=32, BLOCK_D=128)


@_autotune(_EMD_SIDE_INTERPRET, _EMD_SIDE_CONFIGS, key=["bucket_x", "bucket_y", "bucket_d"])
@triton.jit
def _emd_side_grad_kernel(
    x_ptr,
    y_ptr,
    grad_ptr,
    out_ptr,
    Bx,
    By,
    K,
    stride_gx,
    stride_gy,
    bucket_x,
    bucket_y,
    bucket_d,
    BLOCK_X: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[i, d] = sum_j grad[i, j] sign(x[i, d] - y[j, d]) / K, grad[i, j] at
    # grad_ptr + i * stride_gx + j * stride_gy (the k side passes the transposed strides).
    pid_d = tl.program_id(0)
    pid_x = tl.program_id(1)
    rows_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_x = rows_x < Bx
    mask_d = cols < K
    mask_xd = mask_x[:, None] & mask_d[None, :]
    offsets_x = rows_x.to(tl.int64)[:, None] * K + cols[None, :]
    a = tl.load(x_ptr + offsets_x, mask=mask_xd, other=0.0)
    y_row = y_ptr + cols  # pointers advance row by row (64-bit, no j * K product)
    g_col = grad_ptr + rows_x.to(tl.int64) * stride_gx
    acc = tl.zeros((BLOCK_X, BLOCK_D), dtype=x_ptr.dtype.element_ty)
    for _ in range(0, By):
        b = tl.load(y_row, mask=mask_d, other=0.0)[None, :]
        g = tl.load(g_col, mask=mask_x, other=0.0)[:, None]
        acc += g * ((a > b).to(g.dtype) - (a < b).to(g.dtype))
        y_row += K
        g_col += stride_gy
    tl.store(out_ptr + offsets_x, acc / K, mask=mask_xd)


def _emd_side_grad(x, y, grad, stride_gx: int, stride_gy: int) -> torch.Tensor:
    bx, n = x.shape
    by = y.shape[0]
    out = torch.empty_like(x)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_D"]), triton.cdiv(bx, meta["BLOCK_X"]))

    _emd_side_grad_kernel[grid](
        x,
        y,
        grad,
        out,
        bx,
        by,
        n,
        stride_gx,
        stride_gy,
        _next_pow2_bucket(bx),
        _next_pow2_bucket(by),
        _next_pow2_bucket(n),
    )
    return out


@on_tensor_device
def emd_pair_backward(
    grad: torch.Tensor, sq: torch.Tensor, sk: torch.Tensor, output_mask: tuple[bool, bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad (Bq, Bk) contiguous in sq's dtype -> (grad_sq, grad_sk), each side only where
    output_mask asks (a 0-element placeholder otherwise); deterministic (no atomics)."""
    bk = sk.shape[0]
    grad_q = _emd_side_grad(sq, sk, grad, bk, 1) if output_mask[0] else sq.new_empty(0)
    # sign(k - q): the k side's own sign
    grad_k = _emd_side_grad(sk, sq, grad, 1, bk) if output_mask[1] else sk.new_empty(0)
    return grad_q, grad_k


# ---- quantile sketch: interpolation and its backward ------------------------------------------


@triton.jit
def _quantile_position(kk, num_quantiles, num_values):
    # quantile_position of math.h in fp64: p = (k + 0.5) M / K - 0.5 clamped to [0, M - 1].
    pos = (kk.to(tl.float64) + 0.5) * num_values / num_quantiles - 0.5
    # (zeros + n: exact in fp64, and valid whether n arrives as a scalar or a constexpr)
    pos = tl.minimum(tl.maximum(pos, 0.0), tl.zeros_like(pos) + (num_values - 1))
    lower = pos.to(tl.int64)  # pos >= 0: truncation is floor
    upper = tl.minimum(lower + 1, num_values - 1)
    return lower, upper, pos - lower.to(tl.float64)


@triton.jit
def _quantile_interpolate_kernel(sorted_ptr, out_ptr, num_values, num_quantiles, blocks_per_row, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    kk = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = kk < num_quantiles
    lower, upper, weight = _quantile_position(kk, num_quantiles, num_values)
    base = sorted_ptr + row * num_values
    v_lower = tl.load(base + lower, mask=mask, other=0.0).to(tl.float64)
    v_upper = tl.load(base + upper, mask=mask, other=0.0).to(tl.float64)
    value = v_lower * (1.0 - weight) + v_upper * weight
    tl.store(out_ptr + row * num_quantiles + kk, value.to(out_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def quantile_interpolate(sorted_x: torch.Tensor, num_quantiles: int) -> torch.Tensor:
    rows, count = sorted_x.shape
    out = torch.empty((rows, num_quantiles), dtype=sorted_x.dtype, device=sorted_x.device)
    blocks = triton.cdiv(num_quantiles, _ELEMENT_BLOCK)
    _quantile_interpolate_kernel[(rows * blocks,)](sorted_x, out, count, num_quantiles, blocks, BLOCK=_ELEMENT_BLOCK)
    return out


@triton.jit
def _quantile_scatter_kernel(
    grad_ptr,
    order_ptr,
    out_ptr,
    num_values,
    num_quantiles,
    blocks_per_row,
    INTERPOLATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # K == M: out[row, order[row, m]] = grad[row, m]. Otherwise each quantile's gradient is
    # split onto its two order statistics and added through the order (out zeroed first).
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    kk = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = kk < num_quantiles
    g = tl.load(grad_ptr + row * num_quantiles + kk, mask=mask, other=0.0)
    order_row = order_ptr + row * num_values
    out_row = out_ptr + row * num_values
    if INTERPOLATE:
        lower, upper, weight = _quantile_position(kk, num_quantiles, num_values)
        dst_lower = tl.load(order_row + lower, mask=mask, other=0)
        dst_upper = tl.load(order_row + upper, mask=mask, other=0)
        g64 = g.to(tl.float64)
        tl.atomic_add(out_row + dst_lower, (g64 * (1.0 - weight)).to(g.dtype), mask=mask, sem="relaxed")
        tl.atomic_add(out_row + dst_upper, (g64 * weight).to(g.dtype), mask=mask, sem="relaxed")
    else:
        dst = tl.load(order_row + kk, mask=mask, other=0)
        tl.store(out_row + dst, g, mask=mask)


@on_tensor_device
def quantile_scatter(grad: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    rows, num_quantiles = grad.shape
    count = order.shape[1]
    interpolate = num_quantiles != count
    if interpolate and grad.is_cuda:
        alert_not_deterministic("the quantile gradient scatter (num_quantiles != values per residual)")
    alloc = torch.zeros if interpolate else torch.empty
    out = alloc((rows, count), dtype=grad.dtype, device=grad.device)
    blocks = triton.cdiv(num_quantiles, _ELEMENT_BLOCK)
    _quantile_scatter_kernel[(rows * blocks,)](
        grad, order, out, count, num_quantiles, blocks, INTERPOLATE=interpolate, BLOCK=_ELEMENT_BLOCK
    )
    return out


# ---- moments: mean and unbiased variance per row ----------------------------------------------


@triton.jit
def _moments_kernel(x_ptr, mean_ptr, var_ptr, count, count_minus_one, BLOCK: tl.constexpr):
    # One program per row, two passes in float64 with per-lane accumulators (the moments are
    # float64 for every input dtype: the variance of float32 values near 1e20 overflows
    # float32): mean = c + sum(x - c) / M with c = x[row, 0]; then with d = x - mean,
    # var = (sum d^2 - (sum d)^2 / M) / (M - 1) (the corrected two-pass formula).
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * count
    shift = tl.load(base).to(tl.float64)
    lanes = tl.arange(0, BLOCK)
    s1 = tl.zeros((BLOCK,), dtype=tl.float64)
    for m0 in range(0, count, BLOCK):
        offs = m0 + lanes
        mask = offs < count
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float64)
        s1 += tl.where(mask, x - shift, 0.0)
    mean = shift + tl.sum(s1, axis=0) / count
    c1 = tl.zeros((BLOCK,), dtype=tl.float64)
    c2 = tl.zeros((BLOCK,), dtype=tl.float64)
    for m0 in range(0, count, BLOCK):
        offs = m0 + lanes
        mask = offs < count
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float64)
        d = tl.where(mask, x - mean, 0.0)
        c1 += d
        c2 += d * d
    sum1 = tl.sum(c1, axis=0)
    var = (tl.sum(c2, axis=0) - sum1 * sum1 / count) / count_minus_one
    tl.store(mean_ptr + row, mean)
    tl.store(var_ptr + row, var)


@on_tensor_device
def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, count = x.shape
    mean = torch.empty(rows, dtype=torch.float64, device=x.device)
    var = torch.empty(rows, dtype=torch.float64, device=x.device)
    _moments_kernel[(rows,)](x, mean, var, count, max(count - 1, 1), BLOCK=_MOMENTS_BLOCK, num_warps=8)
    if count < 2:  # the native kernel's convention: no sample variance of one value
        var.fill_(float("nan"))
    return mean, var


@triton.jit
def _moments_backward_kernel(
    grad_mean_ptr, grad_var_ptr, x_ptr, mean_ptr, out_ptr, count, count_minus_one, blocks_per_row, BLOCK: tl.constexpr
):
    # moments_input_grad of math.h: grad_mean / M + grad_var * 2 (x - mean) / (M - 1), in
    # float64 (mean and the moment gradients are float64), stored in x's dtype.
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    offs = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    x = tl.load(x_ptr + row * count + offs, mask=mask, other=0.0).to(tl.float64)
    mean = tl.load(mean_ptr + row)
    grad_mean = tl.load(grad_mean_ptr + row)
    grad_var = tl.load(grad_var_ptr + row)
    out = grad_mean / count + grad_var * 2.0 * (x - mean) / count_minus_one
    tl.store(out_ptr + row * count + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def moments_backward(grad_mean, grad_var, x, mean) -> torch.Tensor:
    rows, count = x.shape
    out = torch.empty_like(x)
    blocks = triton.cdiv(count, _ELEMENT_BLOCK)
    _moments_backward_kernel[(rows * blocks,)](
        grad_mean, grad_var, x, mean, out, count, max(count - 1, 1), blocks, BLOCK=_ELEMENT_BLOCK
    )
    return out


# ---- Bhattacharyya pair term --------------------------------------------------------------------


@triton.jit
def _log1p(z):
    # log1p without libdevice (the interpreter has none): log(u) * z / (u - 1) with u = 1 + z
    # (Goldberg's correction), exact to a few ulp; z itself where u rounds to 1.
    u = 1.0 + z
    d = u - 1.0
    return tl.where(d == 0.0, z, tl.log(u) * (z / tl.where(d == 0.0, 1.0, d)))


_BD_BLOCK = 64 if INTERPRET else 32


@triton.jit
def _bd_pair_kernel(
    mean_q_ptr,
    var_q_ptr,
    mean_k_ptr,
    var_k_ptr,
    eps_ptr,
    out_ptr,
    Bq,
    Bk,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # bd_value of math.h over a (BLOCK_Q, BLOCK_K) tile: the log1p form, squares as products
    # of ratios (no overflow where the result is finite).
    rows_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rows_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_q = rows_q < Bq
    mask_k = rows_k < Bk
    eps = tl.load(eps_ptr)
    mean_q = tl.load(mean_q_ptr + rows_q, mask=mask_q, other=0.0)
    a = tl.load(var_q_ptr + rows_q, mask=mask_q, other=1.0) + eps
    mean_k = tl.load(mean_k_ptr + rows_k, mask=mask_k, other=0.0)
    b = tl.load(var_k_ptr + rows_k, mask=mask_k, other=1.0) + eps
    mean_diff = mean_q[:, None] - mean_k[None, :]
    var_diff = a[:, None] - b[None, :]
    value = (
        0.25 * _log1p((var_diff / a[:, None]) * (var_diff / b[None, :]) * 0.25)
        + 0.25 * (mean_diff / (a[:, None] + b[None, :])) * mean_diff
    )
    offsets = rows_q.to(tl.int64)[:, None] * Bk + rows_k[None, :]
    tl.store(out_ptr + offsets, value, mask=mask_q[:, None] & mask_k[None, :])


def _eps_tensor(eps: float, like: torch.Tensor) -> torch.Tensor:
    # Passed by pointer: a Python float kernel argument would be rounded to fp32.
    return torch.full((1,), eps, dtype=like.dtype, device=like.device)


@on_tensor_device
def bd_pair(mean_q, var_q, mean_k, var_k, eps: float) -> torch.Tensor:
    bq, bk = mean_q.shape[0], mean_k.shape[0]
    out = torch.empty((bq, bk), dtype=mean_q.dtype, device=mean_q.device)
    grid = (triton.cdiv(bq, _BD_BLOCK), triton.cdiv(bk, _BD_BLOCK))
    _bd_pair_kernel[grid](
        mean_q, var_q, mean_k, var_k, _eps_tensor(eps, mean_q), out, bq, bk, BLOCK_Q=_BD_BLOCK, BLOCK_K=_BD_BLOCK
    )
    return out


@triton.jit
def _bd_side_grad_kernel(
    mean_x_ptr,
    var_x_ptr,
    mean_y_ptr,
    var_y_ptr,
    eps_ptr,
    grad_ptr,
    out_mean_ptr,
    out_var_ptr,
    Bx,
    By,
    stride_gx,
    stride_gy,
    BLOCK_X: tl.constexpr,
    BLOCK_Y: tl.constexpr,
):
    # bd_grad of math.h for the x side, summed over y with weights grad[x, y]. bd_value is
    # symmetric under swapping (mean_q, var_q) with (mean_k, var_k), so the k side is this
    # kernel with the roles (and the grad strides) swapped.
    rows_x = tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X)
    mask_x = rows_x < Bx
    eps = tl.load(eps_ptr)
    mean_x = tl.load(mean_x_ptr + rows_x, mask=mask_x, other=0.0)
    a = tl.load(var_x_ptr + rows_x, mask=mask_x, other=1.0) + eps
    acc_mean = tl.zeros((BLOCK_X,), dtype=mean_x_ptr.dtype.element_ty)
    acc_var = tl.zeros((BLOCK_X,), dtype=mean_x_ptr.dtype.element_ty)
    for j0 in range(0, By, BLOCK_Y):
        rows_y = j0 + tl.arange(0, BLOCK_Y)
        mask_y = rows_y < By
        mean_y = tl.load(mean_y_ptr + rows_y, mask=mask_y, other=0.0)
        b = tl.load(var_y_ptr + rows_y, mask=mask_y, other=1.0) + eps
        g = tl.load(
            grad_ptr + rows_x.to(tl.int64)[:, None] * stride_gx + rows_y.to(tl.int64)[None, :] * stride_gy,
            mask=mask_x[:, None] & mask_y[None, :],
            other=0.0,
        )
        aa = a[:, None]
        bb = b[None, :]
        total = aa + bb
        mean_diff = mean_x[:, None] - mean_y[None, :]
        mean_ratio = mean_diff / total
        mean_term = 0.25 * mean_ratio * mean_ratio
        d_mean = 0.5 * mean_ratio
        d_var = 0.25 * ((aa - bb) / aa) / total - mean_term
        acc_mean += tl.sum(g * d_mean, axis=1)
        acc_var += tl.sum(g * d_var, axis=1)
    tl.store(out_mean_ptr + rows_x, acc_mean, mask=mask_x)
    tl.store(out_var_ptr + rows_x, acc_var, mask=mask_x)


@on_tensor_device
def bd_pair_backward(grad, mean_q, var_q, mean_k, var_k, eps: float, output_mask: tuple[bool, bool]):
    bq, bk = mean_q.shape[0], mean_k.shape[0]
    eps_t = _eps_tensor(eps, mean_q)
    outs = [
        torch.empty_like(t) if output_mask[i // 2] else t.new_empty(0)
        for i, t in enumerate((mean_q, var_q, mean_k, var_k))
    ]
    block_x, block_y = (64, 64) if INTERPRET else (32, 64)
    for needed, (mx, vx, my, vy, om, ov, bx, by, sx, sy) in zip(
        output_mask,
        (
            (mean_q, var_q, mean_k, var_k, outs[0], outs[1], bq, bk, bk, 1),
            (mean_k, var_k, mean_q, var_q, outs[2], outs[3], bk, bq, 1, bk),
        ),
    ):
        if not needed:
            continue
        _bd_side_grad_kernel[(triton.cdiv(bx, block_x),)](
            mx, vx, my, vy, eps_t, grad, om, ov, bx, by, sx, sy, BLOCK_X=block_x, BLOCK_Y=block_y
        )
    return tuple(outs)


# ---- binned-grid MMD: linear binning and interpolation --------------------------------------------


@triton.jit
def _grid_position(x, lo, step, num_bins):
    # grid_position of math.h in fp64: u = (x - lo) / step clamped to [0, G - 1]; the lower
    # bin (at most G - 2) and the weight of the upper one.
    inv_step = 1.0 / step
    u = (x.to(tl.float64) - lo) * inv_step
    u = tl.minimum(tl.maximum(u, 0.0), tl.zeros_like(u) + (num_bins - 1))
    lower = tl.minimum(u.to(tl.int64), num_bins - 2)
    return lower, u - lower.to(tl.float64)


@triton.jit
def _grid_bin_kernel(x_ptr, lo_ptr, step_ptr, out_ptr, count, num_bins, blocks_per_row, BLOCK: tl.constexpr):
    # Each value adds mass 1/M to the two nearest grid points (fp64 atomics; out zeroed).
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    offs = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    x = tl.load(x_ptr + row * count + offs, mask=mask, other=0.0)
    lower, weight = _grid_position(x, tl.load(lo_ptr), tl.load(step_ptr), num_bins)
    mass = 1.0 / (tl.zeros_like(weight) + count)
    out_row = out_ptr + row * num_bins
    # relaxed: only the sums matter, no ordering with other memory (the default is acq_rel)
    tl.atomic_add(out_row + lower, mass * (1.0 - weight), mask=mask, sem="relaxed")
    tl.atomic_add(out_row + lower + 1, mass * weight, mask=mask, sem="relaxed")


@on_tensor_device
def grid_bin(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, num_bins: int) -> torch.Tensor:
    rows, count = x.shape
    if x.is_cuda:
        alert_not_deterministic("the binned-grid MMD's binning")
    out = torch.zeros((rows, num_bins), dtype=torch.float64, device=x.device)
    blocks = triton.cdiv(count, _ELEMENT_BLOCK)
    _grid_bin_kernel[(rows * blocks,)](x, lo, step, out, count, num_bins, blocks, BLOCK=_ELEMENT_BLOCK)
    return out


@triton.jit
def _grid_interpolate_kernel(
    field_ptr, x_ptr, lo_ptr, step_ptr, out_ptr, count, num_bins, blocks_per_row, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    offs = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    x = tl.load(x_ptr + row * count + offs, mask=mask, other=0.0)
    lower, weight = _grid_position(x, tl.load(lo_ptr), tl.load(step_ptr), num_bins)
    field_row = field_ptr + row * num_bins
    f_lower = tl.load(field_row + lower, mask=mask, other=0.0)
    f_upper = tl.load(field_row + lower + 1, mask=mask, other=0.0)
    value = f_lower * (1.0 - weight) + f_upper * weight
    tl.store(out_ptr + row * count + offs, value.to(out_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def grid_interpolate(field: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    rows, count = x.shape
    num_bins = field.shape[1]
    out = torch.empty_like(x)
    blocks = triton.cdiv(count, _ELEMENT_BLOCK)
    _grid_interpolate_kernel[(rows * blocks,)](field, x, lo, step, out, count, num_bins, blocks, BLOCK=_ELEMENT_BLOCK)
    return out
