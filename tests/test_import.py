"""`import rcl_ops` falls back to the reference backend only when the native extension is
missing or cannot be loaded; a broken module of the package itself fails the import loudly."""

import shutil
import subprocess
import sys
from pathlib import Path

import rcl_ops

PACKAGE = Path(rcl_ops.__file__).parent


def _copy_package(tmp_path: Path, with_extension: bool) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", *([] if with_extension else ["_C*.so", "_C*.pyd"]))
    shutil.copytree(PACKAGE, tmp_path / "rcl_ops", ignore=ignore)
    return tmp_path


# The copy must be the only rcl_ops the child sees: an editable install's finder would supply
# the checkout's modules (and its _C) for whatever the copy lacks.
_ONLY_THE_COPY = "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in repr(f)]\n"


def _run(root: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _ONLY_THE_COPY + code],
        cwd=root,
        env={"PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_broken_module_fails_the_import(tmp_path):
    root = _copy_package(tmp_path, with_extension=True)
    formulas = root / "rcl_ops" / "_formulas.py"
    formulas.write_text(formulas.read_text() + '\nraise ImportError("broken on purpose")\n')
    result = _run(root, "import rcl_ops")
    assert result.returncode != 0 and "broken on purpose" in result.stderr


def test_a_broken_native_glue_module_fails_the_import(tmp_path):
    # _native.py imports only after _C loaded: its own ImportError is a bug, not "no extension".
    root = _copy_package(tmp_path, with_extension=True)
    native = root / "rcl_ops" / "_native.py"
    native.write_text(native.read_text().replace("from ._fakes import", "from ._no_such_module import"))
    result = _run(root, "import rcl_ops")
    assert result.returncode != 0 and "_no_such_module" in result.stderr


def test_a_missing_extension_falls_back_to_the_reference_with_a_warning(tmp_path):
    root = _copy_package(tmp_path, with_extension=False)
    code = (
        "import warnings, torch, rcl_ops\n"
        "assert 'cpu' not in rcl_ops.available_backends(), rcl_ops.available_backends()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    rcl_ops.pairwise_emd(torch.randn(2, 5), torch.randn(3, 5))\n"
        "print([str(w.message) for w in caught])\n"
    )
    result = _run(root, code)
    assert result.returncode == 0, result.stderr
    assert "rcl_ops._C did not load" in result.stdout and "reference backend" in result.stdout
