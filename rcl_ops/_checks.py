"""Input validation shared by the public functions and the loss."""

from __future__ import annotations

import numbers

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_check_finite = True


def set_check_finite(enabled: bool) -> None:
    """Turn the NaN/Inf check of the inputs on (default) or off.

    The check costs one host-device synchronisation per call; switch it off for speed
    once inputs are known to be finite. It is always skipped inside ``torch.compile``.
    """
    global _check_finite
    _check_finite = bool(enabled)


def check_finite_enabled() -> bool:
    """Whether the NaN/Inf check of the inputs is on."""
    return _check_finite


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_tensor(x: torch.Tensor, name: str, where: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"{where}: {name} must have shape (B, ...) with at least one value dimension, got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{where}: {name} has an empty batch (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{where}: {name} has no values per residual (shape {tuple(x.shape)})")


def check_all_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ValueError naming the first tensor and batch index holding NaN or Inf.

    One host synchronisation for all tensors in the common case: a NaN or Inf anywhere makes
    the sum of the sums NaN or Inf. A non-finite sum of finite values (overflow) falls
    through to the exact per-row check. Half inputs are summed in float32 (their own range
    would overflow on ordinary data)."""
    if not _check_finite or _is_compiling():
        return
    total = sum(x.sum(dtype=torch.promote_types(x.dtype, torch.float32)) for x in tensors.values())
    if bool(torch.isfinite(total)):
        return
    for name, x in tensors.items():
        finite_rows = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if not bool(finite_rows.all()):
            bad = torch.nonzero(~finite_rows).flatten().tolist()
            raise ValueError(
                f"{where}: {name} contains NaN or Inf at batch index {bad[0]}"
                + (f" (and {len(bad) - 1} more: {bad[1:9]})" if len(bad) > 1 else "")
                + "; disable this check with rcl_ops.set_check_finite(False)"
            )


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs, else the promoted floating dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def prepare_pair(q: torch.Tensor, k: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two residual batches and flatten them to (Bq, Mq), (Bk, Mk) in the compute dtype."""
    _check_tensor(q, "q", where)
    _check_tensor(k, "k", where)
    if q.device != k.device:
        raise ValueError(f"{where}: q is on {q.device} but k is on {k.device}; put both on one device")
    check_all_finite({"q": q, "k": k}, where)
    dtype = compute_dtype(q, k)
    return q.reshape(q.shape[0], -1).to(dtype), k.reshape(k.shape[0], -1).to(dtype)


def check_positive_int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_positive_float(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{where}: {name} must be positive and finite, got {value!r}")
    return value
