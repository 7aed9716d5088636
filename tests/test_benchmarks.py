"""Smoke test of the benchmark runner: every provider runs, the JSON and the table come out."""

import json

import pytest

from benchmarks import run
from benchmarks.providers import providers


def test_benchmark_smoke(tmp_path, capsys):
    path = run.main(["--smoke", "--no-memory", "--output-dir", str(tmp_path)])
    result = json.loads(path.read_text())
    assert result["environment"]["device"] == "cpu" and result["environment"]["torch"]
    whats = {row["what"] for row in result["rows"]}
    assert whats == {"emd", "mmd", "bd", "loss-emd", "loss-mmd", "loss-bd"}
    providers = {row["provider"] for row in result["rows"]}
    assert {"reference", "naive"} <= providers
    for row in result["rows"]:
        assert row["full_ms"] > 0 and row["forward_ms"] > 0
    assert "faster" in capsys.readouterr().out


def test_memory_probe_sees_a_large_allocation():
    # The naive EMD sorts with int64 indices: at B=8, 1x128x128 its step allocates > 1 MiB.
    fn = providers("emd", "cpu")["naive"]
    row = run.measure("emd", "naive", fn, 8, (1, 128, 128), "cpu", repeats=1, warmup=0, memory=True)
    assert row["extra_bytes"] > 2**20, row


def test_plots_and_exponent_fits_from_a_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plots import plot_results

    rows = [
        {"what": "emd", "provider": p, "batch": b, "shape": "3x64x64", "values": 12288, "full_ms": c * b**e}
        for p, c, e in (("rcl_ops[cpu]", 0.1, 2.0), ("reference", 1.0, 1.0))
        for b in (8, 16, 32, 64)
    ]
    paths = plot_results(rows, tmp_path, "cpu-full", "test device")
    assert [p.name for p in paths] == ["cpu-full-time-vs-batch.png"] and paths[0].stat().st_size > 0
    fits = {f["provider"]: f["exponent"] for f in run.fit_exponents(rows)}
    assert fits["rcl_ops[cpu]"] == pytest.approx(2.0) and fits["reference"] == pytest.approx(1.0)
