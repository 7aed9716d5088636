"""Shared helpers of the tests: the backends to parametrise over, their devices, tolerances
against float64 oracles, the torch.compile comparison, and tiny trainer records. (conftest.py holds only pytest
hooks and fixtures; it sets TRITON_INTERPRET before rcl_ops is imported.)"""

from __future__ import annotations

import torch

import rcl_ops

NATIVE_BACKENDS = [name for name in ("cpu", "cuda") if name in rcl_ops.available_backends()]
# Every backend that runs in this session: the reference, the native ones, and Triton (compiled
# on a GPU, interpreted on CPU tensors otherwise).
ALL_BACKENDS = ["reference", *NATIVE_BACKENDS] + (["triton"] if "triton" in rcl_ops.available_backends() else [])

# Backend results against the reference (same dtype): float32 kernels round differently.
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-10, "rtol": 1e-9}}
# A result in `dtype` against a float64 oracle: the rounding of the output itself plus the
# accumulated rounding of the kernels (float32 kernels accumulate in double).
ORACLE_RTOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def backend_device(backend: str) -> str:
    """The device of the tensors a backend runs on in the tests."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _float64(x) -> torch.Tensor:
    return x.detach().double().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def relative_error(got, want, floor: float = 0.0) -> float:
    """max |got - want| / max(|want|, floor), in float64 (tensors or numpy arrays)."""
    got, want = _float64(got), _float64(want)
    return ((got - want).abs() / want.abs().clamp_min(floor)).max().item()


def assert_close_to_oracle(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, floor: float = 0.0) -> None:
    """got (computed in dtype) within ORACLE_RTOL[dtype] of the float64 oracle want, relative to
    |want| (or to floor where |want| is smaller)."""
    error = relative_error(got, want, floor)
    assert error <= ORACLE_RTOL[dtype], f"relative error {error:.3g} > {ORACLE_RTOL[dtype]} ({dtype})"


def assert_compiled_loss_matches_eager(loss_fn, q, k, compile_backend="inductor"):
    """torch.compile(fullgraph=True) of the loss gives the eager value and input gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    eager = loss_fn(q, k)
    eager_grads = torch.autograd.grad(eager, (q, k))
    got = compiled(q, k)
    got_grads = torch.autograd.grad(got, (q, k))
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b)


def denoising_records(count: int, size: int, modality: str = "rgb") -> list:
    """``count`` random clean ``size`` x ``size`` images (from torch's global generator) as trainer records
    whose denoising task input (``jdd`` for RAW) is their noisy observation."""
    from rcl_ops.train.data import DENOISING_TASK, make_records
    from rcl_ops.train.images import CleanImage

    images = [CleanImage(f"im{i}", torch.rand(3, size, size)) for i in range(count)]
    records = make_records(images, modality, 0, 20, 0, second_draw=False)
    for record in records:
        record.task_inputs[DENOISING_TASK[modality]] = record.observed
    return records
