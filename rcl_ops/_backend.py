"""Backend registry: each backend computes the three distance matrices on flattened inputs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class Backend:
    """A named implementation of the three pairwise distances on (B, M) inputs.

    ``emd(q, k, num_quantiles)``, ``mmd(q, k, bandwidths, unbiased, method, num_bins)`` (bandwidths
    a float64 (H,) tensor, or None for rcl_ops.ops.default_bandwidth(q, k)), ``bd(q, k, eps)``;
    ``device_types`` lists the tensor device types it runs on. The sketch and pair stages
    (rcl_ops.sketch), all differentiable: ``sorted_quantiles(x, K)`` (B, K),
    ``emd_pair(a, b)`` (Bq, Bk) mean absolute differences, ``moments(x)`` float64 (mean, var),
    ``bd_pair(mean_q, var_q, mean_k, var_k, eps)`` float64 (Bq, Bk).
    """

    name: str
    device_types: tuple[str, ...]
    emd: Callable
    mmd: Callable
    bd: Callable
    mmd_methods: tuple[str, ...] = ("grid", "direct")
    sorted_quantiles: Callable | None = None
    emd_pair: Callable | None = None
    moments: Callable | None = None
    bd_pair: Callable | None = None


def op_library_stages(ops) -> dict[str, Callable]:
    """The sketch and pair stages of an op library that implements the shared contract of
    rcl_ops/_fakes.py (torch.ops.rcl_ops, torch.ops.rcl_ops_triton)."""
    return {
        "sorted_quantiles": lambda x, num_quantiles: ops.sorted_quantiles(x, num_quantiles)[0],
        "emd_pair": ops.emd_pair,
        "moments": ops.moments,
        "bd_pair": ops.bd_pair,
    }


_registry: dict[str, Backend] = {}
_unavailable_reasons: dict[str, str] = {}
_warned_fallback: set[str] = set()


def register_backend(backend: Backend) -> None:
    _registry[backend.name] = backend
    _unavailable_reasons.pop(backend.name, None)


def mark_unavailable(name: str, reason: str) -> None:
    """Record why a backend could not be loaded; the reason appears in selection errors."""
    if name not in _registry:
        _unavailable_reasons[name] = reason


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that run on ``device`` (all loaded backends when None)."""
    device_type = None if device is None else torch.device(device).type
    return [name for name, backend in _registry.items() if device_type is None or device_type in backend.device_types]


# Preferred native backend per device type when backend="auto". On CUDA the C++ kernels
# are faster than the Triton ones for every distance, on the GPU and on the host, so "cuda"
# comes first for all three (the measurements: benchmarks/results/design-measurements.md).
# "triton" is the fallback when the extension was built without CUDA.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def select_backend(backend: str = "auto", device: torch.device | str = "cpu", *, where: str = "select_backend") -> str:
    """The name of the backend that ``backend=...`` runs on tensors of ``device``, as the distances
    and the loss would pick it: "auto" gives the fastest one loaded for the device (the reference,
    with a one-time RuntimeWarning, where none is). Raises ValueError for an unknown name or a
    backend that does not run on ``device``, RuntimeError for one that is not loaded here (the
    message says why); ``where`` starts the messages (e.g. the command-line option that named it)."""
    return resolve_backend(backend, torch.device(device), where).name


def check_backend_name(name, where: str, device: torch.device | None = None) -> str:
    """name if it is one of BACKEND_NAMES, else ValueError listing those loaded on ``device`` (None:
    on CPU and CUDA)."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        device_types = _AUTO_ORDER if device is None else (device.type,)
        available = "; ".join(f"available on {t}: {available_backends(t)}" for t in device_types)
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {BACKEND_NAMES} ({available})")
    return name


def resolve_backend(name: str, device: torch.device, where: str) -> Backend:
    """The backend called ``name`` for tensors on ``device``; "auto" picks the fastest loaded."""
    check_backend_name(name, where, device)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ()):
            backend = _registry.get(candidate)
            if backend is not None and device.type in backend.device_types:
                return backend
        if device.type in _AUTO_ORDER and device.type not in _warned_fallback:
            _warned_fallback.add(device.type)
            reasons = "; ".join(f"{n}: {r}" for n, r in _unavailable_reasons.items()) or "none loaded"
            warnings.warn(
                f"rcl_ops: no native backend for {device.type} tensors ({reasons}); "
                "falling back to the slow pure-PyTorch reference backend",
                RuntimeWarning,
                stacklevel=3,
            )
        return _registry["reference"]
    backend = _registry.get(name)
    if backend is None:
        reason = _unavailable_reasons.get(name, "not built into this installation")
        raise RuntimeError(
            f"{where}: backend {name!r} is unavailable ({reason}); "
            f"available on {device.type}: {available_backends(device)}"
        )
    if device.type not in backend.device_types:
        raise ValueError(
            f"{where}: backend {name!r} does not run on {device.type} tensors; "
            f"available on {device.type}: {available_backends(device)}"
        )
    return backend
