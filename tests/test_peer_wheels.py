"""scripts/peer_wheels.sh: the peers' wheels install offline into a folder of their own (as
`make gpu-check` does on a GPU machine that reaches no registry), and the pins cover the
benchmark extra. No network: the wheel installed here is built by hand."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "peer_wheels.sh"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _write_wheel(folder: Path, name: str, version: str, module_source: str) -> Path:
    """A minimal pure-Python wheel holding one module, ``name``."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": module_source.encode(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(path, data) for path, data in files.items()] + [f"{dist_info}/RECORD,,"]
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for file_name, data in files.items():
            wheel.writestr(file_name, data)
        wheel.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_install_puts_the_wheels_on_a_target_folder_without_an_index(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels, "rcl_fake_peer", "1.0", "ANSWER = 42\n")
    target = tmp_path / "site"
    result = _run("install", str(wheels), str(target))
    assert result.returncode == 0, result.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import rcl_fake_peer; print(rcl_fake_peer.ANSWER)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert probe.stdout.strip() == "42", probe.stderr


def test_install_from_a_folder_without_wheels_says_so(tmp_path):
    result = _run("install", str(tmp_path), str(tmp_path / "site"))
    assert result.returncode == 1
    assert f"no wheels in {tmp_path}" in result.stderr
    assert not (tmp_path / "site").exists()


def test_an_unknown_command_is_refused():
    result = _run("fetch")
    assert result.returncode == 2 and "usage" in result.stderr


def test_the_pins_cover_the_benchmark_extra():
    lines = [line.strip() for line in (ROOT / "benchmarks" / "peers.txt").read_text().splitlines()]
    pins = [line for line in lines if line and not line.startswith("#")]
    assert all("==" in pin for pin in pins), "every peer is pinned to one version"
    pinned = {pin.split("==")[0].lower() for pin in pins}
    with open(ROOT / "pyproject.toml", "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["bench"]
    peers = {re.split(r"[=<>\[]", name)[0].lower() for name in extra} - {"matplotlib"}
    assert peers <= pinned, f"benchmarks/peers.txt lacks {sorted(peers - pinned)}"


def test_gpu_check_installs_the_peer_wheels_before_its_stages():
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    install = script.index("peer_wheels.sh install")
    assert install < script.index("for stage in $STAGES")
    assert "PYTHONPATH" in script[install : script.index("for stage in $STAGES")]
