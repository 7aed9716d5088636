"""Builds the native extension rcl_ops._C from csrc/.

CPU sources always; CUDA sources (csrc/cuda/*.cu) when torch is a CUDA build and a CUDA
toolkit is found. RCL_OPS_WITH_CUDA=1 makes a missing CUDA setup an error instead of a
CPU-only build, RCL_OPS_WITH_CUDA=0 skips CUDA. Target architectures come from
TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"). Install with `pip install -e . --no-build-isolation`
so the extension is built against the torch already installed.

The extension uses only CPython's limited API (its module is an empty PyModuleDef; the ops
register through torch's dispatcher, not pybind11), so it is built as one abi3 binary
(rcl_ops/_C.abi3.so) for every CPython >= 3.10, as the official custom-op example does.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The oldest CPython the binary supports (pyproject.toml's requires-python).
LIMITED_API = "0x030A0000"
LIMITED_API_TAG = "cp310"
CPU_SOURCE_PATTERNS = ("csrc/*.cpp", "csrc/cpu/*.cpp")
CUDA_SOURCE_PATTERNS = ("csrc/cuda/*.cu",)


def sources(patterns):
    return sorted(path for pattern in patterns for path in glob.glob(pattern, root_dir=ROOT))


def extensions():
    if os.environ.get("RCL_OPS_BUILD_EXTENSION", "1") == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    wanted = os.environ.get("RCL_OPS_WITH_CUDA", "auto")
    cuda_ready = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if wanted == "1" and not cuda_ready:
        raise RuntimeError(
            "RCL_OPS_WITH_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    with_cuda = cuda_ready and wanted != "0"
    # RCL_OPS_UNOPTIMISED_BUILD=1 compiles without optimisation, 2-3x faster: for tests of the
    # packaging itself, never for use.
    optimisation = "-O0" if os.environ.get("RCL_OPS_UNOPTIMISED_BUILD") == "1" else "-O3"
    cxx_flags = [optimisation, "-fopenmp", "-fvisibility=hidden", f"-DPy_LIMITED_API={LIMITED_API}"]
    extra_compile_args = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        extra_compile_args["nvcc"] = [optimisation, "--expt-relaxed-constexpr", "-lineinfo"]
        extension_class = cpp_extension.CUDAExtension
        srcs = sources(CPU_SOURCE_PATTERNS + CUDA_SOURCE_PATTERNS)
    else:
        extension_class = cpp_extension.CppExtension
        srcs = sources(CPU_SOURCE_PATTERNS)
    return [
        extension_class(
            "rcl_ops._C",
            srcs,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}} if ext_modules else {},
)
