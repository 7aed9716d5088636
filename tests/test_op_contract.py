"""The contract that the native (``rcl_ops::``) and Triton (``rcl_ops_triton::``) op libraries
share (rcl_ops/_fakes.py, rcl_ops/_autograd.py): the same schemas, output dtypes and values for
the ops both implement, and backward ops that skip the gradients nobody needs."""

from __future__ import annotations

import pytest
import torch
from utils import ALL_BACKENDS, NATIVE_BACKENDS, backend_device, seeded_pair

import rcl_ops

SHARED_OPS = [
    "sorted_quantiles",
    "sorted_quantiles_backward",
    "emd_pair",
    "emd_pair_backward",
    "moments",
    "moments_backward",
    "bd_pair",
    "bd_pair_backward",
    "mmd_grid",
    "mmd_grid_backward",
]
BOTH_LIBRARIES = NATIVE_BACKENDS and "triton" in rcl_ops.available_backends()


@pytest.mark.skipif(not BOTH_LIBRARIES, reason="needs the native and the Triton backends")
@pytest.mark.parametrize("name", SHARED_OPS)
def test_native_and_triton_ops_share_their_schema(name):
    native = getattr(torch.ops.rcl_ops, name).default._schema
    triton = getattr(torch.ops.rcl_ops_triton, name).default._schema
    assert [(a.name, str(a.type)) for a in native.arguments] == [(a.name, str(a.type)) for a in triton.arguments]
    assert [str(r.type) for r in native.returns] == [str(r.type) for r in triton.returns]


@pytest.mark.skipif(not BOTH_LIBRARIES, reason="needs the native and the Triton backends")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_and_triton_ops_agree_on_dtypes_and_values(dtype):
    device = backend_device("triton")
    native_device = "cuda" if device == "cuda" and "cuda" in NATIVE_BACKENDS else "cpu"
    q, k = seeded_pair(dtype)
    h = torch.tensor([0.8], dtype=torch.float64)
    outputs = {}
    for namespace, dev in (("rcl_ops", native_device), ("rcl_ops_triton", device)):
        ops = getattr(torch.ops, namespace)
        qd, kd, hd = q.to(dev), k.to(dev), h.to(dev)
        sq, order = ops.sorted_quantiles(qd, 7)
        sk, _ = ops.sorted_quantiles(kd, 7)
        moments_q, moments_k = ops.moments(qd), ops.moments(kd)
        outputs[namespace] = [
            sq,
            order,
            ops.emd_pair(sq, sk),
            *moments_q,
            ops.bd_pair(*moments_q, *moments_k, 1e-6),
            *ops.mmd_grid(qd, kd, hd, 64, False),
        ]
    for native, triton in zip(outputs["rcl_ops"], outputs["rcl_ops_triton"]):
        assert native.dtype == triton.dtype and native.shape == triton.shape
        torch.testing.assert_close(triton.cpu(), native.cpu(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("namespace", ["rcl_ops", "rcl_ops_triton"])
def test_backward_ops_return_placeholders_for_masked_sides(namespace):
    if namespace == "rcl_ops" and not NATIVE_BACKENDS or namespace == "rcl_ops_triton" and "triton" not in ALL_BACKENDS:
        pytest.skip(f"{namespace} is not loaded")
    device = backend_device("triton" if namespace == "rcl_ops_triton" else NATIVE_BACKENDS[0])
    ops = getattr(torch.ops, namespace)
    q, k = (t.to(device) for t in seeded_pair(torch.float32))
    grad = torch.randn(3, 4, device=device)
    sq, sk = ops.sorted_quantiles(q, 24)[0], ops.sorted_quantiles(k, 24)[0]
    full_q, full_k = ops.emd_pair_backward(grad, sq, sk, [True, True])
    only_q, skipped_k = ops.emd_pair_backward(grad, sq, sk, [True, False])
    skipped_q, only_k = ops.emd_pair_backward(grad, sq, sk, [False, True])
    assert skipped_k.numel() == 0 and skipped_q.numel() == 0
    torch.testing.assert_close(only_q, full_q)
    torch.testing.assert_close(only_k, full_k)
    moments = (*ops.moments(q), *ops.moments(k))
    grads = ops.bd_pair_backward(grad, *moments, 1e-6, [False, True])
    assert [g.numel() for g in grads] == [0, 0, 4, 4]
    h = torch.tensor([0.8], dtype=torch.float64, device=device)
    _, grid, w_q, w_k = ops.mmd_grid(q, k, h, 64, False)
    grad_q, grad_k = ops.mmd_grid_backward(grad, q, k, h, grid, w_q, w_k, 64, False, [True, False])
    assert grad_q.shape == q.shape and grad_k.numel() == 0
