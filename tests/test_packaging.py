"""The source distribution holds everything needed to build the extension anywhere."""

import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a fresh clone of this tree holds."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the project's files cannot be listed")
    return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


def _sdist_of_a_clean_copy(files: list[str], tmp_path: Path) -> Path:
    """Copy ``files`` into tmp_path/src and build the sdist there (without the extension)."""
    source = tmp_path / "src"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    env = {"RCL_OPS_BUILD_EXTENSION": "0", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")]
    build = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("rcl_ops-*.tar.gz")
    return archive


def test_sdist_holds_every_source_and_header(tmp_path):
    # Built from a clean copy: a stale *.egg-info/SOURCES.txt in the checkout would otherwise
    # supply the file list and hide a missing MANIFEST.in rule.
    files = _project_files()
    csrc = {name for name in files if name.startswith("csrc/")}
    assert any(s.endswith(".h") for s in csrc) and any(s.endswith(".cu") for s in csrc)
    archive = _sdist_of_a_clean_copy(files, tmp_path)
    with tarfile.open(archive) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted((csrc | {"setup.py", "pyproject.toml", "LICENSE", "README.md"}) - members)
    assert not missing, f"the sdist lacks {missing}"


def test_sdist_installs_into_a_fresh_environment_and_runs(tmp_path):
    # Build the sdist, install it (compiling the extension) into a new virtual environment
    # that sees this one's torch but not this checkout, and run an op from elsewhere.
    archive = _sdist_of_a_clean_copy(_project_files(), tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # torch, numpy, setuptools, ninja and pip from this environment (a .pth path, whose own
    # .pth files, such as this checkout's editable install, are not processed).
    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    Path(site, "host-packages.pth").write_text(here + "\n")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--ignore-installed"]
        + ["--target", str(tmp_path / "installed"), str(archive)],
        cwd=tmp_path,
        env={**os.environ, "RCL_OPS_UNOPTIMISED_BUILD": "1"},  # what is tested is the packaging
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    run = subprocess.run(
        [
            python,
            "-c",
            "import rcl_ops, torch\n"
            "print(rcl_ops._C.__file__)\n"
            "print(rcl_ops.available_backends('cpu'))\n"
            "print(float(rcl_ops.pairwise_bd(torch.ones(1, 4).cumsum(1), torch.ones(1, 4), eps=1.0, backend='cpu')))\n",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "installed"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    extension, backends, value = run.stdout.splitlines()
    # One binary for every CPython >= 3.10 (the limited API), from the install, not this checkout.
    assert extension.startswith(str(tmp_path / "installed")) and extension.endswith("_C.abi3.so")
    assert "cpu" in backends
    # BD of N(2.5, 5/3 + 1) and N(1, 0 + 1): 1/4 ln(1/4 (a/b + b/a + 2)) + 1/4 (1.5)^2 / (a + b).
    a, b = 5 / 3 + 1, 1.0
    expected = 0.25 * math.log(0.25 * (a / b + b / a + 2)) + 0.25 * 1.5**2 / (a + b)
    assert abs(float(value) - expected) < 1e-6
