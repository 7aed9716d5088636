"""Compile every Triton kernel of the backend for NVIDIA targets without a GPU.

    TRITON_INTERPRET=0 python -m rcl_ops.triton._compile_check [ARCH ...] [--ptxas-info]

ARCH is a compute capability as an integer (default: 80 90, Ampere and Hopper). Each kernel
is compiled through Triton's full pipeline (TTIR, TTGIR, LLVM IR, PTX, ptxas to cubin) with
every GPU autotuning config, in float32 and float64, and again with the size arguments that
Triton specialises when they equal 1 (they then arrive as constexprs). This catches
compile-only errors on CPU machines; it says nothing about speed or about results.
``--ptxas-info`` also prints register use and spills (ptxas -v). Exit status 1 on any failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from . import bd, emd, mmd  # noqa: E402
from ._common import ELEMENT_BLOCK  # noqa: E402

# Pointer arguments whose element type does not follow the values' dtype.
_POINTER_TYPES = {
    "order_ptr": "*i64",
    "lo_ptr": "*fp64",
    "step_ptr": "*fp64",
    "field_ptr": "*fp64",
    "units_ptr": "*i64",  # the fixed-point binning's integer sums
    "weights_ptr": "*fp64",  # binned weights are float64 whatever the input
}
# Integer arguments that arrive as int64 (Triton types an int >= 2^31 so): the binning's 2^S.
_INT64_ARGUMENTS = {"unit"}


def _jit_function(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):  # unwrap Autotuner / Heuristics
        kernel = kernel.fn
    return kernel


def _signature(fn: JITFunction, dtype: str, constexprs: dict) -> dict:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in _POINTER_TYPES:
                signature[name] = _POINTER_TYPES[name]
            else:
                signature[name] = f"*{dtype}"
        else:
            signature[name] = "i64" if name in _INT64_ARGUMENTS else "i32"
    return signature


def _jobs():
    """(kernel, meta-parameters, num_warps, num_stages, arguments specialised to 1)."""

    def from_configs(kernel, configs, ones):
        for config in configs:
            yield kernel, dict(config.kwargs), config.num_warps, config.num_stages, ()
        yield kernel, dict(configs[0].kwargs), configs[0].num_warps, configs[0].num_stages, ones

    yield from from_configs(emd._emd_pair_kernel, emd._EMD_PAIR_CONFIGS, ("Bq", "Bk", "K", "chunk"))
    yield from from_configs(emd._emd_side_grad_kernel, emd._EMD_SIDE_CONFIGS, ("Bx", "By", "K", "stride_gy"))
    element = {"BLOCK": ELEMENT_BLOCK}
    rows_of_one = ("num_values", "num_quantiles", "blocks_per_row")
    for ones in ((), rows_of_one):
        yield emd._quantile_interpolate_kernel, element, 4, 2, ones
        for interpolate in (True, False):
            yield emd._quantile_scatter_kernel, {**element, "INTERPOLATE": interpolate}, 4, 2, ones
    for ones in ((), ("count", "count_minus_one")):
        yield bd._moments_kernel, {"BLOCK": bd._MOMENTS_BLOCK}, 8, 2, ones
        yield bd._moments_backward_kernel, element, 4, 2, ones
    bd_tile = {"BLOCK_Q": bd._BD_BLOCK, "BLOCK_K": bd._BD_BLOCK}
    for ones in ((), ("Bq", "Bk")):
        yield bd._bd_pair_kernel, bd_tile, 4, 2, ones
    for ones in ((), ("Bx", "By", "stride_gy")):
        yield bd._bd_side_grad_kernel, {"BLOCK_X": 32, "BLOCK_Y": 64}, 4, 2, ones
    for ones in ((), ("count", "blocks_per_row")):
        yield mmd._grid_bin_kernel, element, 4, 2, ones
        yield mmd._grid_interpolate_kernel, element, 4, 2, ones
        yield mmd._units_to_weights_kernel, element, 4, 2, ones[:1]


def _ptxas_info(ptx: str, arch: int) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run(
            [ptxas, f"--gpu-name={name}", "-v", f.name, "-o", os.devnull], capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    lines = [
        line.split(":", 1)[-1].strip() for line in out.stderr.splitlines() if "registers" in line or "spill" in line
    ]
    return " | ".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = "--ptxas-info" in argv
    archs = [int(a) for a in argv if a != "--ptxas-info"] or [80, 90]
    failures = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for kernel, meta, num_warps, num_stages, ones in _jobs():
            fn = _jit_function(kernel)
            constexprs = {**meta, **{name: 1 for name in ones}}
            for dtype in ("fp32", "fp64"):
                label = f"sm_{arch} {fn.__name__} {dtype} {meta} warps={num_warps}" + (f" ones={ones}" if ones else "")
                try:
                    source = ASTSource(fn, _signature(fn, dtype, constexprs), constexprs)
                    compiled = triton.compile(
                        source, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
                    )
                except Exception as error:  # report every failure, not just the first
                    failures += 1
                    print(f"FAIL {label}: {type(error).__name__}: {error}")
                    continue
                extra = f": {_ptxas_info(compiled.asm['ptx'], arch)}" if info and not ones else ""
                print(f"ok   {label}{extra}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
