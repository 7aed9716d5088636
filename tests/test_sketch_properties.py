"""Property-based tests (hypothesis) of the sketch API and the loss module (issue 25, point 3):
random options, sketch/residual mixes, queue sizes, several steps and state-dict round trips,
each against the same options on plain residuals. Tiny sizes: the whole file runs in seconds."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rcl_ops  # noqa: E402
from rcl_ops.sketch import Sketch  # noqa: E402

SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PAIRWISE = {"emd": rcl_ops.pairwise_emd, "bd": rcl_ops.pairwise_bd, "mmd": rcl_ops.pairwise_mmd}
# The options that shape each distance's sketch (the others apply when pairing).
SKETCH_OPTIONS = {"emd": ("num_quantiles",), "bd": (), "mmd": ("value_range", "num_bins")}


@st.composite
def distance_options(draw) -> tuple[str, dict]:
    """A distance and a random combination of its options (MMD: on a fixed grid)."""
    distance = draw(st.sampled_from(sorted(PAIRWISE)))
    if distance == "emd":
        return distance, {"num_quantiles": draw(st.sampled_from([None, 1, 3, 8]))}
    if distance == "bd":
        return distance, {"eps": draw(st.sampled_from([1e-6, 0.1, 2.0]))}
    return distance, {
        "value_range": draw(st.sampled_from([(-4.0, 4.0), (-1.0, 2.5)])),
        "num_bins": draw(st.sampled_from([2, 17, 64])),
        "bandwidth": draw(st.sampled_from([None, 0.5, (0.3, 2.0)])),
        "unbiased": draw(st.booleans()),
    }


def _batch(generator: torch.Generator, rows: int, count: int) -> torch.Tensor:
    return torch.randn(rows, count, generator=generator, dtype=torch.float64)


def _sketch(distance: str, x: torch.Tensor, options: dict) -> Sketch:
    shaping = {key: options[key] for key in SKETCH_OPTIONS[distance]}
    return getattr(rcl_ops, f"{distance}_sketch")(x, **shaping)


@SETTINGS
@given(
    config=distance_options(),
    mix=st.sampled_from(["both", "q", "k"]),
    sizes=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 12), st.integers(2, 12)),
    seed=st.integers(0, 2**31 - 1),
)
def test_sketches_pair_as_the_residuals_do(config, mix, sizes, seed):
    distance, options = config
    bq, bk, mq, mk = sizes
    if distance == "emd" and options["num_quantiles"] is None:
        mk = mq  # exact EMD: equal counts
    generator = torch.Generator().manual_seed(seed)
    q, k = _batch(generator, bq, mq), _batch(generator, bk, mk)
    want = PAIRWISE[distance](q, k, **options)
    a = _sketch(distance, q, options) if mix in ("both", "q") else q
    b = _sketch(distance, k, options) if mix in ("both", "k") else k
    pairing = {key: value for key, value in options.items() if key not in SKETCH_OPTIONS[distance]}
    torch.testing.assert_close(PAIRWISE[distance](a, b, **pairing), want, rtol=1e-12, atol=1e-14)
    # The sketch's own options may be repeated; other ones are refused, never ignored.
    torch.testing.assert_close(PAIRWISE[distance](a, b, **options), want, rtol=1e-12, atol=1e-14)
    if distance == "emd":
        with pytest.raises(ValueError, match="num_quantiles=9 but"):
            rcl_ops.pairwise_emd(a, b, num_quantiles=9)
    if distance == "mmd":
        with pytest.raises(ValueError, match="num_bins=3 but"):
            rcl_ops.pairwise_mmd(a, b, **{**pairing, "num_bins": 3})


def _plain_loss(loss_fn: rcl_ops.ResidualContrastiveLoss, q, keys, options: dict) -> torch.Tensor:
    """The loss of q against ``keys`` (this step's keys, then the queued ones) computed on plain
    residuals with the same options (MMD: the bandwidth the loss takes, pooled over q and k)."""
    options = dict(options)
    if loss_fn.distance_name == "mmd" and options["bandwidth"] is None:
        options["bandwidth"] = rcl_ops.default_bandwidth(q, keys[: len(q)]).item()
    distances = PAIRWISE[loss_fn.distance_name](q, keys, **options)
    return rcl_ops.residual_contrastive_loss(distances, loss_fn.temperature, reduction=loss_fn.reduction)


@SETTINGS
@given(
    config=distance_options(),
    queue_size=st.integers(1, 7),
    gather=st.booleans(),
    loss_options=st.tuples(st.sampled_from([0.05, 0.3, 1.0]), st.sampled_from(["mean", "sum", "none"])),
    batches=st.lists(st.integers(2, 4), min_size=1, max_size=3),
    count=st.integers(2, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_loss_with_a_queue_is_the_loss_on_plain_residuals(
    config, queue_size, gather, loss_options, batches, count, seed
):
    distance, options = config
    temperature, reduction = loss_options
    make = lambda: rcl_ops.ResidualContrastiveLoss(  # noqa: E731
        distance,
        temperature=temperature,
        reduction=reduction,
        gather_distributed=gather,
        queue_size=queue_size,
        **options,
    )
    loss_fn = make()
    generator = torch.Generator().manual_seed(seed)
    queued: list[torch.Tensor] = []  # the keys of earlier steps, one row each, oldest first
    for rows in batches:
        q, k = _batch(generator, rows, count), _batch(generator, rows, count)
        keys = torch.cat([k, *(row[None] for row in queued[-queue_size:])])
        want = _plain_loss(loss_fn, q, keys, options)
        torch.testing.assert_close(loss_fn(q, k), want, rtol=1e-9, atol=1e-12)
        queued.extend(k.unbind(0))
    assert len(loss_fn.queue) == min(queue_size, len(queued))
    want_queue = _sketch(distance, torch.stack(queued[-queue_size:]), options)
    torch.testing.assert_close(loss_fn.queue.values, want_queue.values)
    restored = make()
    restored.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(restored.queue.values, loss_fn.queue.values)
    q, k = _batch(generator, 2, count), _batch(generator, 2, count)
    torch.testing.assert_close(restored.eval()(q, k), loss_fn.eval()(q, k))
    assert len(restored.queue) == len(loss_fn.queue)  # eval mode does not enqueue
