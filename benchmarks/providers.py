"""Competitors, each a function (q, k) -> (Bq, Bk) distance matrix on (B, ...) residuals.

- ``rcl_ops[<backend>]``: the library, per loaded backend;
- ``reference``: the library's pure-PyTorch oracle (rcl_ops.reference, not a copy);
- ``naive``: what a user would write by hand: EMD as cdist of sorted values, BD from torch
  moments, MMD as the direct kernel sum on m = 1024 subsampled values per residual;
- ``reference+compile``: torch.compile of the reference (EMD, BD; the reference MMD's chunk
  loop is not worth compiling);
- ``rcl_ops[cuda]+graph`` (CUDA only): the same calls replayed from CUDA graphs
  (torch.cuda.make_graphed_callables, forward and backward captured once per input shape):
  the step's device time without the host's per-launch cost, which is how a user who
  graph-captures the training step runs it;
- ``rcl_ops[cuda]+compile`` (loss steps, CUDA only): torch.compile(mode="reduce-overhead",
  fullgraph=True) of the loss, the compiler's way to the same graph replay;
- peers, when installed (``pip install .[bench]``; never required by the library):
  ``pot`` (ot.wasserstein_1d, torch backend, expanded to all Bq x Bk pairs as its users
  must), ``geomloss`` (SamplesLoss("gaussian"), tensorized, all pairs expanded),
  ``geomloss[keops]`` (the same with backend="online": KeOps computes the kernel on the fly,
  in linear memory; listed when pykeops is installed, and marked unavailable, with the
  reason, when it does not compile and run a tiny case), and ``scipy``
  (scipy.stats.wasserstein_distance per pair; forward only, no gradient).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch

import rcl_ops
from rcl_ops import reference

# KeOps prints its notes (no CUDA here, compiling a formula) to stdout, into the table; it is
# imported by geomloss[keops], and also by GeomLoss and POT (through GeomLoss) when installed.
# Read at import: KEOPS_VERBOSE=1 PYKEOPS_VERBOSE=1 show them.
os.environ.setdefault("KEOPS_VERBOSE", "0")
os.environ.setdefault("PYKEOPS_VERBOSE", "0")

DISTANCES = ("emd", "mmd", "bd")
NAIVE_MMD_SUBSAMPLE = 1024


def naive_emd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    sq = torch.sort(q.flatten(1), dim=1).values
    sk = torch.sort(k.flatten(1), dim=1).values
    return torch.cdist(sq, sk, p=1) / sq.shape[1]


def naive_bd(q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    var_q, mean_q = torch.var_mean(q.flatten(1), dim=1)
    var_k, mean_k = torch.var_mean(k.flatten(1), dim=1)
    a, b = var_q[:, None] + eps, var_k[None, :] + eps
    return 0.25 * torch.log(0.25 * (a / b + b / a + 2)) + 0.25 * (mean_q[:, None] - mean_k[None, :]) ** 2 / (a + b)


def naive_mmd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Direct Gaussian MMD^2 (pooled-std bandwidth) on a random subsample of m values per residual."""
    x, y = q.flatten(1), k.flatten(1)
    m = min(NAIVE_MMD_SUBSAMPLE, x.shape[1], y.shape[1])
    x = x[:, torch.randperm(x.shape[1], device=x.device)[:m]]
    y = y[:, torch.randperm(y.shape[1], device=y.device)[:m]]
    h = rcl_ops.default_bandwidth(x, y)
    return reference.pairwise_mmd(x, y, h)


def _reference(distance: str) -> Callable:
    fn = getattr(rcl_ops, f"pairwise_{distance}")
    return lambda q, k: fn(q, k, backend="reference")


def _library(distance: str, backend: str) -> Callable:
    fn = getattr(rcl_ops, f"pairwise_{distance}")
    return lambda q, k: fn(q, k, backend=backend)


def library_backends(device: str) -> list[str]:
    """The rcl_ops backends worth timing on ``device`` (not Triton's CPU interpreter)."""
    return [
        b for b in rcl_ops.available_backends(device) if b != "reference" and not (b == "triton" and device == "cpu")
    ]


