"""Pre-training diagnostics (issue 14): retrieval accuracy, the gradient norm ratio, the history summary."""

from __future__ import annotations

import math

import pytest
import torch


def test_retrieval_accuracy_on_a_hand_made_distance_matrix():
    from rcl_ops.train.diagnostics import retrieval_accuracy

    distances = torch.tensor(
        [
            [0.1, 0.5, 0.9],  # positive nearest: hit
            [0.2, 0.3, 0.4],  # a negative (0.2) nearer: miss
            [0.7, 0.8, 0.7],  # a tie with a negative counts as a miss
        ]
    )
    assert retrieval_accuracy(distances) == pytest.approx(1 / 3)
    assert retrieval_accuracy(torch.eye(4)) == 0.0  # positives farthest
    assert retrieval_accuracy(1 - torch.eye(4)) == 1.0
    with pytest.raises(ValueError, match=r"\(B, B\)"):
        retrieval_accuracy(torch.zeros(2, 3))


def test_gradient_norm_ratio_matches_direct_autograd():
    from rcl_ops.train.diagnostics import gradient_norm_ratio

    torch.manual_seed(0)
    layer, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)
    x = torch.rand(5, 3)
    a = 3.0 * layer(x).square().sum() + other(x).sum()  # `other` reaches only a: not a shared parameter
    b = layer(x).abs().mean()
    found = gradient_norm_ratio(a, b, [*layer.parameters(), *other.parameters()])
    grads_a = torch.autograd.grad(a, list(layer.parameters()), retain_graph=True)
    grads_b = torch.autograd.grad(b, list(layer.parameters()), retain_graph=True)
    norm_a = torch.cat([g.flatten() for g in grads_a]).norm().item()
    norm_b = torch.cat([g.flatten() for g in grads_b]).norm().item()
    assert found["grad_norm_contrast"] == pytest.approx(norm_a, rel=1e-6)
    assert found["grad_norm_consistency"] == pytest.approx(norm_b, rel=1e-6)
    assert found["grad_norm_ratio"] == pytest.approx(norm_a / norm_b, rel=1e-6)
    (a + b).backward()  # the graph is kept for the training step
    assert layer.weight.grad is not None


def test_history_summary_flags_a_contrastive_loss_at_chance():
    from rcl_ops.train.diagnostics import summarise_history

    chance = math.log(8)
    stuck = [
        {
            "step": s,
            "contrast_per_query": v,
            "contrast_chance": chance,
            "retrieval_top1": 0.125,
            "grad_norm_ratio": 0.001,
        }
        for s, v in ((1, 2.0), (2, 1.0), (3, 2.05), (4, 2.07))
    ]
    summary = summarise_history(stuck)
    assert summary["at_chance"] and summary["contrast_per_query_end"] == pytest.approx(2.07)
    assert summary["grad_norm_ratio_first"] == 1e-3 and summary["logged_steps"] == 4
    learning = [{**row, "contrast_per_query": 0.3} for row in stuck]
    assert not summarise_history(learning)["at_chance"]
    assert summarise_history([]) == {}
