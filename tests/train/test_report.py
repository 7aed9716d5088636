"""The trainer's report (issue 22): intervals over photographs x seeds, below-input flags, and the RCL
controls (consistency only, contrastive only), on hand-made run records."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from rcl_ops.train import report
from rcl_ops.train.config import TrainConfig, build_config
from rcl_ops.train.evaluate import TestScores as Scores
from rcl_ops.train.images import photograph_of
from rcl_ops.train.intervals import photographs_seeds_interval
from rcl_ops.train.methods import controls_of
from rcl_ops.train.report import summarise
from rcl_ops.train.tables import format_table


def test_photograph_of_a_tile_name():
    assert photograph_of("astronaut@0,1") == "astronaut"
    assert photograph_of("im@12,3") == "im"
    assert photograph_of("a@b@2,3") == "a@b"  # split at the last '@'
    for whole in ("astronaut", "img@x", "im@1,2,3", "im@1,", "0001_NOISY_SRGB_010.PNG"):
        assert photograph_of(whole) == whole


def test_interval_over_photographs_and_seeds_by_hand():
    # one tile per photograph: d[s, p] = [[1, 2], [3, 4]] (2 seeds x 2 photographs)
    found = photographs_seeds_interval({0: [1.0, 2.0], 1: [3.0, 4.0]}, ["a", "b"])
    se_p = np.std([2.0, 3.0], ddof=1) / math.sqrt(2)  # photograph means over seeds: 2, 3 -> 0.5
    se_s = np.std([1.5, 3.5], ddof=1) / math.sqrt(2)  # seed means over photographs: 1.5, 3.5 -> 1
    half = stats.t.ppf(0.975, 1) * math.sqrt(se_p**2 + se_s**2)
    assert found["mean"] == pytest.approx(2.5)
    assert (found["low"], found["high"]) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    assert (found["n_photographs"], found["n_seeds"], found["df"]) == (2, 2, 1)
    assert found["basis"] == "photographs x seeds" and found["could_be_noise"]  # half = 14.2


def test_interval_groups_the_tiles_of_a_photograph():
    names = ["a@0,0", "a@0,1", "b@0,0", "b@1,0", "b@1,1", "c"]
    rng = np.random.default_rng(0)
    differences = {seed: list(rng.normal(0.3, 0.2, len(names))) for seed in (3, 7)}
    found = photographs_seeds_interval(differences, names)
    cells = np.array([[np.mean(d[:2]), np.mean(d[2:5]), d[5]] for d in differences.values()])  # (S, P) = (2, 3)
    se_p = np.std(cells.mean(axis=0), ddof=1) / math.sqrt(3)
    se_s = np.std(cells.mean(axis=1), ddof=1) / math.sqrt(2)
    half = stats.t.ppf(0.975, 1) * math.sqrt(se_p**2 + se_s**2)  # df = min(P, S) - 1
    assert found["mean"] == pytest.approx(cells.mean())  # each photograph weighs the same, whatever its tiles
    assert found["high"] - found["low"] == pytest.approx(2 * half)
    assert (found["n_photographs"], found["n_seeds"], found["df"]) == (3, 2, 1)
    # the same differences with every tile taken as its own photograph: six photographs, another interval
    apart = photographs_seeds_interval(differences, [f"p{i}" for i in range(len(names))])
    assert apart["n_photographs"] == 6 and apart["high"] - apart["low"] != pytest.approx(2 * half)


def test_interval_basis_with_one_photograph_or_one_seed():
    tiles = ["a@0,0", "a@0,1", "a@1,0"]
    seeds_only = photographs_seeds_interval({0: [1.0, 2.0, 3.0], 1: [0.0, 1.0, 2.0], 2: [2.0, 2.0, 2.0]}, tiles)
    half = stats.t.ppf(0.975, 2) * np.std([2.0, 1.0, 2.0], ddof=1) / math.sqrt(3)
    assert seeds_only["basis"] == "seeds only (one photograph)"
    assert (seeds_only["n_photographs"], seeds_only["n_seeds"], seeds_only["df"]) == (1, 3, 2)
    assert seeds_only["high"] - seeds_only["low"] == pytest.approx(2 * half)
    assert seeds_only["mean"] == pytest.approx(5 / 3) and not seeds_only["could_be_noise"]

    photos_only = photographs_seeds_interval({4: [1.0, 3.0, -1.0, 0.5]}, ["a@0,0", "a@0,1", "b", "c"])
    half = stats.t.ppf(0.975, 2) * np.std([2.0, -1.0, 0.5], ddof=1) / math.sqrt(3)
    assert photos_only["basis"] == "photographs only (one seed)"
    assert (photos_only["n_photographs"], photos_only["n_seeds"], photos_only["df"]) == (3, 1, 2)
    assert photos_only["high"] - photos_only["low"] == pytest.approx(2 * half) and photos_only["could_be_noise"]

    neither = photographs_seeds_interval({0: [0.7, 0.9]}, ["a@0,0", "a@0,1"])
    assert neither["mean"] == pytest.approx(0.8) and neither["df"] is None
    assert math.isnan(neither["low"]) and math.isnan(neither["high"]) and neither["could_be_noise"]
    assert neither["basis"] == "none (one photograph, one seed)"
    # the sentences say the basis
    assert report.interval_text(seeds_only).endswith("] over 3 seeds, seeds only (one photograph)")
    assert report.interval_text(photos_only).endswith("] over 3 photographs, photographs only (one seed)")
    assert report.interval_text(neither) == "no interval (one photograph, one seed)"
    with pytest.raises(ValueError, match="3 test image names for 2"):
        photographs_seeds_interval({0: [0.7, 0.9]}, tiles)


# ---------------------------------------------------------------------------------------------
# summaries of hand-made runs

TEST_NAMES = ["astro@0,0", "astro@0,1", "coffee@0,0", "coffee@1,0"]  # two photographs, two tiles each
INPUT_PSNR = [20.0, 21.0, 22.0, 23.0]  # mean 21.5


def fake_run(key: str, seed: int, psnr: list[float], tasks: tuple[str, ...] = ("denoise",)) -> dict:
    scores = {"psnr": float(np.mean(psnr)), "ssim": 0.5, "psnr_per_image": psnr}
    return {"method": key, "seed": seed, "tasks": {t: scores for t in tasks}, "as_is": {t: scores for t in tasks}}


def fake_summary(monkeypatch, runs: list[dict], run_keys: list[str], **overrides) -> dict:
    """summarise() of ``runs`` with ``run_keys`` as the config's run keys (so that the control methods can
    be reported before the trainer runs them)."""
    config = build_config(methods=["rcl-emd", "n2n"], tasks=["denoise"], seeds=[0, 1, 2], **overrides)
    monkeypatch.setattr(TrainConfig, "run_keys", lambda self: run_keys)
    naive = {t: Scores(psnr=INPUT_PSNR, ssim=[0.4] * 4) for t in config.tasks}
    environment = {
        "num_train_images": 10, "num_test_images": 4, "num_labelled": 10, "device": "cpu", "wall_seconds": 1.0,
        "test_images": TEST_NAMES,
    }  # fmt: skip
    return summarise(config, runs, naive, environment)


def shifted(offset: float, seed: int) -> list[float]:
    return [p + offset + 0.1 * seed + 0.05 * i for i, p in enumerate(INPUT_PSNR)]


def test_comparisons_use_photographs_x_seeds_and_keep_the_per_image_interval(monkeypatch):
    runs = [fake_run(k, s, shifted(o, s)) for s in (0, 1, 2) for k, o in (("rcl-emd+random", 0.5), ("n2n", 0.2))]
    summary = fake_summary(monkeypatch, runs, ["rcl-emd+random", "n2n"])
    (versus_n2n,) = [c for c in summary["comparisons"] if c["baseline"] == "n2n"]
    paired = versus_n2n["paired_psnr"]
    assert (paired["n_photographs"], paired["n_seeds"], paired["basis"]) == (2, 3, "photographs x seeds")
    assert paired["mean"] == pytest.approx(0.3)
    assert versus_n2n["paired_psnr_per_image"]["n"] == 4  # the old interval, tiles as independent
    assert "95% CI [" in versus_n2n["sentence"] and "over 2 photographs x 3 seeds" in versus_n2n["sentence"]
    markdown = format_table(summary)
    assert "treat the tiles as independent" not in markdown
    assert "Intervals: per seed and photograph" in markdown


def test_rows_below_the_input_are_flagged_in_the_json_and_the_table(monkeypatch):
    runs = [fake_run(k, s, shifted(o, s)) for s in (0, 1) for k, o in (("rcl-emd+random", -1.0), ("n2n", 0.5))]
    summary = fake_summary(monkeypatch, runs, ["rcl-emd+random", "n2n"])
    for rows in (summary["rows"], summary["as_is_rows"]):
        flags = {row["method"]: row.get("below_input") for row in rows}
        assert flags == {"input": None, "rcl-emd+random": ["denoise"], "n2n": []}
    markdown = format_table(summary)
    rcl_lines = [line for line in markdown.splitlines() if line.startswith("| RCL-EMD (g_e: random) |")]
    assert len(rcl_lines) == 2  # proxy and as-is tables
    assert all(line.split(" | ")[1].endswith(" (below input)") for line in rcl_lines)
    assert all(" (below input)" not in line.split(" | ")[2] for line in rcl_lines)  # PSNR only, not SSIM
    assert not any("(below input)" in line for line in markdown.splitlines() if line.startswith(("| N2N", "| Input")))
    assert markdown.count("Rows marked (below input) score below the input") == 2  # proxy and as-is tables
    above = [fake_run(k, s, shifted(0.5, s)) for s in (0, 1) for k in ("rcl-emd+random", "n2n")]
    assert "(below input)" not in format_table(fake_summary(monkeypatch, above, ["rcl-emd+random", "n2n"]))


def test_control_keys():
    assert controls_of("rcl-emd+random") == {"consistency": "consistency+random", "contrast": "contrast-emd"}
    assert controls_of("rcl-mmd") == {"consistency": "consistency", "contrast": "contrast-mmd"}  # RAW
    assert controls_of("contrast-emd") == {} and controls_of("sl-denoise") == {}


def test_control_comparisons_appear_when_the_controls_ran(monkeypatch):
    offsets = {"rcl-emd+random": 0.5, "consistency+random": 0.5, "contrast-emd": -2.0, "n2n": 0.0}
    runs = [fake_run(k, s, shifted(o, s)) for s in (0, 1, 2) for k, o in offsets.items()]
    summary = fake_summary(monkeypatch, runs, list(offsets))
    controls = summary["control_comparisons"]
    assert [(c["baseline"], c["task"], c["term"]) for c in controls] == [
        ("consistency+random", "denoise", "contrastive"),
        ("contrast-emd", "denoise", "consistency"),
    ]
    consistency, contrast = controls
    assert consistency["paired_psnr"]["mean"] == pytest.approx(0.0) and consistency["answer"] == "could be noise"
    assert consistency["sentence"].startswith(
        "Does the contrastive term help (RCL-EMD (g_e: random) vs Consistency only (alpha 0) (g_e: random), "
        "Denoising, same seeds)? +0.00 dB, 95% CI ["
    )
    assert consistency["sentence"].endswith("over 2 photographs x 3 seeds: could be noise")
    assert contrast["answer"] == "yes" and "Contrastive only (EMD)" in contrast["sentence"]
    markdown = format_table(summary)
    assert "Does each RCL term help?" in markdown and f"- {consistency['sentence']}" in markdown
    # the RCL row is still compared with the controls among its baselines
    assert {c["baseline"] for c in summary["comparisons"]} >= {"consistency+random", "contrast-emd", "input"}

    worse = {**offsets, "rcl-emd+random": -1.0}
    runs = [fake_run(k, s, shifted(o, s)) for s in (0, 1, 2) for k, o in worse.items()]
    hurts = fake_summary(monkeypatch, runs, list(worse))["control_comparisons"][0]
    assert hurts["answer"] == "no (it hurts)" and hurts["sentence"].endswith(": no (it hurts)")


def test_no_control_comparisons_without_the_controls(monkeypatch):
    runs = [fake_run(k, s, shifted(0.1, s)) for s in (0, 1) for k in ("rcl-emd+random", "n2n")]
    summary = fake_summary(monkeypatch, runs, ["rcl-emd+random", "n2n"])
    assert summary["control_comparisons"] == []
    assert "Does each RCL term help?" not in format_table(summary)
    only_consistency = runs + [fake_run("consistency+self", s, shifted(0.1, s)) for s in (0, 1)]
    assert (
        fake_summary(monkeypatch, only_consistency, ["rcl-emd+random", "consistency+self", "n2n"])[
            "control_comparisons"
        ]
        == []
    )  # another encoder's control is not this row's


def test_label_efficiency_comparisons_use_photographs_x_seeds(monkeypatch):
    config = build_config(methods=["rcl-emd"], tasks=["denoise"], seeds=[0, 1], labels=["2"])
    label_results = [
        {"protocol": p, "labels": 2, "seed": s, "psnr": 0.0, "ssim": 0.0, "psnr_per_image": shifted(o, s)}
        for s in (0, 1)
        for p, o in (("sl", 0.0), ("rcl-emd+random", 0.4))
    ]
    study = report.label_efficiency(config, [], label_results, 10, TEST_NAMES)
    (versus,) = study["comparisons"]
    assert versus["paired_psnr"]["mean"] == pytest.approx(0.4) and versus["paired_psnr"]["n_seeds"] == 2
    assert versus["paired_psnr_per_image"]["n"] == 4
    assert "over 2 photographs x 2 seeds" in versus["sentence"]


def test_paired_difference_t_interval():
    from rcl_ops.train.intervals import paired_difference

    differences = [0.5, 1.0, 1.5, 2.0]
    found = paired_difference(differences)
    half = stats.t.ppf(0.975, 3) * np.std(differences, ddof=1) / 2  # sqrt(4) = 2
    assert found["mean"] == pytest.approx(1.25) and found["n"] == 4
    assert (found["low"], found["high"]) == (pytest.approx(1.25 - half), pytest.approx(1.25 + half))
    assert not found["could_be_noise"]
    assert paired_difference([-1.0, 1.5, 0.2])["could_be_noise"]
    assert paired_difference([0.3])["could_be_noise"] and math.isnan(paired_difference([0.3])["low"])


def test_contrast_verdict_says_whether_the_term_did_anything():
    from rcl_ops.train.report import contrast_verdict

    row = {
        "title": "RCL-EMD", "contrast_per_query_first": 2.0, "contrast_per_query_end": 1.9,
        "contrast_chance_last": math.log(8), "retrieval_top1_first": 0.5, "retrieval_top1_end": 0.6,
        "grad_norm_ratio_last": 0.3, "seeds_at_chance": 0, "n": 3,
    }  # fmt: skip
    assert "YES" in contrast_verdict(row)
    assert "A LITTLE" in contrast_verdict({**row, "grad_norm_ratio_last": 0.05})
    assert "HARDLY" in contrast_verdict({**row, "grad_norm_ratio_last": 0.001})
    assert "HARDLY" in contrast_verdict({**row, "grad_norm_ratio_last": math.nan})
    assert contrast_verdict({**row, "seeds_at_chance": 2}).startswith("RCL-EMD: NO: its loss ended at chance in 2 of 3")
