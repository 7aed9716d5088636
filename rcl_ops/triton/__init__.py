"""The "triton" backend: Triton kernels for the pairwise EMD, binned-grid MMD and BD.

Same sketch-then-pair structure as the native kernels (rcl_ops/_native.py), one module per op
(kernels, launchers and custom ops):

- ``emd.py``: ``sorted_quantiles`` (torch.sort, then a Triton kernel interpolating the K
  mid-level quantiles) and ``emd_pair``, a GEMM-like (Bq, Bk) tiling that loops over K (split
  over K into partial sums when the tile grid alone would not fill the GPU); the backward is two
  deterministic kernels (q side, k side) and one kernel adding each quantile's gradient onto
  its order statistics through the sort order.
- ``bd.py``: ``moments`` (one program per row, corrected two-pass mean/variance) and
  ``bd_pair`` (element-wise over (Bq, Bk) tiles, log1p form of Eq. 6); backward kernels for both.
- ``mmd.py``: ``mmd_grid``, the algorithm of csrc/mmd_grid.cpp composed in Python from two
  Triton kernels (linear binning with fp64 atomics, interpolation of the gradient field) and
  torch.fft / float64 GEMMs. Only method="grid".
- ``_common.py``: what they share (autotuning, launch helpers, argument checks);
  ``_register.py``: the fake kernels, autograd and the backend's registration.

All are ``torch.library.custom_op``s in the ``rcl_ops_triton`` namespace with fake kernels
and autograd, so torch.compile(fullgraph=True) and opcheck work. The backend runs on CUDA
tensors; with TRITON_INTERPRET=1 (set before this module is imported) it also runs on CPU
tensors through the Triton interpreter, which is how the test suite exercises the kernels
on CPU-only machines.

backend="auto" on CUDA: rcl_ops/_backend.py's _AUTO_ORDER tries "cuda" first, then
"triton": measured on an H200 (`make gpu-check`), the C++ kernels are faster than these for
every distance, and lighter on the host (the numbers: benchmarks/results/design-measurements.md
and the README). On a GPU the grid binning and, for K != M, the quantile scatter add with float
atomics (last bits vary between runs); both honour torch.use_deterministic_algorithms (error,
or a warning with warn_only=True). The compiled kernels use Triton's default fp32 division and
FMA contraction, where math.h's shared CPU/CUDA code rounds each step: GPU Triton results differ
from the native ones in the last bits, within the tests' float32 tolerances (rtol 1e-4).

Needs triton (tested with 3.6.0, as shipped beside the CUDA builds of torch 2.11). When
triton cannot be imported, or the kernels fail to load, nothing is registered and
``UNAVAILABLE_REASON`` says why (rcl_ops marks the backend unavailable with it).
"""

from __future__ import annotations

import os
import traceback

AVAILABLE = False
UNAVAILABLE_REASON: str | None = None


def _raised_inside(error: BaseException, package_dir: str) -> bool:
    """Whether the innermost frame of error's traceback is in package_dir."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(package_dir + os.sep)


try:
    import triton
except ImportError as error:
    UNAVAILABLE_REASON = f"triton is not installed ({error})"
else:
    try:
        from . import _register  # noqa: F401  defines the ops and registers the backend
    except Exception as error:
        # An incompatible triton (the error comes from inside triton) leaves the backend
        # unavailable and rcl_ops importable; an error of our own code propagates.
        if not _raised_inside(error, os.path.dirname(os.path.abspath(triton.__file__))):
            raise
        UNAVAILABLE_REASON = f"the Triton kernels failed to load: {type(error).__name__}: {error}"
    else:
        AVAILABLE = True
