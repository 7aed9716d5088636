"""Shared helpers of the tests: the backends to parametrise over, their devices, the float64
oracles of the distances (numpy, independent of rcl_ops) and tolerances against them, the
comparison of a backend with the reference and the torch.compile comparison (trainer-only helpers:
tests/train/helpers.py). (conftest.py holds only pytest hooks and fixtures; it sets TRITON_INTERPRET
before rcl_ops is imported.) Tests import them as ``from utils import ...``."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rcl_ops

NATIVE_BACKENDS = [name for name in ("cpu", "cuda") if name in rcl_ops.available_backends()]
# Every backend that runs in this session: the reference, the native ones, and Triton (compiled
# on a GPU, interpreted on CPU tensors otherwise).
ALL_BACKENDS = ["reference", *NATIVE_BACKENDS] + (["triton"] if "triton" in rcl_ops.available_backends() else [])
# The backends with kernels of their own (native and Triton): compared with the reference.
KERNEL_BACKENDS = [name for name in ALL_BACKENDS if name != "reference"]

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


def seeded_pair(dtype=torch.float32, bq=3, bk=4, m=24, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k): bq and bk rows of m values from a generator seeded with ``seed`` (k wider and
    shifted), drawn in float64 and rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(bq, m, generator=generator, dtype=torch.float64)
    k = 1.3 * torch.randn(bk, m, generator=generator, dtype=torch.float64) + 0.2
    return q.to(dtype), k.to(dtype)


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


def compare_with_reference(fn, options, backend, q, k) -> None:
    """Values and input gradients of ``fn(q, k, backend=backend, **options)`` against the
    reference backend's (without the ``method`` option, which the reference does not take), for
    the same random non-unit grad_output, within TOLERANCE of q's dtype."""
    results, weights = [], None
    reference_options = {key: value for key, value in options.items() if key != "method"}
    for name, opts in ((backend, options), ("reference", reference_options)):
        qa = q.detach().clone().requires_grad_(True)
        ka = k.detach().clone().requires_grad_(True)
        out = fn(qa, ka, backend=name, **opts)
        weights = torch.randn_like(out) if weights is None else weights
        grad_q, grad_k = torch.autograd.grad((out * weights).sum(), (qa, ka))
        results.append((out, grad_q, grad_k))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **TOLERANCE[q.dtype])


# ---- float64 oracles (numpy, independent of rcl_ops) ----------------------------------------


def emd_oracle(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Exact W1 between equal-size empirical distributions: mean |sorted q - sorted k|."""
    sq, sk = np.sort(q, axis=1), np.sort(k, axis=1)
    return np.abs(sq[:, None, :] - sk[None, :, :]).mean(axis=2)


def mmd_oracle(q: np.ndarray, k: np.ndarray, bandwidths, unbiased: bool = False) -> np.ndarray:
    """Squared MMD by the double sum over all value pairs, in float64."""

    def kernel_mean(a, b, drop_diagonal):
        d = a[:, None] - b[None, :]
        values = sum(np.exp(-(d * d) / (2.0 * h * h)) for h in bandwidths)
        if drop_diagonal:
            return (values.sum() - np.trace(values)) / (len(a) * (len(a) - 1))
        return values.mean()

    out = np.empty((len(q), len(k)))
    for i, x in enumerate(q):
        for j, y in enumerate(k):
            out[i, j] = kernel_mean(x, x, unbiased) + kernel_mean(y, y, unbiased) - 2 * kernel_mean(x, y, False)
    return out


def bd_oracle(q: np.ndarray, k: np.ndarray, eps: float) -> np.ndarray:
    """Eq. 6 between the fitted Gaussians, with math.log1p of (a - b)^2 / (4 a b)."""
    out = np.empty((len(q), len(k)))
    for i, x in enumerate(q):
        for j, y in enumerate(k):
            a, b = np.var(x, ddof=1) + eps, np.var(y, ddof=1) + eps
            out[i, j] = 0.25 * math.log1p((a - b) ** 2 / (4 * a * b)) + 0.25 * (x.mean() - y.mean()) ** 2 / (a + b)
    return out


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """A batch as float64 (B, M) numpy rows, the oracles' input."""
    return x.detach().double().cpu().reshape(x.shape[0], -1).numpy()


def assert_compiled_loss_matches_eager(loss_fn, q, k, compile_backend="inductor", mode=None, calls=1):
    """torch.compile(fullgraph=True, mode=mode) of the loss gives the eager value and input
    gradients, on each of ``calls`` calls with new inputs of q's and k's shapes (CUDA graph trees,
    mode="reduce-overhead", record on a later call and replay after: every call is compared)."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend, mode=mode)
    for call in range(calls):
        if call:
            q = (torch.randn_like(q) * (1 + call / 4)).requires_grad_()
            k = (torch.randn_like(k) + call / 8).requires_grad_()
        eager = loss_fn(q, k)
        eager_grads = torch.autograd.grad(eager, (q, k))
        got = compiled(q, k)
        got_grads = torch.autograd.grad(got, (q, k))
        torch.testing.assert_close(got, eager)
        for a, b in zip(got_grads, eager_grads):
            torch.testing.assert_close(a, b)


class OpNames(TorchDispatchMode):
    """Records the names of the ops dispatched inside ``with OpNames() as seen:`` (seen.names)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))
