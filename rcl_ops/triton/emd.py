"""The EMD of the "triton" backend: the quantile sketch and the pair term, as Triton kernels,
their launchers and the ``rcl_ops_triton::`` custom ops.

``sorted_quantiles`` sorts with torch.sort, then a Triton kernel interpolates the K mid-level
quantiles; ``emd_pair`` is a GEMM-like (Bq, Bk) tiling that loops over K (split over K into
partial sums when the tile grid alone would not fill the GPU). The backward is two
deterministic kernels (q side, k side) and one kernel adding each quantile's gradient onto its
order statistics through the sort order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    ELEMENT_BLOCK,
    INTERPRET,
    NAMESPACE,
    alert_not_deterministic,
    autotune,
    cfg,
    check_grad,
    check_rows,
    check_same,
    custom_op,
    next_pow2_bucket,
    num_sms,
    on_tensor_device,
    ops,
    row_block,
)

# ---- EMD pair: D[i, j] = mean_d |sq[i, d] - sk[j, d]| ----------------------------------------

# (BLOCK_Q, BLOCK_K, BLOCK_D) register tiles of the |a - b| broadcast: 8-16 K elements per
# program, 4-8 warps. Starting points for Ampere/Hopper, to be re-tuned from `make gpu-check`.
_EMD_PAIR_CONFIGS = [
    cfg(BLOCK_Q=32, BLOCK_K=32, BLOCK_D=8, num_warps=4),
    cfg(BLOCK_Q=64, BLOCK_K=64, BLOCK_D=4, num_warps=8),
    cfg(BLOCK_Q=16, BLOCK_K=16, BLOCK_D=32, num_warps=4),
]
_EMD_PAIR_INTERPRET = cfg(BLOCK_Q=16, BLOCK_K=16, BLOCK_D=64)
# Split-K granule: each split covers a multiple of every config's BLOCK_D.
_EMD_SPLIT_GRANULE = 64 if INTERPRET else 256


@autotune(_EMD_PAIR_INTERPRET, _EMD_PAIR_CONFIGS, key=["bucket_q", "bucket_k", "chunk"])
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
    splits = 1 if INTERPRET else max(1, min(max_splits, triton.cdiv(4 * num_sms(device), tiles)))
    chunk = triton.cdiv(triton.cdiv(k, splits), granule) * granule
    return triton.cdiv(k, chunk), chunk


@on_tensor_device
def _launch_emd_pair(sq: torch.Tensor, sk: torch.Tensor) -> torch.Tensor:
    bq, n = sq.shape
    bk = sk.shape[0]
    splits, chunk = _emd_splits(bq, bk, n, sq.device)
    partial = torch.empty((splits, bq, bk), dtype=sq.dtype, device=sq.device)

    def grid(meta):
        return (triton.cdiv(bq, meta["BLOCK_Q"]), triton.cdiv(bk, meta["BLOCK_K"]), splits)

    _emd_pair_kernel[grid](sq, sk, partial, bq, bk, n, chunk, next_pow2_bucket(bq), next_pow2_bucket(bk))
    return partial.view(bq, bk) if splits == 1 else partial.sum(0)


# ---- EMD pair backward: one side at a time ---------------------------------------------------

# (BLOCK_X rows x BLOCK_D values) register blocks; the key rows are swept one at a time, so
# no 3-D intermediate goes through shared memory.
# (16 x 128, 4 warps and 16 x 256, 8 warps: 16 values per thread, no spills in fp64 on
# sm_80/sm_90 by ptxas -v; 32 x 128 spills in fp64 only: benchmarks/results/design-measurements.md.)
_EMD_SIDE_CONFIGS = [
    cfg(BLOCK_X=16, BLOCK_D=128, num_warps=4),
    cfg(BLOCK_X=16, BLOCK_D=256, num_warps=8),
    cfg(BLOCK_X=32, BLOCK_D=128, num_warps=8),
]
_EMD_SIDE_INTERPRET = cfg(BLOCK_X=32, BLOCK_D=128)


@autotune(_EMD_SIDE_INTERPRET, _EMD_SIDE_CONFIGS, key=["bucket_x", "bucket_y", "bucket_d"])
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
        next_pow2_bucket(bx),
        next_pow2_bucket(by),
        next_pow2_bucket(n),
    )
    return out


@on_tensor_device
def _launch_emd_pair_backward(
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
    row, kk, mask = row_block(blocks_per_row, num_quantiles, BLOCK)
    lower, upper, weight = _quantile_position(kk, num_quantiles, num_values)
    base = sorted_ptr + row * num_values
    v_lower = tl.load(base + lower, mask=mask, other=0.0).to(tl.float64)
    v_upper = tl.load(base + upper, mask=mask, other=0.0).to(tl.float64)
    value = v_lower * (1.0 - weight) + v_upper * weight
    tl.store(out_ptr + row * num_quantiles + kk, value.to(out_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def _launch_quantile_interpolate(sorted_x: torch.Tensor, num_quantiles: int) -> torch.Tensor:
    rows, count = sorted_x.shape
    out = torch.empty((rows, num_quantiles), dtype=sorted_x.dtype, device=sorted_x.device)
    blocks = triton.cdiv(num_quantiles, ELEMENT_BLOCK)
    _quantile_interpolate_kernel[(rows * blocks,)](sorted_x, out, count, num_quantiles, blocks, BLOCK=ELEMENT_BLOCK)
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
    row, kk, mask = row_block(blocks_per_row, num_quantiles, BLOCK)
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
def _launch_quantile_scatter(grad: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    rows, num_quantiles = grad.shape
    count = order.shape[1]
    interpolate = num_quantiles != count
    if interpolate and grad.is_cuda:
        alert_not_deterministic("the quantile gradient scatter (num_quantiles != values per residual)")
    alloc = torch.zeros if interpolate else torch.empty
    out = alloc((rows, count), dtype=grad.dtype, device=grad.device)
    blocks = triton.cdiv(num_quantiles, ELEMENT_BLOCK)
    _quantile_scatter_kernel[(rows * blocks,)](
        grad, order, out, count, num_quantiles, blocks, INTERPOLATE=interpolate, BLOCK=ELEMENT_BLOCK
    )
    return out


# ---- the custom ops ----------------------------------------------------------------------------------


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t in ref's dtype, contiguous (autograd hands over expanded or strided gradients)."""
    return t.to(ref.dtype).contiguous()


