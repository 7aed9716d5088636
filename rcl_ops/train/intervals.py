"""Paired intervals of the results: a per-image PSNR difference between two methods, averaged per
photograph and seed, with its t interval over photographs x seeds (and the per-image interval, tiles taken as
independent)."""

from __future__ import annotations

import math
import statistics

import numpy as np

from .images import photograph_of


def paired_difference(differences: list[float], confidence: float = 0.95) -> dict:
    """Mean of paired per-image differences and its two-sided t interval (n - 1 degrees of freedom);
    the interval is NaN for fewer than two images. ``could_be_noise``: the interval contains 0."""
    from scipy import stats

    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2 or not all(math.isfinite(d) for d in differences):  # an infinite PSNR leaves no spread to measure
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n, "could_be_noise": True}
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "n": n,
        "could_be_noise": bool(mean - half <= 0 <= mean + half),
    }


def photographs_seeds_interval(differences: dict[int, list[float]], names: list[str], confidence: float = 0.95) -> dict:
    """Paired differences {seed: one per test image, in the order of ``names``} -> d[s, p], the mean over
    photograph p's images (tiles) at seed s, an (S, P) table; the estimate is its grand mean (every photograph
    and seed weighs the same). SE_p = std_p(mean_s d) / sqrt(P), SE_s = std_s(mean_p d) / sqrt(S); with P, S >= 2
    the t interval is mean ± t(df) sqrt(SE_p^2 + SE_s^2), df = min(P, S) - 1 (conservative: the interaction
    counts twice); with only one of P, S >= 2, that factor's SE alone (df = its count - 1); with neither, NaN.
    ``could_be_noise``: no interval, or it contains 0."""
    from scipy import stats

    photographs = [photograph_of(name) for name in names]
    members = {p: [i for i, q in enumerate(photographs) if q == p] for p in dict.fromkeys(photographs)}
    table = []
    for seed, values in differences.items():
        if len(values) != len(names):
            raise ValueError(f"{len(names)} test image names for {len(values)} per-image differences (seed {seed})")
        table.append([statistics.fmean(values[i] for i in indices) for indices in members.values()])
    d = np.array(table, dtype=np.float64).reshape(len(differences), len(members))
    num_seeds, num_photographs = d.shape
    finite = bool(np.isfinite(d).all())  # an infinite PSNR (a perfect restoration) leaves no spread to measure
    errors = {
        "photographs": d.mean(axis=0).std(ddof=1) / math.sqrt(num_photographs)
        if finite and num_photographs > 1
        else None,
        "seeds": d.mean(axis=1).std(ddof=1) / math.sqrt(num_seeds) if finite and num_seeds > 1 else None,
    }
    mean, half, df = float(d.mean()), math.nan, None
    if all(e is not None for e in errors.values()):
        basis, df = "photographs x seeds", min(num_photographs, num_seeds) - 1
        half = stats.t.ppf(0.5 + confidence / 2, df) * math.hypot(*errors.values())
    elif errors["seeds"] is not None:
        basis, df = "seeds only (one photograph)", num_seeds - 1
        half = stats.t.ppf(0.5 + confidence / 2, df) * errors["seeds"]
    elif errors["photographs"] is not None:
        basis, df = "photographs only (one seed)", num_photographs - 1
        half = stats.t.ppf(0.5 + confidence / 2, df) * errors["photographs"]
    else:
        basis = "none (one photograph, one seed)" if finite else "none (a PSNR is infinite)"
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "n_photographs": num_photographs,
        "n_seeds": num_seeds,
        "df": df,
        "basis": basis,
        "could_be_noise": df is None or bool(mean - half <= 0 <= mean + half),
    }


def paired_psnr(mine: dict[int, list[float]], theirs: dict[int, list[float]], names: list[str]) -> dict | None:
    """Per-image PSNR of two methods ({seed: one per test image}) paired on the seeds both have:
    {'paired_psnr': photographs_seeds_interval of mine - theirs, 'paired_psnr_per_image': paired_difference
    of each image's difference averaged over those seeds (tiles taken as independent), 'seeds'}; None
    without a shared seed."""
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    differences = {s: [a - b for a, b in zip(mine[s], theirs[s])] for s in seeds}
    paired = photographs_seeds_interval(differences, names)
    per_image = [statistics.fmean(differences[s][i] for s in seeds) for i in range(len(names))]
    return {"paired_psnr": paired, "paired_psnr_per_image": paired_difference(per_image), "seeds": seeds}