def pot_emd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """POT's 1-D Wasserstein on every (i, j) pair: columns of (M, Bq * Bk) expanded inputs."""
    import ot

    x, y = q.flatten(1), k.flatten(1)
    bq, bk = x.shape[0], y.shape[0]
    u = x.t().repeat_interleave(bk, dim=1)  # (M, Bq * Bk): column i * Bk + j is q[i]
    v = y.t().repeat(1, bq)  # column i * Bk + j is k[j]
    return ot.wasserstein_1d(u, v, p=1).reshape(bq, bk)


def geomloss_mmd(q: torch.Tensor, k: torch.Tensor, backend: str = "tensorized") -> torch.Tensor:
    """GeomLoss's Gaussian-kernel MMD on every pair, expanded to (Bq Bk, M, 1): ``tensorized``
    (dense (M, M) kernel matrices per pair) or ``online`` (KeOps, kernel computed on the fly)."""
    from geomloss import SamplesLoss

    x, y = q.flatten(1), k.flatten(1)
    bq, bk = x.shape[0], y.shape[0]
    h = rcl_ops.default_bandwidth(x, y).item()
    loss = SamplesLoss("gaussian", blur=h, backend=backend)
    a = x.repeat_interleave(bk, dim=0)[..., None]
    b = y.repeat(bq, 1)[..., None]
    return loss(a, b).reshape(bq, bk)


def geomloss_keops_mmd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """GeomLoss's MMD with its KeOps ("online") backend; see keops_unavailable_reason."""
    return geomloss_mmd(q, k, backend="online")


def _geomloss_sees_keops() -> bool:
    """GeomLoss imports pykeops itself and, if that fails, silently runs "online" on dense tensors."""
    for name in ("geomloss._legacy.kernel_samples", "geomloss.kernel_samples"):  # GeomLoss 0.3, 0.2
        try:
            return bool(getattr(importlib.import_module(name), "keops_available", True))
        except ImportError:
            continue
    return True  # an unknown layout: the probe's run is the only check


