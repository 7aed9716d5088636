"""The Bhattacharyya distance of the "triton" backend: the moments and the pair term, as Triton
kernels, their launchers and the ``rcl_ops_triton::`` custom ops.

``moments`` is one program per row (corrected two-pass mean and variance, float64 for every
input dtype); ``bd_pair`` is element-wise over (Bq, Bk) tiles (the log1p form of Eq. 6), from
float64 moments. Both have backward kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    ELEMENT_BLOCK,
    INTERPRET,
    NAMESPACE,
    check_grad,
    check_rows,
    check_same,
    check_vector,
    custom_op,
    on_tensor_device,
    ops,
)

# Values per loop step of the one-program-per-row moments.
_MOMENTS_BLOCK = 4096 if INTERPRET else 2048


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
def _launch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, count = x.shape
    mean = torch.empty(rows, dtype=torch.float64, device=x.device)
    var = torch.empty(rows, dtype=torch.float64, device=x.device)
    _moments_kernel[(rows,)](x, mean, var, count, max(count - 1, 1), BLOCK=_MOMENTS_BLOCK, num_warps=8)
    if count < 2:  # the native kernel's convention: no sample variance of one value
        var.fill_(float("nan"))
    return mean, var


@triton.jit
def _moments_backward_kernel(
    grad_mean_ptr, grad_var_ptr, x_ptr, mean_ptr, out_ptr, count, count_minus_one, BLOCK: tl.constexpr
):
    # moments_grad_row and moments_input_grad of math.h. Program (row, block of the row). Per
    # row, in float64: slope = 2 grad_var / (M - 1), shift = mean rounded to x's dtype, offset =
    # grad_mean / M - slope (mean - shift); per element, in x's dtype: offset + slope (x - shift)
    # (centred on shift so that float32 does not cancel when |mean| >> std).
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    dtype = x_ptr.dtype.element_ty
    mean = tl.load(mean_ptr + row)
    shift = mean.to(dtype)
    slope = 2.0 * tl.load(grad_var_ptr + row) / count_minus_one
    offset = tl.load(grad_mean_ptr + row) / count - slope * (mean - shift.to(tl.float64))
    x = tl.load(x_ptr + row * count + offsets, mask=mask, other=0.0)
    out = offset.to(dtype) + slope.to(dtype) * (x - shift)
    tl.store(out_ptr + row * count + offsets, out, mask=mask)


# Programs per row along the grid's second axis, whose size CUDA caps.
_MAX_GRID_Y = 65535


@on_tensor_device
def _launch_moments_backward(grad_mean, grad_var, x, mean) -> torch.Tensor:
    rows, count = x.shape
    out = torch.empty_like(x)
    block = max(ELEMENT_BLOCK, triton.next_power_of_2(triton.cdiv(count, _MAX_GRID_Y)))
    _moments_backward_kernel[(rows, triton.cdiv(count, block))](
        grad_mean, grad_var, x, mean, out, count, max(count - 1, 1), BLOCK=block
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
def _launch_bd_pair(mean_q, var_q, mean_k, var_k, eps: float) -> torch.Tensor:
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
def _launch_bd_pair_backward(grad, mean_q, var_q, mean_k, var_k, eps: float, output_mask: tuple[bool, bool]):
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


# ---- the custom ops ----------------------------------------------------------------------------------


@custom_op("moments")
def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) -> float64 mean (B,), unbiased variance (B,): one program per row."""
    check_rows(x, "moments", "x")
    return _launch_moments(x.contiguous())


@custom_op("moments_backward")
def moments_backward(
    grad_mean: torch.Tensor, grad_var: torch.Tensor, x: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    check_rows(x, "moments_backward", "x")
    for name, t in (("grad_mean", grad_mean), ("grad_var", grad_var), ("mean", mean)):
        check_vector(t, x.shape[0], "moments_backward", name)
    as64 = [t.to(torch.float64).contiguous() for t in (grad_mean, grad_var, mean)]
    return _launch_moments_backward(as64[0], as64[1], x.contiguous(), as64[2])


def _check_bd(mean_q, var_q, mean_k, var_k, op):
    torch._check(mean_q.dim() == 1 and mean_k.dim() == 1, lambda: f"{NAMESPACE}::{op}: means must be 1-D")
    torch._check(mean_q.dtype == torch.float64, lambda: f"{NAMESPACE}::{op}: the moments must be float64")
    check_vector(var_q, mean_q.shape[0], op, "var_q")
    check_vector(var_k, mean_k.shape[0], op, "var_k")
    for name, t in (("mean_k", mean_k), ("var_q", var_q), ("var_k", var_k)):
        check_same(mean_q, t, op, f"mean_q and {name}")


@custom_op("bd_pair")
def bd_pair(
    mean_q: torch.Tensor, var_q: torch.Tensor, mean_k: torch.Tensor, var_k: torch.Tensor, eps: float
) -> torch.Tensor:
    """Eq. 6 between N(mean_q[i], var_q[i]) and N(mean_k[j], var_k[j]), (Bq, Bk) float64 tiles."""
    _check_bd(mean_q, var_q, mean_k, var_k, "bd_pair")
    args = [t.contiguous() for t in (mean_q, var_q, mean_k, var_k)]
    return _launch_bd_pair(*args, eps)


@custom_op(
    "bd_pair_backward",
    schema="(Tensor grad, Tensor mean_q, Tensor var_q, Tensor mean_k, Tensor var_k, float eps, "
    "bool[2] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
)
def bd_pair_backward(grad, mean_q, var_q, mean_k, var_k, eps, output_mask):
    _check_bd(mean_q, var_q, mean_k, var_k, "bd_pair_backward")
    check_grad(grad, mean_q.shape[0], mean_k.shape[0], "bd_pair_backward")
    args = [t.contiguous() for t in (mean_q, var_q, mean_k, var_k)]
    return _launch_bd_pair_backward(grad.contiguous(), *args, eps, tuple(output_mask))


OPS = (moments, moments_backward, bd_pair, bd_pair_backward)


def triton_bd(q: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    """The backend's BD: the moments of both batches, paired."""
    return ops.bd_pair(*ops.moments(q), *ops.moments(k), eps).to(q.dtype)
