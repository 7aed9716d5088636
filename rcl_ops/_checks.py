"""Validation shared by the public functions, the loss, the sketches and the distributed path:
one check per option name (``OPTIONS``, applied by ``checked_options``), the residual batches,
and the NaN/Inf checks that read values on the host."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import torch

from ._backend import check_backend_name

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The NaN/Inf input check reads every value and brings one number back to the host. On CPU
# that is a few microseconds; on a GPU it is a host-device synchronisation per call, which
# stalls the launch pipeline of a training step, so there it is opt-in (as anomaly detection is).
CHECK_FINITE_DEFAULTS = {"cpu": True}  # device types not listed: off
_check_finite_overrides: dict[str, bool] = {}
_ALL_DEVICES = "*"

# ---- the options' ranges ----------------------------------------------------------------------

MMD_METHODS = ("auto", "grid", "direct")
REDUCTIONS = ("mean", "sum", "none")
DEFAULT_NUM_BINS = 4096
# Largest grid: its FFTs have 2^25 points per residual (the kernels index it with int64).
MAX_NUM_BINS = 1 << 24
# Longest row of the binned-grid MMD: its fixed-point binning (csrc/include/rcl_ops/math.h,
# kMaxGridValues) splits each value into 2^S integer units with M 2^S < 2^63 and S >= 24.
MAX_GRID_VALUES = (1 << 39) - 1
# Largest K: sort orders are int32.
MAX_NUM_QUANTILES = (1 << 31) - 1
# Largest queue: 2^31 keys of sketches (at least 32 GiB of negatives for a BD sketch).
MAX_QUEUE_SIZE = (1 << 31) - 1
# Bandwidths, given or the default: 1 / (2 h^2) and h^2 must be finite and non-zero in float64
# (every kernel evaluates exp(-d^2 / (2 h^2)) in float64; the grid's span reaches 1e-3 h).
MIN_BANDWIDTH, MAX_BANDWIDTH = 1e-154, 1e154


def check_bool(value, name: str, where: str) -> bool:
    """value if it is a bool: no truthy strings, numbers or tensors."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def check_int(value, name: str, where: str, *, low: int, high: int) -> int:
    """value as an int in [low, high] (TypeError for bools, floats, strings)."""
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(low, "an integer")
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{where}: {name} must be {what} in [{low}, {high}], got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{where}: {name} must be {what} in [{low}, {high}], got {value!r}")
    return int(value)


def check_real(value, name: str, where: str, *, positive: bool) -> float:
    """value as a finite float, > 0 (positive) or >= 0."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or value == math.inf:  # NaN fails both
        what = "positive and finite" if positive else "a non-negative finite float"
        raise ValueError(f"{where}: {name} must be {what}, got {value!r}")
    return value


def check_choice(value, name: str, where: str, *, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where}: unknown {name} {value!r}; choose one of {choices}")
    return value


def check_bandwidths(value, name: str, where: str) -> tuple[float, ...]:
    """A float or a non-empty sequence of floats, each in [MIN_BANDWIDTH, MAX_BANDWIDTH]."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: pass {name} as a float or a sequence of floats, not a tensor")
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{where}: {name} must be a float or a sequence of floats, got {type(value).__name__}")
    values = [value] if isinstance(value, numbers.Real) else value
    if not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{where}: {name} must be None, a float or a non-empty sequence of floats")
    values = tuple(check_real(h, name, where, positive=True) for h in values)
    for h in values:
        if not MIN_BANDWIDTH <= h <= MAX_BANDWIDTH:
            raise ValueError(
                f"{where}: {name} {h!r} is outside [{MIN_BANDWIDTH:g}, {MAX_BANDWIDTH:g}]: 1 / (2 h^2) or h^2 "
                "overflows float64; rescale the residuals instead"
            )
    return values