@functools.cache
def keops_unavailable_reason(device: str = "cpu") -> str | None:
    """None when geomloss[keops] works on ``device``, else why not (cached per process).

    Imports pykeops and runs the provider once on a tiny float32 case, forward and backward,
    against the tensorized backend: this compiles (g++ or nvcc, once per machine, into KeOps's
    cache under ~/.cache/keops*, see pykeops.get_build_folder()) the formulas the provider then
    uses, so no compile is timed.
    """
    try:
        import pykeops.torch  # noqa: F401

        if not _geomloss_sees_keops():
            return "geomloss could not import pykeops"
        q = torch.tensor([[0.1, -0.4, 1.2, 0.3], [0.5, 0.0, -0.8, 0.9]], device=device, requires_grad=True)
        k = torch.tensor([[0.2, 0.7, -1.1, 0.0], [1.0, -0.3, 0.4, 0.6]], device=device, requires_grad=True)
        got = geomloss_keops_mmd(q, k)
        got_grads = torch.autograd.grad(got.sum(), (q, k))
        want = geomloss_mmd(q, k)
        want_grads = torch.autograd.grad(want.sum(), (q, k))
        for a, b in zip((got, *got_grads), (want, *want_grads)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    except Exception as err:  # a missing compiler, a failed build or load, a wrong value
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        return f"pykeops probe failed: {type(err).__name__}" + (f": {detail}" if detail else "")
    return None


def unavailable(reason: str) -> Callable:
    """A provider that is listed but cannot run here; run.measure reports the reason."""

    def fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(reason)

    fn.unavailable = reason
    return fn


def scipy_emd(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """scipy.stats.wasserstein_distance for each pair, in a Python loop (no gradient)."""
    from scipy.stats import wasserstein_distance

    x, y = q.detach().flatten(1).cpu().numpy(), k.detach().flatten(1).cpu().numpy()
    out = [[wasserstein_distance(a, b) for b in y] for a in x]
    return torch.tensor(out, dtype=q.dtype)


scipy_emd.forward_only = True


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def compiles_on_first_call(fn: Callable) -> Callable:
    """Mark fn as compiling on its first call, so that call's time does not make the benchmark
    take it for a slow provider and cut its warm-up short (benchmarks.run.time_step)."""
    fn.compiles_on_first_call = True
    return fn


def _compiled_reference(distance: str) -> Callable:
    compiled = torch.compile(getattr(reference, f"pairwise_{distance}"))
    extra = {"emd": (None,), "bd": (1e-6,)}[distance]
    return compiles_on_first_call(lambda q, k: compiled(q.flatten(1), k.flatten(1), *extra))


def cuda_graphed(fn: Callable) -> Callable:
    """fn(q, k) replayed from CUDA graphs of its forward and backward, captured on the first
    call for each input shape and dtype (q and k must require grad, as in the benchmarks)."""
    graphs: dict[tuple, Callable] = {}

    def run(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        key = (tuple(q.shape), tuple(k.shape), q.dtype, k.dtype)
        if key not in graphs:
            samples = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in (q, k))
            graphs[key] = torch.cuda.make_graphed_callables(fn, samples)
        return graphs[key](q, k)

    return run


GRAPHED_BACKEND = "cuda"


def providers(distance: str, device: str) -> dict[str, Callable]:
    """Name -> callable for every competitor that runs on ``device``."""
    found = {f"rcl_ops[{b}]": _library(distance, b) for b in library_backends(device)}
    if device == "cuda" and f"rcl_ops[{GRAPHED_BACKEND}]" in found:
        found[f"rcl_ops[{GRAPHED_BACKEND}]+graph"] = cuda_graphed(_library(distance, GRAPHED_BACKEND))
    found["reference"] = _reference(distance)
    if distance != "mmd":
        found["reference+compile"] = _compiled_reference(distance)
    found["naive"] = {"emd": naive_emd, "mmd": naive_mmd, "bd": naive_bd}[distance]
    if distance == "emd":
        found["pot"] = pot_emd if _installed("ot") else unavailable(NOT_INSTALLED.format("POT"))
    if distance == "emd" and device == "cpu" and _installed("scipy"):
        found["scipy"] = scipy_emd
    if distance == "mmd":
        found["geomloss"] = geomloss_mmd if _installed("geomloss") else unavailable(NOT_INSTALLED.format("GeomLoss"))
        if not (_installed("geomloss") and _installed("pykeops")):
            found["geomloss[keops]"] = unavailable(NOT_INSTALLED.format("GeomLoss or pykeops"))
        else:
            reason = keops_unavailable_reason(device)
            found["geomloss[keops]"] = unavailable(reason) if reason else geomloss_keops_mmd
    return found


NOT_INSTALLED = "{} is not installed here (pip install .[bench]); skipped"


def loss_providers(distance: str, device: str) -> dict[str, Callable]:
    """Name -> callable (q, k) -> scalar loss: the whole ResidualContrastiveLoss step."""
    found = {}
    for backend in [*library_backends(device), "reference"]:
        name = "reference" if backend == "reference" else f"rcl_ops[{backend}]"
        found[name] = rcl_ops.ResidualContrastiveLoss(distance, backend=backend)
        if device == "cuda" and backend == GRAPHED_BACKEND:
            found[f"{name}+graph"] = cuda_graphed(found[name])
            found[f"{name}+compile"] = reduce_overhead_compiled(found[name])
    return found


def reduce_overhead_compiled(loss_fn: torch.nn.Module) -> Callable:
    """torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True): inductor's graph of the step
    replayed from CUDA graph trees (recorded on a later call; the benchmark's warm-up covers it)."""
    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    return compiles_on_first_call(lambda q, k: compiled(q, k))


def kernel_evaluations(distance: str, batch: int, values: int) -> float:
    """Pairwise element operations of the direct O(B^2 M^2) MMD, used to cap slow providers."""
    return float(batch) ** 2 * float(values) ** 2 if distance == "mmd" else float(batch) ** 2 * values


# Providers whose cost is the direct all-pairs sum, and so are capped (or extrapolated).
DIRECT_SUM_PROVIDERS = ("reference", "naive", "geomloss", "geomloss[keops]")
# Providers that expand the inputs to all Bq x Bk pairs (Bq Bk M values, sorted with int64
# indices and kept for backward): skipped beyond this many expanded values.
EXPANDING_PROVIDERS = ("pot",)
EXPANDED_VALUES_CAP = 1 << 27
