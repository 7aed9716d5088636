"""The CUDA sources compile (for sm_80 and sm_90) wherever nvcc is found, even without a GPU
or a CUDA build of torch: nvcc builds them against the installed torch's headers.

All of csrc/cuda/*.cu are compiled once per session, in parallel; each file is then its own
test. The real build and run on a GPU is ``make gpu-check``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
CUDA_SOURCES = sorted([*CU_SOURCES, *CUDA_DIR.glob("*.cuh")])
ARCHS = ("80", "90")
# ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare toolkit may lack.
FORBIDDEN_INCLUDE = re.compile(r"#\s*include\s*[<\"]ATen/cuda/CUDAContext\.h[>\"]")
# Host synchronisations: the CUDA ops read scalars (grid bounds, bandwidths) on the device.
HOST_SYNC = re.compile(r"\.item\s*[<(]|\.cpu\s*\(|\.tolist\s*\(|cuda(Device|Stream)Synchronize")


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def _nvcc_command(nvcc: str, source: Path, output: Path) -> list[str]:
    torch_include = Path(torch.__file__).resolve().parent / "include"
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ARCHS]
    return [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(output),
        "-std=c++20",
        "-Xcompiler",
        "-fPIC",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
        f"-I{torch_include}",
        f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{ROOT / 'csrc' / 'include'}",
        f"-I{ROOT / 'csrc'}",
        *gencode,
        "--threads",
        str(len(ARCHS)),  # the per-architecture device compilations in parallel
    ]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Compiles every csrc/cuda/*.cu in parallel; the nvcc result of each, by file name."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH nor in $CUDA_HOME/bin): CUDA sources not compiled")
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True)
    missing = [arch for arch in ARCHS if f"compute_{arch}" not in listed.stdout]
    if listed.returncode != 0 or missing:
        pytest.skip(f"{nvcc} cannot target sm_{', sm_'.join(missing or ARCHS)}")
    out_dir = tmp_path_factory.mktemp("cuda_objects")

    def compile_one(source: Path) -> subprocess.CompletedProcess:
        command = _nvcc_command(nvcc, source, out_dir / f"{source.stem}.o")
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = pool.map(compile_one, CU_SOURCES)
        return {source.name: result for source, result in zip(CU_SOURCES, results)}


def test_cuda_sources_exist():
    assert CU_SOURCES, f"no CUDA sources in {CUDA_DIR}"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_avoids_cuda_context_header(source):
    assert not FORBIDDEN_INCLUDE.search(source.read_text()), (
        f"{source.name} includes ATen/cuda/CUDAContext.h; use c10/cuda/CUDAStream.h, CUDAGuard.h, CUDAException.h"
    )


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_has_no_host_sync(source):
    found = [match.group(0) for match in HOST_SYNC.finditer(source.read_text())]
    assert not found, f"{source.name} synchronises with the host: {found}"


@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles(compiled, source):
    result = compiled[source.name]
    assert result.returncode == 0, (
        f"nvcc failed on {source.name} (exit {result.returncode}):\n"
        f"{' '.join(result.args)}\n{result.stdout}\n{result.stderr}"
    )
