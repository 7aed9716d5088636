"""The "triton" backend assembled: the ``rcl_ops_triton::`` ops of emd.py, bd.py and mmd.py, their
fake kernels (rcl_ops/_fakes.py) and autograd (rcl_ops/_autograd.py), shared with the native
ops, and the backend itself."""

from __future__ import annotations

from .._autograd import register_mmd_grid_autograd, register_sketch_and_pair_autograd
from .._backend import Backend, op_library_stages, register_backend
from .._fakes import register_fake_kernels
from . import bd, emd, mmd
from ._common import INTERPRET, NAMESPACE, ops

register_fake_kernels(NAMESPACE)
register_sketch_and_pair_autograd(NAMESPACE)
# The native library registers the same rule for rcl_ops::mmd_grid in C++ (csrc/autograd.cpp),
# where it costs no Python on the host per step.
register_mmd_grid_autograd(NAMESPACE)

# Every op of the namespace, for the tests' opcheck coverage.
OPS = (*emd.OPS, *bd.OPS, *mmd.OPS)

# CUDA tensors normally; CPU tensors too when kernels run in the interpreter (the tests).
DEVICE_TYPES = ("cpu", "cuda") if INTERPRET else ("cuda",)

register_backend(
    Backend(
        "triton",
        DEVICE_TYPES,
        emd.triton_emd,
        mmd.triton_mmd,
        bd.triton_bd,
        mmd_methods=("grid",),
        **op_library_stages(ops),
    )
)