def check_value_range(value, name: str, where: str) -> tuple[float, float]:
    """(lo, hi): two finite floats, lo < hi, hi - lo finite in float64."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{where}: {name} must be a pair (lo, hi) of floats, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{where}: {name} must hold two finite floats, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise ValueError(f"{where}: {name} must satisfy lo < hi, got {value!r}")
    if not math.isfinite(hi - lo):
        raise ValueError(f"{where}: {name} {value!r} spans hi - lo = inf, which overflows float64")
    return lo, hi


def check_device_type(value, name: str, where: str) -> str:
    """A device type torch knows ("cpu", "cuda", ...), not a device ("cuda:0")."""
    if not isinstance(value, str):
        raise TypeError(f"{where}: {name} must be a device type such as 'cpu' or 'cuda', got {type(value).__name__}")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"{where}: {name} {value!r} is not a device type torch knows ('cpu', 'cuda', ...)") from None
    if device.type != value:
        raise ValueError(f"{where}: {name} must be a device type such as {device.type!r}, not the device {value!r}")
    return value


def _optional(check: Callable) -> Callable:
    """check, or None passed through (the option's default)."""

    def optional(value, name: str, where: str):
        return None if value is None else check(value, name, where)

    return optional


# The check of every option by name: the functions, the loss, the sketches and the distributed path
# take each option through the same one (``checked_options``).
OPTIONS: dict[str, Callable] = {
    "num_quantiles": _optional(functools.partial(check_int, low=1, high=MAX_NUM_QUANTILES)),
    "num_bins": _optional(functools.partial(check_int, low=2, high=MAX_NUM_BINS)),
    "queue_size": functools.partial(check_int, low=0, high=MAX_QUEUE_SIZE),
    "first_positive": functools.partial(check_int, low=0, high=(1 << 63) - 1),
    "unbiased": check_bool,
    "symmetric": check_bool,
    "gather_distributed": check_bool,
    "enabled": _optional(check_bool),
    "eps": functools.partial(check_real, positive=False),
    "temperature": functools.partial(check_real, positive=True),
    "bandwidth": _optional(check_bandwidths),
    "value_range": _optional(check_value_range),
    "method": functools.partial(check_choice, choices=MMD_METHODS),
    "reduction": functools.partial(check_choice, choices=REDUCTIONS),
    "backend": lambda value, name, where: check_backend_name(value, where),
    "device_type": _optional(check_device_type),
}


def checked_options(*data: str, where: str | None = None) -> Callable:
    """Decorator: every call checks the options it is given by ``OPTIONS`` (by parameter name, also
    those in ``**kwargs``) and passes their normalised values on. ``data`` names the parameters that
    are not options; any other parameter without a check is a TypeError where the function is
    defined, so an option cannot be added unchecked. Defaults are not checked (a test checks them)."""

    def decorate(fn: Callable) -> Callable:
        parameters = inspect.signature(fn).parameters.values()
        unchecked = [p.name for p in parameters if p.name not in OPTIONS and p.name not in data]
        if unchecked:
            raise TypeError(f"{fn.__qualname__}: no check for option(s) {unchecked} in rcl_ops._checks.OPTIONS")
        positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        checks = {key: check for key, check in OPTIONS.items() if key not in data}
        positional_checks = [(i, key, checks[key]) for i, key in enumerate(positional) if key in checks]
        name = where or fn.__name__

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            if positional_checks and len(args) > positional_checks[0][0]:
                args = list(args)
                for i, key, check in positional_checks:
                    if i < len(args):
                        args[i] = check(args[i], key, name)
            for key, value in kwargs.items():
                check = checks.get(key)
                if check is not None:
                    kwargs[key] = check(value, key, name)
            return fn(*args, **kwargs)

        return checked

    return decorate


# ---- the NaN/Inf checks -------------------------------------------------------------------------


@checked_options()
def set_check_finite(enabled: bool | None, device_type: str | None = None) -> None:
    """Turn the NaN/Inf check of the inputs on or off, for one device type ("cpu", "cuda",
    ...) or, with ``device_type=None``, for all; ``enabled=None`` restores the defaults (on for
    CPU tensors, off elsewhere: there the check costs a host-device synchronisation per call).
    The check is always skipped inside ``torch.compile``; under ``torch.func.vmap`` it raises
    (it reads values on the host): turn it off there."""
    if enabled is None:
        if device_type is None:
            _check_finite_overrides.clear()
        else:
            _check_finite_overrides.pop(device_type, None)
        return
    if device_type is None:
        _check_finite_overrides.clear()
        device_type = _ALL_DEVICES
    _check_finite_overrides[device_type] = enabled


@checked_options()
def check_finite_enabled(device_type: str = "cpu") -> bool:
    """Whether the NaN/Inf check of the inputs is on for tensors of ``device_type``."""
    return _finite_check_on(device_type)


def _finite_check_on(device_type: str) -> bool:
    enabled = _check_finite_overrides.get(device_type)
    if enabled is None:
        enabled = _check_finite_overrides.get(_ALL_DEVICES, CHECK_FINITE_DEFAULTS.get(device_type, False))
    return enabled


def _under_vmap() -> bool:
    """Whether a torch.func.vmap transform is active (there no value can be read on the host)."""
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def host_checks_on(device_type: str, where: str) -> bool:
    """Whether the checks that read values on the host run for tensors of ``device_type``: the NaN/Inf
    check is on for it and no torch.compile traces the call. Under torch.func.vmap, where no value
    can be read, a RuntimeError says how to turn them off."""
    if not _finite_check_on(device_type) or torch.compiler.is_compiling():
        return False
    if _under_vmap():
        raise RuntimeError(
            f"{where}: the NaN/Inf check reads values on the host, which torch.func.vmap does not allow; "
            f"turn it off around vmap with rcl_ops.set_check_finite(False, {device_type!r})"
        )
    return True


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


def find_non_finite(tensors: dict[str, torch.Tensor]) -> tuple[str, list[int]] | None:
    """(name, batch indices) of the first of ``tensors`` holding NaN or Inf, or None.

    One host round trip for all tensors in the common case: a NaN or Inf anywhere makes the
    sum of the sums NaN or Inf. A non-finite sum of finite values (overflow) falls through to
    the exact per-row check."""
    if next(iter(tensors.values())).device.type == "cpu":
        if math.isfinite(sum(_finite_sum(x).item() for x in tensors.values())):
            return None
    elif bool(torch.isfinite(sum(_finite_sum(x) for x in tensors.values()))):  # one sync
        return None
    for name, x in tensors.items():
        finite_rows = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if not bool(finite_rows.all()):
            return name, torch.nonzero(~finite_rows).flatten().tolist()
    return None


def non_finite_message(name: str, bad: list[int], device_type: str) -> str:
    more = f" (and {len(bad) - 1} more: {bad[1:9]})" if len(bad) > 1 else ""
    return (
        f"{name} contains NaN or Inf at batch index {bad[0]}{more}; "
        f"disable this check with rcl_ops.set_check_finite(False, {device_type!r})"
    )


def check_all_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ValueError naming the first tensor and batch index holding NaN or Inf (when the
    check is on for the tensors' device type; see set_check_finite)."""
    device_type = next(iter(tensors.values())).device.type
    if host_checks_on(device_type, where):
        found = find_non_finite(tensors)
        if found is not None:
            raise ValueError(f"{where}: {non_finite_message(*found, device_type)}")


def check_result(distances: torch.Tensor, where: str) -> torch.Tensor:
    """distances, or OverflowError when they hold NaN or Inf (the inputs were finite) while
    the check is on for their device type: a distance beyond the dtype's range (e.g. EMD of
    float32 values near 3e38), or a Bhattacharyya distance of a constant residual with eps=0."""
    if not host_checks_on(distances.device.type, where):
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


def check_loss(loss: torch.Tensor, distances: torch.Tensor, temperature: float, where: str) -> torch.Tensor:
    """loss (reduced or per row), or OverflowError when it holds NaN or Inf although the distances
    are finite (the logits -distances / temperature overflow their dtype), while the check is on."""
    if not host_checks_on(loss.device.type, where):
        return loss
    finite = math.isfinite(loss.item()) if loss.dim() == 0 else bool(torch.isfinite(loss).all())
    if not finite and bool(torch.isfinite(distances).all()):
        raise OverflowError(
            f"{where}: the loss is not finite although the distances are: the logits -distances / "
            f"temperature overflow {distances.dtype} (temperature {temperature!r}, distances up to "
            f"{distances.abs().max().item():.3g}); raise the temperature or rescale the distances"
        )
    return loss


def check_default_bandwidth(bandwidths: torch.Tensor, where: str) -> torch.Tensor:
    """The data-driven bandwidth (float64 (1,)) where it lies in [MIN_BANDWIDTH, MAX_BANDWIDTH].
    Outside (values of magnitude ~1e-200 or ~1e200): ValueError where the host checks run, else NaN,
    so that the distances come out NaN, never a plausible number (no host sync)."""
    if host_checks_on(bandwidths.device.type, where):
        # One value (the pooled std) needs no min op: a read is all a tiny step should pay.
        h = bandwidths.item() if bandwidths.numel() == 1 else bandwidths.min().item()
        if not MIN_BANDWIDTH <= h <= MAX_BANDWIDTH:
            raise ValueError(
                f"{where}: the default bandwidth (the pooled standard deviation of the values, {h:.3g}) is "
                f"outside [{MIN_BANDWIDTH:g}, {MAX_BANDWIDTH:g}], where 1 / (2 h^2) and h^2 are finite in float64; "
                "rescale the residuals"
            )
        return bandwidths
    inside = (bandwidths >= MIN_BANDWIDTH) & (bandwidths <= MAX_BANDWIDTH)
    return torch.where(inside, bandwidths, torch.full_like(bandwidths, math.nan))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs, else the promoted floating dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def check_pair(q: torch.Tensor, k: torch.Tensor, where: str) -> None:
    """Two residual batches on one device, finite where the check is on."""
    check_residuals(q, "q", where)
    check_residuals(k, "k", where)
    if q.device != k.device:
        raise ValueError(f"{where}: q is on {q.device} but k is on {k.device}; put both on one device")
    check_all_finite({"q": q, "k": k}, where)


def prepare_pair(q: torch.Tensor, k: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two residual batches and flatten them to (Bq, Mq), (Bk, Mk) in the compute dtype."""
    check_pair(q, k, where)
    dtype = compute_dtype(q, k)
    return as_rows(q, dtype), as_rows(k, dtype)


def as_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as (B, M) in ``dtype``, without a call where nothing changes (host time per step)."""
    if x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    return x if x.dtype == dtype else x.to(dtype)
