"""What the Triton op modules (emd.py, bd.py, mmd.py) share: autotuning, the launch helpers, the
ops' namespace and their argument checks.

Every launcher takes contiguous 2-D float32/float64 tensors and returns fresh tensors; the
custom ops validate, make contiguous and call these. Arithmetic follows
csrc/include/rcl_ops/math.h: fp32 inputs accumulate in fp32 registers, fp64 inputs in fp64;
positions (quantile and grid) are computed in fp64 as the native kernels do.

When TRITON_INTERPRET=1 each autotuned kernel has a single config with large blocks (the
interpreter costs about the same per block whatever its size, and autotuning needs a driver).

The ops live in their own namespace, ``rcl_ops_triton::`` (tests/test_native.py requires an
opcheck sample for every ``rcl_ops::`` op of the native library; tests/test_triton.py checks
these). They are ``torch.library.custom_op``s rather than ``triton_op``s: opaque to
torch.compile (fullgraph traces them through their fake kernels), and they pass opcheck under
TRITON_INTERPRET=1, where triton_op fails the fake-tensor test.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NAMESPACE = "rcl_ops_triton"
ops = torch.ops.rcl_ops_triton  # the dispatcher's view of the ops (used once they are defined)
_FLOATS = (torch.float32, torch.float64)


# ---- autotuning and launches ----------------------------------------------------------------------


def _bench(kernel_call, quantiles):
    # Short timing runs: the default 25 ms warm-up + 100 ms per config would make the first
    # call of every new size take most of a second per kernel.
    return triton.testing.do_bench(kernel_call, warmup=2, rep=10, quantiles=quantiles)


def autotune(interpret_config: triton.Config, gpu_configs: list[triton.Config], key: list[str]):
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=key)
    return triton.autotune(configs=gpu_configs, key=key, do_bench=_bench)


def cfg(num_warps: int = 4, num_stages: int = 2, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def next_pow2_bucket(n: int) -> int:
    """Autotuning key: sizes are bucketed by powers of two, so a new exact size reuses a tuning."""
    return triton.next_power_of_2(max(int(n), 1))


# Values per program of the element-wise kernels (quantile interpolation and scatter, the
# moments' backward, grid binning and interpolation).
ELEMENT_BLOCK = 4096 if INTERPRET else 1024


@triton.jit
def row_block(blocks_per_row, count, BLOCK: tl.constexpr):
    # The block of an element-wise kernel's program over rows of `count` elements, with
    # `blocks_per_row` programs per row: its row (int64), the BLOCK offsets in the row, their mask.
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    offsets = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    return row, offsets, offsets < count


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
    bits depend on the order of the additions (emd.py's quantile gradient scatter; the grid
    MMD's binning adds integers and needs none)."""
    if torch.are_deterministic_algorithms_enabled():
        message = (
            f"rcl_ops (triton): {what} adds with float atomics, so repeated runs can differ in the "
            "last bits; it does not have a deterministic implementation"
        )
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message + " (use torch.use_deterministic_algorithms(True, warn_only=True))")
        warnings.warn(message, UserWarning, stacklevel=3)


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda" and not INTERPRET:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ---- the custom ops and their argument checks ---------------------------------------------------------


def custom_op(name: str, schema: str | None = None):
    """A custom op of the namespace; ``schema`` where the native op's types cannot be inferred
    from annotations (bool[2])."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=schema)


def check_rows(x: torch.Tensor, op: str, name: str) -> None:
    torch._check(x.dim() == 2, lambda: f"{NAMESPACE}::{op}: {name} must be 2-D, got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"{NAMESPACE}::{op}: {name} must be float32 or float64, got {x.dtype}")


def check_same(a: torch.Tensor, b: torch.Tensor, op: str, names: str) -> None:
    torch._check(
        a.dtype == b.dtype and a.device == b.device,
        lambda: (
            f"{NAMESPACE}::{op}: {names} must share dtype and device, got {a.dtype}/{a.device} and {b.dtype}/{b.device}"
        ),
    )


def check_grad(grad: torch.Tensor, rows: int, cols: int, op: str) -> None:
    torch._check(
        grad.dim() == 2 and grad.shape[0] == rows and grad.shape[1] == cols,
        lambda: f"{NAMESPACE}::{op}: grad must have shape ({rows}, {cols}), got {tuple(grad.shape)}",
    )


def check_vector(x: torch.Tensor, size: int, op: str, name: str) -> None:
    torch._check(
        x.dim() == 1 and x.shape[0] == size,
        lambda: f"{NAMESPACE}::{op}: {name} must have shape ({size},), got {tuple(x.shape)}",
    )