@custom_op("sorted_quantiles")
def sorted_quantiles(x: torch.Tensor, num_quantiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) -> (B, K) mid-level quantiles of each row (the sorted row when K == M) and the
    (B, M) int32 sort order. Sorted by torch.sort (stable); the interpolation is a Triton kernel."""
    check_rows(x, "sorted_quantiles", "x")
    torch._check(num_quantiles >= 1, lambda: f"{NAMESPACE}::sorted_quantiles: num_quantiles must be positive")
    torch._check(x.shape[1] < 2**31, lambda: f"{NAMESPACE}::sorted_quantiles: at most 2^31 - 1 values per row")
    values, order = torch.sort(x, dim=1, stable=True)
    order = order.to(torch.int32)
    if num_quantiles == x.shape[1]:
        return values, order
    return _launch_quantile_interpolate(values, num_quantiles), order


@custom_op("sorted_quantiles_backward")
def sorted_quantiles_backward(grad_quantiles: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, K) gradient of the quantiles -> (B, M) gradient of the values: split onto the two
    order statistics of each quantile and scattered through the sort order in one kernel."""
    check_rows(grad_quantiles, "sorted_quantiles_backward", "grad_quantiles")
    torch._check(
        order.dim() == 2 and order.shape[0] == grad_quantiles.shape[0] and order.dtype == torch.int32,
        lambda: f"{NAMESPACE}::sorted_quantiles_backward: order must be int32 of shape ({grad_quantiles.shape[0]}, M)",
    )
    return _launch_quantile_scatter(grad_quantiles.contiguous(), order.contiguous())


def _check_pair(sorted_q, sorted_k, op):
    check_rows(sorted_q, op, "sorted_q")
    check_rows(sorted_k, op, "sorted_k")
    check_same(sorted_q, sorted_k, op, "sorted_q and sorted_k")
    torch._check(
        sorted_q.shape[1] == sorted_k.shape[1],
        lambda: (
            f"{NAMESPACE}::{op}: sorted_q and sorted_k must have the same K, got "
            f"{sorted_q.shape[1]} and {sorted_k.shape[1]}"
        ),
    )


@custom_op("emd_pair")
def emd_pair(sorted_q: torch.Tensor, sorted_k: torch.Tensor) -> torch.Tensor:
    """D[i, j] = mean_k |sorted_q[i, k] - sorted_k[j, k]|: (Bq, Bk) tiles, looping over K."""
    _check_pair(sorted_q, sorted_k, "emd_pair")
    return _launch_emd_pair(sorted_q.contiguous(), sorted_k.contiguous())


@custom_op(
    "emd_pair_backward",
    schema="(Tensor grad, Tensor sorted_q, Tensor sorted_k, bool[2] output_mask) -> (Tensor, Tensor)",
)
def emd_pair_backward(grad, sorted_q, sorted_k, output_mask):
    _check_pair(sorted_q, sorted_k, "emd_pair_backward")
    check_grad(grad, sorted_q.shape[0], sorted_k.shape[0], "emd_pair_backward")
    return _launch_emd_pair_backward(
        _like(grad, sorted_q), sorted_q.contiguous(), sorted_k.contiguous(), tuple(output_mask)
    )


OPS = (sorted_quantiles, sorted_quantiles_backward, emd_pair, emd_pair_backward)


def triton_emd(q: torch.Tensor, k: torch.Tensor, num_quantiles: int | None) -> torch.Tensor:
    """The backend's EMD: K quantiles of each residual (its sorted values when K is None), paired."""
    num_quantiles = q.shape[1] if num_quantiles is None else num_quantiles
    sorted_q, _ = ops.sorted_quantiles(q, num_quantiles)
    sorted_k, _ = ops.sorted_quantiles(k, num_quantiles)
    return ops.emd_pair(sorted_q, sorted_k)
