"""The probes of issue 25 (the library's part): each failed on the code before the fix, grouped as
the issue groups them (silent wrong results, documented promises broken, unclear errors), then
the shared validation layer of the options (what must be true, point 2)."""

from __future__ import annotations

import inspect
import os
import re
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from utils import NATIVE_BACKENDS

import rcl_ops
from rcl_ops import _checks
from rcl_ops.sketch import Sketch


def _pair(dtype=torch.float64, bq=3, bk=4, m=12, requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(bq, m, generator=generator, dtype=torch.float64).to(dtype)
    k = (1.3 * torch.randn(bk, m, generator=generator, dtype=torch.float64) + 0.2).to(dtype)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


@pytest.fixture
def check_finite_off():
    rcl_ops.set_check_finite(False)
    yield
    rcl_ops.set_check_finite(None)


def _gradient_penalty_backward(distance_fn) -> None:
    """A loss plus a penalty on its own input gradient, backward: needs the second derivative."""
    q, k = _pair(requires_grad=True)
    loss = distance_fn(q, k).sum()
    (grad_q,) = torch.autograd.grad(loss, q, create_graph=True)
    (loss + grad_q.square().sum()).backward()


# ---- silent wrong results --------------------------------------------------------------------


class TestSilentWrongResults:
    def test_reference_mmd_gradient_penalty_raises(self):
        # grad(D.sum()) has a constant incoming gradient: once_differentiable let it through as a
        # constant, so the penalty contributed nothing.
        with pytest.raises(RuntimeError, match="second derivative.*not implemented"):
            _gradient_penalty_backward(lambda q, k: rcl_ops.pairwise_mmd(q, k, bandwidth=1.0, backend="reference"))

    def test_grid_mmd_through_sketches_has_no_second_derivative(self):
        # The binning's backward was differentiated as written: 1.8% off finite differences.
        def grid_mmd(q, k):
            return rcl_ops.pairwise_mmd(q, k, value_range=(-5.0, 5.0), num_bins=64, bandwidth=1.0)

        with pytest.raises(RuntimeError, match="second derivative.*not implemented"):
            _gradient_penalty_backward(grid_mmd)

    def test_default_bandwidth_refuses_nan(self):
        q, k = _pair()
        q[1, 3] = float("nan")
        with pytest.raises(ValueError, match="q contains NaN or Inf at batch index 1"):
            rcl_ops.default_bandwidth(q, k)

    def test_default_bandwidth_of_nan_is_nan_without_the_check(self, check_finite_off):
        q, k = _pair()
        q[1, 3] = float("nan")
        assert torch.isnan(rcl_ops.default_bandwidth(q, k)).all()  # was 1.0, a plausible bandwidth

    @pytest.mark.parametrize("scale", [1e-200, 1e200])
    def test_default_bandwidth_beyond_float64_kernels_raises(self, scale):
        # 1e-200: 1 / (2 h^2) overflowed and every MMD came out 0 instead of the scale-free ~0.0124.
        q, k = (x * scale for x in _pair())
        with pytest.raises(ValueError, match=r"default bandwidth .* outside \[1e-154, 1e\+154\]"):
            rcl_ops.pairwise_mmd(q, k)
        with pytest.raises(ValueError, match="default bandwidth"):
            rcl_ops.ResidualContrastiveLoss("mmd", value_range=(-scale, scale), queue_size=4)(q, k)

    def test_default_bandwidth_beyond_float64_kernels_is_nan_without_the_check(self, check_finite_off):
        # No host sync where the check is off: a NaN bandwidth and NaN distances (the fused exact sum
        # evaluates no kernel).
        q, k = (x * 1e-200 for x in _pair())
        assert torch.isnan(rcl_ops.pairwise_mmd(q, k, value_range=(-1e-199, 1e-199))).all()
        for method in ("grid", "direct") if NATIVE_BACKENDS else ():
            assert torch.isnan(rcl_ops.pairwise_mmd(q, k, backend="cpu", method=method)).all()

    @pytest.mark.skipif(not NATIVE_BACKENDS, reason="the native backend is not built")
    @pytest.mark.parametrize("scale", [1e-200, 1e200])
    @pytest.mark.parametrize("size", [12, 600], ids=["fused", "composite"])
    def test_native_exact_mmd_names_a_default_bandwidth_out_of_range(self, scale, size):
        # The exact sum computes the default bandwidth in C++: in one pass (fused) or by ATen ops
        # (composite, beyond the fused size); both leave it for the caller to name.
        q, k = (x * scale for x in _pair(m=size))
        with pytest.raises(ValueError, match=r"default bandwidth .* outside \[1e-154, 1e\+154\]"):
            rcl_ops.pairwise_mmd(q, k, backend="cpu", method="direct")
        rcl_ops.set_check_finite(False)
        try:
            assert torch.isnan(rcl_ops.pairwise_mmd(q, k, backend="cpu", method="direct")).all()
        finally:
            rcl_ops.set_check_finite(None)

    def test_loss_overflowing_its_dtype_raises(self):
        q, k = _pair(torch.float32)
        with pytest.raises(OverflowError, match="temperature 1e-300"):
            rcl_ops.ResidualContrastiveLoss("emd", temperature=1e-300)(q, k)

    def test_functional_loss_refuses_an_empty_matrix(self):
        with pytest.raises(ValueError, match=r"no rows.*\(0, 2\)"):
            rcl_ops.residual_contrastive_loss(torch.zeros(0, 2), 0.1)

    @pytest.mark.parametrize(
        "call",
        [
            lambda: rcl_ops.ResidualContrastiveLoss("emd", symmetric="no"),
            lambda: rcl_ops.ResidualContrastiveLoss("emd", gather_distributed=1),
            lambda: rcl_ops.ResidualContrastiveLoss("mmd", unbiased="no"),
            lambda: rcl_ops.pairwise_mmd(*_pair(), unbiased="no"),
            lambda: rcl_ops.set_check_finite("no"),
            lambda: rcl_ops.residual_contrastive_loss(torch.rand(3, 3), 0.1, symmetric="no"),
        ],
        ids=["loss-symmetric", "loss-gather", "loss-unbiased", "mmd-unbiased", "set_check_finite", "functional"],
    )
    def test_truthy_values_are_not_booleans(self, call):
        with pytest.raises(TypeError, match="must be a bool"):
            call()

    def test_explicit_options_must_agree_with_a_sketch(self):
        q, k = _pair()
        sketch = rcl_ops.emd_sketch(q, num_quantiles=16)
        with pytest.raises(ValueError, match="num_quantiles=32 .* q is an EMD sketch of 16 quantiles"):
            rcl_ops.pairwise_emd(sketch, k, num_quantiles=32)
        with pytest.raises(ValueError, match="num_quantiles=16 .* k is an EMD sketch of 12 quantiles"):
            rcl_ops.pairwise_emd(q, rcl_ops.emd_sketch(k), num_quantiles=16)
        torch.testing.assert_close(rcl_ops.pairwise_emd(sketch, k, num_quantiles=16), rcl_ops.pairwise_emd(sketch, k))
        grid = rcl_ops.mmd_sketch(q, value_range=(-4.0, 4.0), num_bins=256)
        with pytest.raises(ValueError, match=r"value_range=\(-2.0, 2.0\) .* q is an MMD sketch"):
            rcl_ops.pairwise_mmd(grid, k, value_range=(-2.0, 2.0))
        with pytest.raises(ValueError, match="num_bins=128 .* q is an MMD sketch of 256 bins"):
            rcl_ops.pairwise_mmd(grid, k, num_bins=128)
        agreeing = rcl_ops.pairwise_mmd(grid, k, value_range=(-4, 4), num_bins=256, bandwidth=1.0)
        torch.testing.assert_close(agreeing, rcl_ops.pairwise_mmd(grid, k, bandwidth=1.0))

    @pytest.mark.parametrize("device_type", ["cuda:0", "gpu", "", 0])
    def test_check_finite_takes_device_types_only(self, device_type):
        error = TypeError if not isinstance(device_type, str) else ValueError
        with pytest.raises(error, match="device_type"):
            rcl_ops.set_check_finite(True, device_type)
        with pytest.raises(error, match="device_type"):
            rcl_ops.check_finite_enabled(device_type)
        assert rcl_ops.check_finite_enabled("cpu") and not rcl_ops.check_finite_enabled("cuda")

    def test_load_state_dict_refuses_another_queue(self):
        q, k = _pair()
        saved = rcl_ops.ResidualContrastiveLoss("emd", num_quantiles=16, queue_size=8)
        saved(q, k)
        for other, what in [
            (rcl_ops.ResidualContrastiveLoss("emd", num_quantiles=32, queue_size=8), "num_quantiles"),
            (rcl_ops.ResidualContrastiveLoss("emd", queue_size=8), "num_quantiles"),
            (rcl_ops.ResidualContrastiveLoss("emd", num_quantiles=16, queue_size=2), "queue_size 2"),
            (rcl_ops.ResidualContrastiveLoss("emd", num_quantiles=16), "queue_size 0"),
        ]:
            with pytest.raises(ValueError, match=what):
                other.load_state_dict(saved.state_dict())
        grid = rcl_ops.ResidualContrastiveLoss("mmd", value_range=(-3, 3), num_bins=64, queue_size=8)
        grid(q, k)
        with pytest.raises(ValueError, match="value_range"):
            rcl_ops.ResidualContrastiveLoss("mmd", value_range=(-2, 2), num_bins=64, queue_size=8).load_state_dict(
                grid.state_dict()
            )
        with pytest.raises(ValueError, match="num_bins"):
            rcl_ops.ResidualContrastiveLoss("mmd", value_range=(-3, 3), queue_size=8).load_state_dict(grid.state_dict())

    @pytest.mark.slow
    def test_gather_distributed_refuses_unequal_batches_on_every_rank(self, two_rank_outcomes):
        for distance in ("emd", "mmd", "bd"):
            for rank in range(2):
                outcome = two_rank_outcomes[rank][f"unequal-{distance}"]
                assert outcome.startswith("ValueError"), (distance, rank, outcome)
                assert "rank 0 passes k of 4 residuals" in outcome and "rank 1 passes k of 3" in outcome


# ---- the gather across two gloo processes (a pattern of tests/test_distributed.py) -----------

# (name, batch size of k per rank, the rank whose k holds an Inf at batch index 2 or None, distance)
GATHER_CASES = [(f"unequal-{d}", (4, 3), None, d) for d in ("emd", "mmd", "bd")] + [
    (f"inf-{d}", (4, 4), 1, d) for d in ("mmd", "emd")
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    outcomes = {}
    for name, sizes, inf_rank, distance in GATHER_CASES:
        q, k = torch.randn(sizes[rank], 12), torch.randn(sizes[rank], 12)
        if inf_rank == rank:
            k[2, 5] = float("inf")
        try:
            rcl_ops.ResidualContrastiveLoss(distance, gather_distributed=True)(q, k)
            outcomes[name] = "returned"
        except Exception as error:  # noqa: BLE001  the outcome is what the test checks
            outcomes[name] = f"{type(error).__name__}: {error}"
    torch.save(outcomes, f"{path}.{rank}")
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without gloo's teardown (tests/test_distributed.py says why)


@pytest.fixture(scope="module")
def two_rank_outcomes(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gather") / "outcomes")
    mp.spawn(_gather_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    return [torch.load(f"{path}.{rank}") for rank in range(2)]


# ---- documented promises broken --------------------------------------------------------------


class TestDocumentedPromises:
    @pytest.mark.parametrize("backend", [*NATIVE_BACKENDS, "triton", "reference"])
    def test_bandwidth_range(self, backend):
        if backend not in rcl_ops.available_backends():
            pytest.skip(f"{backend} not loaded")
        q, k = _pair(m=8)
        method = "direct" if backend == "reference" else "grid"
        # Far beyond the data's range, inside the documented [1e-154, 1e154]: the limit, MMD 0.
        far = rcl_ops.pairwise_mmd(q, k, bandwidth=1e150, method=method, backend=backend)
        assert far.abs().max() < 1e-12
        for bad in (1e200, [1.0, 2e154]):
            with pytest.raises(ValueError, match=r"bandwidth .* outside \[1e-154, 1e\+154\]"):
                rcl_ops.pairwise_mmd(q, k, bandwidth=bad, method=method, backend=backend)

    @pytest.mark.parametrize("num_bins", [1, (1 << 24) + 1, 1 << 61])
    def test_num_bins_range_on_the_sketch_path(self, num_bins):
        q, k = _pair()
        with pytest.raises(ValueError, match=r"num_bins must be an integer in \[2, 16777216\]"):
            rcl_ops.mmd_sketch(q, value_range=(-1, 1), num_bins=num_bins)
        with pytest.raises(ValueError, match=r"num_bins must be an integer in \[2, 16777216\]"):
            rcl_ops.pairwise_mmd(q, k, value_range=(-1, 1), num_bins=num_bins)

    @pytest.mark.parametrize("unbiased", [False, True])
    def test_value_range_with_unequal_value_counts(self, unbiased):
        q, k = torch.randn(3, 192, dtype=torch.float64), torch.randn(4, 64, dtype=torch.float64)
        lo, hi = min(q.min(), k.min()).item(), max(q.max(), k.max()).item()
        options = {"bandwidth": 0.8, "num_bins": 512, "unbiased": unbiased}
        got = rcl_ops.pairwise_mmd(q, k, value_range=(lo, hi), **options)
        want = rcl_ops.pairwise_mmd(q, k, method="grid", **options)  # the grid on the same range
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    @pytest.mark.parametrize(
        ("distance", "options", "dynamic"),
        [("bd", {}, True), ("mmd", {"value_range": (-4.0, 4.0), "num_bins": 128, "queue_size": 8}, False)],
        ids=["bd-dynamic", "mmd-queue-default-bandwidth"],
    )
    def test_compiled_loss_fullgraph(self, distance, options, dynamic):
        # BD failed under dynamic shapes (math.isfinite of a symbolic eps), the MMD queue at
        # bandwidth.tolist(). Two training steps: the second pairs against the queued keys.
        torch._dynamo.reset()
        eager = rcl_ops.ResidualContrastiveLoss(distance, **options)
        loss_fn = rcl_ops.ResidualContrastiveLoss(distance, **options)
        compiled = torch.compile(loss_fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        for step in range(2):
            q, k = _pair(torch.float32, bq=4, bk=4 + step, m=16, requires_grad=True)
            want, got = eager(q, k), compiled(q, k)
            torch.testing.assert_close(got, want)
            for a, b in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
                torch.testing.assert_close(a, b)
        if eager.queue is not None:
            torch.testing.assert_close(loss_fn.queue.values, eager.queue.values)

    def test_value_range_wider_than_float64(self):
        q, k = _pair()
        with pytest.raises(ValueError, match="value_range .* overflows float64"):
            rcl_ops.pairwise_mmd(q, k, value_range=(-1e308, 1e308))


# ---- unclear errors --------------------------------------------------------------------------


class TestUnclearErrors:
    def test_emd_sketch_num_quantiles_bound(self):
        with pytest.raises(ValueError, match=r"num_quantiles must be a positive integer in \[1, 2147483647\]"):
            rcl_ops.emd_sketch(_pair()[0], num_quantiles=2**62)

    @pytest.mark.parametrize("queue_size", [10**30, 2**31])
    def test_queue_size_bound(self, queue_size):
        with pytest.raises(ValueError, match=r"queue_size must be a non-negative integer in \[0, 2147483647\]"):
            rcl_ops.ResidualContrastiveLoss("emd", num_quantiles=4, queue_size=queue_size)

    def test_cat_of_no_sketches(self):
        with pytest.raises(ValueError, match="Sketch.cat needs at least one sketch"):
            Sketch.cat([])

    def test_default_bandwidth_checks_its_inputs(self):
        with pytest.raises(TypeError, match="default_bandwidth: q must be a floating-point tensor"):
            rcl_ops.default_bandwidth(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
        with pytest.raises(TypeError, match="default_bandwidth: k must be a torch.Tensor"):
            rcl_ops.default_bandwidth(torch.ones(2, 3), [[1.0, 3.0]])

    def test_mmd_sketches_of_different_grids(self):
        q, k = _pair()
        a = rcl_ops.mmd_sketch(q, value_range=(-1, 1), num_bins=64)
        b = rcl_ops.mmd_sketch(k, value_range=(-1, 1), num_bins=128)
        with pytest.raises(ValueError, match="cannot combine an MMD sketch of 64 bins"):
            rcl_ops.pairwise_mmd(a, b)

    def test_vmap_with_the_finite_check_on(self):
        q, k = (x.expand(2, *x.shape) for x in _pair())
        with pytest.raises(RuntimeError, match=r"vmap.*set_check_finite\(False"):
            torch.func.vmap(rcl_ops.pairwise_bd)(q, k)
        rcl_ops.set_check_finite(False)
        try:
            torch.testing.assert_close(torch.func.vmap(rcl_ops.pairwise_bd)(q, k)[1], rcl_ops.pairwise_bd(q[1], k[1]))
        finally:
            rcl_ops.set_check_finite(None)

    @pytest.mark.parametrize("distance", ["mmd", "emd", "bd"])
    def test_non_finite_keys_under_gather_distributed(self, distance):
        q, k = _pair()
        k[2, 5] = float("inf")
        with pytest.raises(ValueError, match="k contains NaN or Inf at batch index 2"):
            rcl_ops.ResidualContrastiveLoss(distance, gather_distributed=True)(q, k)

    @pytest.mark.slow
    def test_non_finite_keys_of_one_rank_raise_on_every_rank(self, two_rank_outcomes):
        for distance in ("mmd", "emd"):
            for rank in range(2):
                outcome = two_rank_outcomes[rank][f"inf-{distance}"]
                assert outcome.startswith("ValueError") and "rank 1: k contains NaN or Inf at batch index 2" in outcome


# ---- one validation layer for the options (what must be true, point 2) ------------------------

# Every public callable that takes options, with the parameters that are data, not options.
PUBLIC_CALLABLES = [
    (rcl_ops.pairwise_emd, ("q", "k")),
    (rcl_ops.pairwise_mmd, ("q", "k")),
    (rcl_ops.pairwise_bd, ("q", "k")),
    (rcl_ops.emd_sketch, ("x",)),
    (rcl_ops.mmd_sketch, ("x",)),
    (rcl_ops.bd_sketch, ("x",)),
    (rcl_ops.residual_contrastive_loss, ("distances",)),
    (rcl_ops.ResidualContrastiveLoss.__init__, ("self", "distance", "distance_kwargs")),
    (rcl_ops.set_check_finite, ()),
    (rcl_ops.check_finite_enabled, ()),
    (rcl_ops.select_backend, ("device", "where")),
]


@pytest.mark.parametrize("fn", [fn for fn, _ in PUBLIC_CALLABLES], ids=lambda fn: fn.__qualname__)
def test_every_option_has_one_check_and_valid_defaults(fn):
    data = dict(PUBLIC_CALLABLES)[fn]
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.name in data:
            continue
        assert parameter.name in _checks.OPTIONS, f"{fn.__qualname__}: option {parameter.name!r} has no check"
        if parameter.default is not inspect.Parameter.empty:
            _checks.OPTIONS[parameter.name](parameter.default, parameter.name, "default")


def test_an_option_without_a_check_is_refused_where_it_is_declared():
    with pytest.raises(TypeError, match="no check for option"):

        @_checks.checked_options("q")
        def distance(q, *, new_option=1):
            return q


# Each shared option with a value of the wrong type and one out of its range, through every
# public entry that takes it: the functions, the module, the sketches.
SHARED = {
    "num_quantiles": ([(rcl_ops.pairwise_emd, 2), (rcl_ops.emd_sketch, 1)], 2.0, 0),
    "num_bins": ([(rcl_ops.pairwise_mmd, 2), (rcl_ops.mmd_sketch, 1)], "64", 1 << 25),
    "unbiased": ([(rcl_ops.pairwise_mmd, 2)], "no", None),
    "eps": ([(rcl_ops.pairwise_bd, 2)], "0", float("nan")),
    "bandwidth": ([(rcl_ops.pairwise_mmd, 2)], "1", -1.0),
}
DISTANCE_OF = {"num_quantiles": "emd", "num_bins": "mmd", "unbiased": "mmd", "eps": "bd", "bandwidth": "mmd"}


@pytest.mark.parametrize("option", sorted(SHARED))
def test_shared_options_are_checked_alike_everywhere(option):
    entries, wrong_type, out_of_range = SHARED[option]
    q, k = _pair()
    extra = {"value_range": (-1.0, 1.0)} if option == "num_bins" else {}
    calls = [lambda value, fn=fn, n=n: fn(*(q, k)[:n], **{option: value}, **extra) for fn, n in entries]
    calls.append(lambda value: rcl_ops.ResidualContrastiveLoss(DISTANCE_OF[option], **{option: value}))
    for call in calls:
        with pytest.raises(TypeError, match=f"{option} must be"):
            call(wrong_type)
        if out_of_range is not None:
            with pytest.raises(ValueError, match=f"{option} must be|{option} .* outside"):
                call(out_of_range)


# ---- the README's limits that had no test of their own (what must be true, point 4) ------------


class TestDocumentedLimits:
    def test_unbiased_mmd_needs_two_values_per_residual(self):
        q, k = _pair(m=1)
        for call in (
            lambda: rcl_ops.pairwise_mmd(q, k, unbiased=True),
            lambda: rcl_ops.pairwise_mmd(q, k, unbiased=True, value_range=(-3, 3)),
        ):
            with pytest.raises(ValueError, match="unbiased estimator needs at least 2 values"):
                call()

    def test_bd_sketch_needs_two_values_per_residual(self):
        with pytest.raises(ValueError, match="bd_sketch: the sample variance needs at least 2 values"):
            rcl_ops.bd_sketch(_pair(m=1)[0])

    def test_mmd_sketch_needs_a_value_range(self):
        with pytest.raises(TypeError, match="value_range must be a pair"):
            rcl_ops.mmd_sketch(_pair()[0], value_range=None)

    def test_bd_of_a_constant_residual_without_eps_overflows(self):
        q, k = _pair()
        q[0] = 1.0
        with pytest.raises(OverflowError, match="eps=0"):
            rcl_ops.pairwise_bd(q, k, eps=0.0)

    def test_sketches_of_unequal_counts_concatenate_only_for_emd_quantiles(self):
        a, b = torch.randn(2, 10), torch.randn(3, 20)
        assert len(Sketch.cat([rcl_ops.emd_sketch(a, num_quantiles=4), rcl_ops.emd_sketch(b, num_quantiles=4)])) == 5
        with pytest.raises(ValueError, match=r"cannot combine an MMD sketch .*\(M = 10\) with an MMD sketch"):
            Sketch.cat([rcl_ops.mmd_sketch(x, value_range=(-1, 1), num_bins=8) for x in (a, b)])


def test_every_test_the_readme_limits_name_exists_in_the_file_named():
    """The README's *Limits* paragraph backs each sentence with tests named after their file: each
    one must exist there (a renamed or removed test leaves a promise unbacked)."""
    root = Path(__file__).resolve().parent
    readme = (root.parent / "README.md").read_text()
    limits = readme[readme.index("**Limits, and what happens outside them.**") : readme.index("**Accuracy and")]
    named, current = [], None
    for token in re.findall(r"`(test_\w+(?:\.py)?)`", limits):
        if token.endswith(".py"):
            current = token
        else:
            named.append((current, token))
    assert len(named) > 50
    missing = [(file, name) for file, name in named if f"def {name}(" not in (root / file).read_text()]
    assert not missing, missing
