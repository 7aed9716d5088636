"""Input validation shared by the public functions and the loss."""

from __future__ import annotations

import math
import numbers

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The NaN/Inf input check reads every value and brings one number back to the host. On CPU
# that is a few microseconds; on a GPU it is a host-device synchronisation per call, which
# stalls the launch pipeline of a training step, so there it is opt-in (as anomaly detection is).
CHECK_FINITE_DEFAULTS = {"cpu": True}  # device types not listed: off
_check_finite_overrides: dict[str, bool] = {}
_ALL_DEVICES = "*"


def set_check_finite(enabled: bool | None, device_type: str | None = None) -> None:
    """Turn the NaN/Inf check of the inputs on or off, for one device type ("cpu", "cuda",
    ...) or, with ``device_type=None``, for all; ``enabled=None`` restores the defaults (on for
    CPU tensors, off elsewhere: there the check costs a host-device synchronisation per call).
    The check is always skipped inside ``torch.compile``."""
    if enabled is None:
        if device_type is None:
            _check_finite_overrides.clear()
        else:
            _check_finite_overrides.pop(device_type, None)
        return
    if device_type is None:
        _check_finite_overrides.clear()
        device_type = _ALL_DEVICES
    _check_finite_overrides[device_type] = bool(enabled)


def check_finite_enabled(device_type: str = "cpu") -> bool:
    """Whether the NaN/Inf check of the inputs is on for tensors of ``device_type``."""
    enabled = _check_finite_overrides.get(device_type)
    if enabled is None:
        enabled = _check_finite_overrides.get(_ALL_DEVICES, CHECK_FINITE_DEFAULTS.get(device_type, False))
    return enabled


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_residuals(x: torch.Tensor, name: str, where: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    shape = x.shape
    if len(shape) < 2:
        raise ValueError(
            f"{where}: {name} must have shape (B, ...) with at least one value dimension, got shape {tuple(shape)}"
        )
    if shape[0] == 0:
        raise ValueError(f"{where}: {name} has an empty batch (shape {tuple(shape)})")
    if x.numel() == 0:
        raise ValueError(f"{where}: {name} has no values per residual (shape {tuple(shape)})")


def _finite_sum(x: torch.Tensor) -> torch.Tensor:
    # Half inputs are summed in float32: their own range would overflow on ordinary data.
    return x.sum(dtype=torch.float32) if x.dtype in _LOW_PRECISION else x.sum()


def check_all_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ValueError naming the first tensor and batch index holding NaN or Inf (when the
    check is on for the tensors' device type; see set_check_finite).

    One host round trip for all tensors in the common case: a NaN or Inf anywhere makes the
    sum of the sums NaN or Inf. A non-finite sum of finite values (overflow) falls through to
    the exact per-row check."""
    device_type = next(iter(tensors.values())).device.type
    if not check_finite_enabled(device_type) or _is_compiling():
        return
    if device_type == "cpu":
        if math.isfinite(sum(_finite_sum(x).item() for x in tensors.values())):
            return
    elif bool(torch.isfinite(sum(_finite_sum(x) for x in tensors.values()))):  # one sync
        return
    for name, x in tensors.items():
        finite_rows = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if not bool(finite_rows.all()):
            bad = torch.nonzero(~finite_rows).flatten().tolist()
            raise ValueError(
                f"{where}: {name} contains NaN or Inf at batch index {bad[0]}"
                + (f" (and {len(bad) - 1} more: {bad[1:9]})" if len(bad) > 1 else "")
                + f"; disable this check with rcl_ops.set_check_finite(False, {device_type!r})"
            )


def check_result(distances: torch.Tensor, where: str) -> torch.Tensor:
    """distances, or OverflowError when they hold NaN or Inf (the inputs were finite) while
    the check is on for their device type: a distance beyond the dtype's range (e.g. EMD of
    float32 values near 3e38), or a Bhattacharyya distance of a constant residual with eps=0."""
    if not check_finite_enabled(distances.device.type) or _is_compiling():
        return distances
    # On CPU one sum first, as check_all_finite does: NaN or Inf anywhere makes it NaN or Inf, and
    # a non-finite sum of finite distances (overflow) falls through to the exact check. In a
    # tiny loss step it costs a quarter of isfinite().all() (benchmarks/results/design-measurements.md).
    if distances.device.type == "cpu" and math.isfinite(_finite_sum(distances.detach()).item()):
        return distances
    if not bool(torch.isfinite(distances).all()):
        raise OverflowError(
            f"{where}: the distances are not finite in {distances.dtype} although the inputs are: "
            "they overflow its range (compute in float64, or rescale the residuals), or, for BD "
            "with eps=0, a residual has zero variance (use eps > 0)"
        )
    return distances


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs, else the promoted floating dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def prepare_pair(q: torch.Tensor, k: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two residual batches and flatten them to (Bq, Mq), (Bk, Mk) in the compute dtype."""
    check_residuals(q, "q", where)
    check_residuals(k, "k", where)
    if q.device != k.device:
        raise ValueError(f"{where}: q is on {q.device} but k is on {k.device}; put both on one device")
    check_all_finite({"q": q, "k": k}, where)
    dtype = compute_dtype(q, k)
    return as_rows(q, dtype), as_rows(k, dtype)


def as_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as (B, M) in ``dtype``, without a call where nothing changes (host time per step)."""
    if x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    return x if x.dtype == dtype else x.to(dtype)


def check_positive_int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_positive_float(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{where}: {name} must be positive and finite, got {value!r}")
    return value
