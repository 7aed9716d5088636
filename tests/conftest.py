import os
import tempfile

import torch

# A fresh torch.compile cache per test session: a cache left by an earlier build of the
# extension can replay a backward graph that calls an op with its old schema.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="rcl_ops-inductor-"))

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; this must be
# set before any @triton.jit function is defined (rcl_ops.triton defines them at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Shared helpers live in tests/utils.py.


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs CUDA kernels or compiled Triton (`make gpu-check` runs only these)")
    config.addinivalue_line(
        "markers",
        "slow: trains a network end to end, runs a whole experiment or spawns processes "
        '(`pytest -m "not slow"` leaves these out)',
    )


def pytest_collection_modifyitems(config, items):
    """Mark as "gpu" every test parametrised with a "cuda" backend or device, or with the
    "triton" backend (compiled kernels on a GPU machine, the interpreter elsewhere)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        values = [v for v in callspec.params.values() if isinstance(v, str)] if callspec is not None else []
        if "cuda" in values or "triton" in values:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
