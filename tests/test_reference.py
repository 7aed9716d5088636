"""The reference backend against independent formulas (and in float32 against the float64 oracles of
tests/utils.py), and the loss against InfoNCE."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance
from utils import as_numpy, assert_close_to_oracle, bd_oracle, relative_error

import rcl_ops
from rcl_ops import reference


def _residuals(bq=3, bk=4, shape=(2, 5, 6), dtype=torch.float64):
    q = torch.randn(bq, *shape, dtype=dtype)
    k = 1.5 * torch.randn(bk, *shape, dtype=dtype) + 0.2
    return q, k


def _mmd_double_sum(x: np.ndarray, y: np.ndarray, bandwidths, unbiased: bool) -> float:
    def kernel_mean(a, b, drop_diagonal):
        diff = a[:, None] - b[None, :]
        kern = sum(np.exp(-(diff**2) / (2 * h * h)) for h in bandwidths)
        if drop_diagonal:
            return (kern.sum() - np.trace(kern)) / (a.size * (a.size - 1))
        return kern.mean()

    return kernel_mean(x, x, unbiased) + kernel_mean(y, y, unbiased) - 2 * kernel_mean(x, y, False)


def _bd_closed_form(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    a, b = x.var(ddof=1) + eps, y.var(ddof=1) + eps
    return 0.25 * np.log(0.25 * (a / b + b / a + 2)) + 0.25 * (x.mean() - y.mean()) ** 2 / (a + b)


def test_emd_matches_scipy():
    q, k = _residuals()
    got = rcl_ops.pairwise_emd(q, k, backend="reference")
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            expected = wasserstein_distance(q[i].flatten().numpy(), k[j].flatten().numpy())
            assert got[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_emd_quantiles_approach_scipy_for_unequal_counts():
    q = torch.randn(2, 3000, dtype=torch.float64)
    k = torch.randn(3, 1700, dtype=torch.float64) * 2
    got = rcl_ops.pairwise_emd(q, k, num_quantiles=2000, backend="reference")
    for i in range(2):
        for j in range(3):
            expected = wasserstein_distance(q[i].numpy(), k[j].numpy())
            assert got[i, j].item() == pytest.approx(expected, rel=2e-2)


def test_emd_with_all_quantiles_is_exact():
    q, k = _residuals()
    exact = rcl_ops.pairwise_emd(q, k, backend="reference")
    with_k = rcl_ops.pairwise_emd(q, k, num_quantiles=q[0].numel(), backend="reference")
    torch.testing.assert_close(with_k, exact)


def test_quantile_positions_interpolate_order_statistics():
    values = torch.arange(10, dtype=torch.float64).reshape(1, 10)  # quantile function: t * 10 - 0.5
    got = reference.sorted_quantiles(values, 4)
    torch.testing.assert_close(got, torch.tensor([[0.75, 3.25, 5.75, 8.25]], dtype=torch.float64))


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("bandwidth", [0.7, [0.3, 2.0]])
def test_mmd_matches_double_sum(unbiased, bandwidth):
    q, k = _residuals(shape=(3, 7))
    got = rcl_ops.pairwise_mmd(q, k, bandwidth=bandwidth, unbiased=unbiased, backend="reference")
    hs = bandwidth if isinstance(bandwidth, list) else [bandwidth]
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            expected = _mmd_double_sum(q[i].flatten().numpy(), k[j].flatten().numpy(), hs, unbiased)
            assert got[i, j].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_mmd_chunking_matches_unchunked(monkeypatch):
    q, k = _residuals(shape=(40,))
    whole = rcl_ops.pairwise_mmd(q, k, bandwidth=0.5, backend="reference")
    monkeypatch.setattr(reference, "_MMD_CHUNK_ELEMENTS", 64)
    torch.testing.assert_close(rcl_ops.pairwise_mmd(q, k, bandwidth=0.5, backend="reference"), whole)


def test_mmd_default_bandwidth_is_pooled_std():
    q, k = _residuals()
    pooled = torch.cat([q.flatten(), k.flatten()]).std(correction=0)
    torch.testing.assert_close(rcl_ops.default_bandwidth(q.flatten(1), k.flatten(1)), pooled.reshape(1))
    torch.testing.assert_close(
        rcl_ops.pairwise_mmd(q, k, backend="reference"),
        rcl_ops.pairwise_mmd(q, k, bandwidth=pooled.item(), backend="reference"),
    )
    constant = torch.ones(2, 5, dtype=torch.float64)
    assert rcl_ops.default_bandwidth(constant, constant).item() == 1.0


def test_bd_matches_closed_form():
    q, k = _residuals()
    got = rcl_ops.pairwise_bd(q, k, eps=1e-6, backend="reference")
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            expected = _bd_closed_form(q[i].flatten().numpy(), k[j].flatten().numpy(), 1e-6)
            assert got[i, j].item() == pytest.approx(expected, rel=1e-12)


def test_reference_is_float64_accurate_in_float32():
    # BD near equal variances (the log term ~1e-20: 7 digits lost by ln(1/4 (a/b + b/a + 2)))
    # and EMD over a million values (float32 cdist: 1e-3 off at M = 4e6).
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4096, generator=generator, dtype=torch.float64)
    q, k = x.float(), (x * (1 + 1e-9)).float()
    assert_close_to_oracle(
        rcl_ops.pairwise_bd(q, k, backend="reference"), bd_oracle(as_numpy(q), as_numpy(k), 1e-6), torch.float32
    )
    big_q = torch.randn(2, 1 << 20, generator=generator)
    big_k = 0.5 * torch.randn(2, 1 << 20, generator=generator) + 3.0
    want = np.abs(np.sort(as_numpy(big_q), axis=1)[:, None] - np.sort(as_numpy(big_k), axis=1)[None]).mean(axis=2)
    assert relative_error(rcl_ops.pairwise_emd(big_q, big_k, backend="reference"), want) < 1e-6


def test_distances_vanish_on_identical_inputs():
    q, _ = _residuals()
    for fn in (rcl_ops.pairwise_emd, rcl_ops.pairwise_bd, rcl_ops.pairwise_mmd):
        d = fn(q, q, backend="reference").diagonal()
        torch.testing.assert_close(d, torch.zeros_like(d), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "fn, kwargs",
    [
        (rcl_ops.pairwise_emd, {}),
        (rcl_ops.pairwise_emd, {"num_quantiles": 7}),
        (rcl_ops.pairwise_mmd, {"bandwidth": 0.8}),
        (rcl_ops.pairwise_mmd, {"bandwidth": [0.5, 1.5], "unbiased": True}),
        (rcl_ops.pairwise_bd, {}),
    ],
)
def test_reference_gradcheck(fn, kwargs):
    q, k = _residuals(bq=2, bk=3, shape=(3, 4))
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, backend="reference", **kwargs), (q, k))


def _hand_written_info_nce(distances, temperature):
    logits = -distances / temperature
    losses = [-(logits[i, i] - torch.logsumexp(logits[i], dim=0)) for i in range(distances.shape[0])]
    return torch.stack(losses)


@pytest.mark.parametrize("distance", ["emd", "mmd", "bd"])
def test_loss_matches_hand_written_info_nce(distance):
    q, k = _residuals(bq=4, bk=4)
    loss = rcl_ops.ResidualContrastiveLoss(distance, temperature=0.3, backend="reference")
    d = getattr(rcl_ops, f"pairwise_{distance}")(q, k, backend="reference")
    per_pair = _hand_written_info_nce(d, 0.3)
    torch.testing.assert_close(loss(q, k), per_pair.mean())
    sym = rcl_ops.ResidualContrastiveLoss(distance, temperature=0.3, symmetric=True, reduction="sum")
    expected = 0.5 * (per_pair + _hand_written_info_nce(d.t(), 0.3)).sum()
    torch.testing.assert_close(sym(q, k), expected)
    none = rcl_ops.ResidualContrastiveLoss(distance, temperature=0.3, reduction="none", backend="reference")
    torch.testing.assert_close(none(q, k), per_pair)


def test_loss_gradcheck_and_callable_distance():
    q, k = _residuals(bq=3, bk=3, shape=(4, 3))
    q.requires_grad_(True)
    k.requires_grad_(True)
    loss = rcl_ops.ResidualContrastiveLoss("emd", temperature=0.5, symmetric=True, backend="reference")
    assert torch.autograd.gradcheck(loss, (q, k))

    def l2_of_means(a, b):
        return (a.flatten(1).mean(1)[:, None] - b.flatten(1).mean(1)[None, :]).square()

    custom = rcl_ops.ResidualContrastiveLoss(l2_of_means, temperature=0.5)
    expected = F.cross_entropy(-l2_of_means(q, k) / 0.5, torch.arange(3))
    torch.testing.assert_close(custom(q, k), expected)


def test_half_inputs_compute_in_float32():
    q, k = _residuals(dtype=torch.float32)
    expected = rcl_ops.pairwise_emd(q, k, backend="reference")
    for dtype in (torch.float16, torch.bfloat16):
        got = rcl_ops.pairwise_emd(q.to(dtype), k.to(dtype), backend="reference")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
