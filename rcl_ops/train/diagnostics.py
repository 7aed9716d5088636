"""Pre-training diagnostics of RCL: is the contrastive term learning anything, and does it steer the network?

- ``retrieval_accuracy``: share of queries whose positive is strictly the nearest key (chance 1 / B).
- ``contrastive_chance``: the InfoNCE loss per query of a network that cannot tell the keys apart, ln B.
- ``gradient_norm_ratio``: ||grad alpha L_contrast|| / ||grad L_consistency|| at the parameters both
  terms reach, i.e. how much of each update the contrastive term contributes.
- ``summarise_history``: start/end values of the logged diagnostics and whether the contrastive loss
  ends at chance.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

import torch

# The contrastive loss "sits at chance" when its mean over the last quarter of the logged steps is at
# least this share of ln B: the keys are then nearly indistinguishable to the network.
AT_CHANCE_SHARE = 0.95


def retrieval_accuracy(distances: torch.Tensor) -> float:
    """Share of rows i of a (B, B) distance matrix whose diagonal entry is strictly the row's smallest
    (the positive is retrieved first; a tie counts as a miss)."""
    if distances.dim() != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"retrieval_accuracy: expected a (B, B) matrix, got shape {tuple(distances.shape)}")
    batch = distances.shape[0]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=distances.device)
    nearest_negative = distances.masked_fill(~off_diagonal, math.inf).min(dim=1).values
    return float((distances.diagonal() < nearest_negative).float().mean())


def contrastive_chance(batch_size: int) -> float:
    """InfoNCE loss per query when all B logits are equal: ln B."""
    return math.log(batch_size)


def gradient_norm_ratio(
    numerator: torch.Tensor, denominator: torch.Tensor, parameters: Iterable[torch.nn.Parameter]
) -> dict[str, float]:
    """L2 norms of the gradients of two scalar terms at the parameters that both reach, and their ratio
    (numerator / denominator; inf when the denominator's gradient is zero). The graph is kept, so the
    caller can still back-propagate the total loss."""
    parameters = [p for p in parameters if p.requires_grad]
    grads_a = torch.autograd.grad(numerator, parameters, retain_graph=True, allow_unused=True)
    grads_b = torch.autograd.grad(denominator, parameters, retain_graph=True, allow_unused=True)
    shared = [(a, b) for a, b in zip(grads_a, grads_b) if a is not None and b is not None]
    norm_a = math.sqrt(sum(float(a.double().square().sum()) for a, _ in shared))
    norm_b = math.sqrt(sum(float(b.double().square().sum()) for _, b in shared))
    ratio = norm_a / norm_b if norm_b > 0 else math.inf
    return {"grad_norm_contrast": norm_a, "grad_norm_consistency": norm_b, "grad_norm_ratio": ratio}


def summarise_history(history: list[dict]) -> dict:
    """From the logged rows ({"step", metric: value, ...}) of one pre-training run: the first and last
    value of every diagnostic, the contrastive loss per query averaged over the last quarter of the rows,
    and ``at_chance`` (that average >= AT_CHANCE_SHARE * ln B)."""
    if not history:
        return {}
    keys = ("contrast_per_query", "contrast_chance", "retrieval_top1", "grad_norm_ratio", "contrast", "consistency")
    summary: dict = {"logged_steps": len(history)}
    for key in keys:
        values = [row[key] for row in history if key in row]
        if values:
            summary[f"{key}_first"], summary[f"{key}_last"] = values[0], values[-1]
    per_query = [row["contrast_per_query"] for row in history if "contrast_per_query" in row]
    if per_query:
        tail = per_query[-max(1, len(per_query) // 4) :]
        top1 = [row["retrieval_top1"] for row in history if "retrieval_top1" in row]
        chance = history[-1]["contrast_chance"]
        summary["contrast_per_query_end"] = statistics.fmean(tail)
        summary["retrieval_top1_end"] = statistics.fmean(top1[-len(tail) :])
        summary["at_chance"] = summary["contrast_per_query_end"] >= AT_CHANCE_SHARE * chance
    return summary
