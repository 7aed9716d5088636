"""The source distribution holds everything needed to build the extension anywhere."""

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


def test_sdist_holds_every_source_and_header(tmp_path):
    # Built from a clean copy: a stale *.egg-info/SOURCES.txt in the checkout would otherwise
    # supply the file list and hide a missing MANIFEST.in rule.
    files = _project_files()
    source = tmp_path / "src"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    csrc = {name for name in files if name.startswith("csrc/")}
    assert any(s.endswith(".h") for s in csrc) and any(s.endswith(".cu") for s in csrc)
    env = {"RCL_OPS_BUILD_EXTENSION": "0", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")]
    build = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("rcl_ops-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted((csrc | {"setup.py", "pyproject.toml", "LICENSE", "README.md"}) - members)
    assert not missing, f"the sdist lacks {missing}"
