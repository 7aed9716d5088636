import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; this must be
# set before any @triton.jit function is defined (rcl_ops.triton defines them at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rcl_ops  # noqa: E402

NATIVE_BACKENDS = [name for name in ("cpu", "cuda") if name in rcl_ops.available_backends()]


def backend_device(backend: str) -> str:
    """The device of the tensors a backend runs on in the tests."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def assert_compiled_loss_matches_eager(loss_fn, q, k, compile_backend="inductor"):
    """torch.compile(fullgraph=True) of the loss gives the eager value and input gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    eager = loss_fn(q, k)
    eager_grads = torch.autograd.grad(eager, (q, k))
    got = compiled(q, k)
    got_grads = torch.autograd.grad(got, (q, k))
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs CUDA kernels or compiled Triton (`make gpu-check` runs only these)")


def pytest_collection_modifyitems(config, items):
    """Mark as "gpu" every test parametrised with a "cuda" backend or device."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "cuda" in [v for v in callspec.params.values() if isinstance(v, str)]:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
