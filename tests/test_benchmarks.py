"""Smoke test of the benchmark runner: every provider runs, the JSON and the table come out."""

import importlib.util
import json
import time

import pytest
import torch

from benchmarks import providers as providers_module
from benchmarks import run
from benchmarks.providers import providers


def _keops_skip_reason() -> str | None:
    """Why geomloss[keops] cannot run here, or None (the provider's own cached probe)."""
    for module in ("geomloss", "pykeops"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install .[bench])"
    reason = providers_module.keops_unavailable_reason("cpu")
    return f"geomloss[keops] unavailable here: {reason}" if reason else None


def test_benchmark_smoke(tmp_path, capsys):
    path = run.main(["--smoke", "--no-memory", "--output-dir", str(tmp_path)])
    result = json.loads(path.read_text())
    assert result["environment"]["device"] == "cpu" and result["environment"]["torch"]
    whats = {row["what"] for row in result["rows"]}
    assert whats == {"emd", "mmd", "bd", "loss-emd", "loss-mmd", "loss-bd"}
    providers = {row["provider"] for row in result["rows"]}
    assert {"reference", "naive"} <= providers
    for row in result["rows"]:
        if row["provider"] == "geomloss[keops]" and "skipped" in row:  # listed, with the probe's reason
            assert row["skipped"].startswith("unavailable: ") and _keops_skip_reason() is not None
            continue
        if row["provider"] in ("pot", "geomloss") and "skipped" in row:  # a peer that is not installed
            assert "is not installed" in row["skipped"]
            continue
        assert row["full_ms"] > 0 and row["forward_ms"] > 0
    if _keops_skip_reason() is None:
        assert "geomloss[keops]" in providers
    # The scaling points (other B and M) time only rcl_ops and plain PyTorch, enough for the plots.
    scaling = {(row["provider"], row["what"]) for row in result["rows"] if (row["batch"], row["shape"]) != (4, "2x8x8")}
    assert scaling and all(run.scaling_provider(what.split("-")[-1], name) for name, what in scaling)
    assert ("reference", "emd") in scaling and ("naive", "mmd") not in scaling
    if importlib.util.find_spec("matplotlib") is not None:
        for plot in ("time-vs-batch", "time-vs-values"):
            assert (tmp_path / f"cpu-smoke-{plot}.png").is_file()
    out = capsys.readouterr().out
    assert "faster" in out
    assert "memory plots skipped" in out  # --no-memory


def test_geomloss_keops_provider_matches_tensorized():
    reason = _keops_skip_reason()
    if reason:
        pytest.skip(reason)
    fn = providers("mmd", "cpu")["geomloss[keops]"]
    q = torch.randn(3, 2, 8, 8, requires_grad=True)
    k = (0.9 * torch.randn(3, 2, 8, 8) + 0.01).requires_grad_(True)
    got = fn(q, k)
    want = providers_module.geomloss_mmd(q, k)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k)), torch.autograd.grad(want.sum(), (q, k))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Timed and its memory probed (in a fresh process, which runs the probe again) like the others.
    row = run.measure("mmd", "geomloss[keops]", fn, 4, (2, 8, 8), "cpu", repeats=1, warmup=1, memory=True)
    assert row["full_ms"] > 0 and "extra_bytes" in row, row


def test_a_provider_that_fails_its_probe_is_reported_not_run(monkeypatch, capsys):
    monkeypatch.setattr(providers_module, "_installed", lambda module: True)
    monkeypatch.setattr(providers_module, "keops_unavailable_reason", lambda device: "no C++ compiler")
    fn = providers("mmd", "cpu")["geomloss[keops]"]
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        fn(torch.randn(2, 4), torch.randn(2, 4))
    row = run.measure("mmd", "geomloss[keops]", fn, 4, (2, 8, 8), "cpu", repeats=1, warmup=0, memory=True)
    assert row["skipped"] == "unavailable: no C++ compiler" and "full_ms" not in row
    run.print_ratio_table([row])
    assert "unavailable: no C++ compiler" in capsys.readouterr().out


def test_memory_probe_sees_a_large_allocation():
    # The naive EMD sorts with int64 indices: at B=8, 1x128x128 its step allocates > 1 MiB.
    fn = providers("emd", "cpu")["naive"]
    row = run.measure("emd", "naive", fn, 8, (1, 128, 128), "cpu", repeats=1, warmup=0, memory=True)
    assert row["extra_bytes"] > 2**20, row


def test_plots_and_exponent_fits_from_a_sweep(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from benchmarks.plots import plot_results

    rows = [
        {"what": "emd", "provider": p, "batch": b, "shape": "3x64x64", "values": 12288, "full_ms": c * b**e}
        for p, c, e in (("rcl_ops[cpu]", 0.1, 2.0), ("reference", 1.0, 1.0))
        for b in (8, 16, 32, 64)
    ]
    paths = plot_results(rows, tmp_path, "cpu-full", "test device")
    assert [p.name for p in paths] == ["cpu-full-time-vs-batch.png"] and paths[0].stat().st_size > 0
    assert "memory plots skipped" in capsys.readouterr().out
    fits = {f["provider"]: f["exponent"] for f in run.fit_exponents(rows)}
    assert fits["rcl_ops[cpu]"] == pytest.approx(2.0) and fits["reference"] == pytest.approx(1.0)


def test_memory_plots_from_a_sweep_with_memory(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from benchmarks.plots import plot_results

    sizes = [(b, "3x64x64", 12288) for b in (8, 16, 32, 64)] + [(64, "3x32x32", 3072), (64, "3x128x128", 49152)]
    rows = [
        {"what": what, "provider": p, "batch": b, "shape": shape, "values": m, "full_ms": 1e-6 * b * m}
        | ({"extra_bytes": c * b * b * m} if c else {})  # reference: its memory probe failed
        for what in ("mmd", "loss-mmd")
        for p, c in (("rcl_ops[cpu]", 4), ("geomloss[keops]", 8), ("reference", 0))
        for b, shape, m in sizes
    ]
    rows.append({**rows[0], "batch": 128, "extra_bytes": 0})  # under the probe's resolution: not drawn
    names = [p.name for p in plot_results(rows, tmp_path, "cpu-full", "test device")]
    assert names == [
        f"cpu-full-{n}.png" for n in ("time-vs-batch", "time-vs-values", "memory-vs-batch", "memory-vs-values")
    ]
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
    assert "memory plots skipped" not in capsys.readouterr().out


def test_fast_calls_are_repeated_until_min_seconds():
    q = torch.randn(2, 8)

    def tiny(qa, ka):
        return (qa - ka).square().sum()

    few = run.time_step(tiny, q, q.clone(), "cpu", repeats=2, warmup=0)
    assert few["timed_calls"] == 2
    many = run.time_step(tiny, q, q.clone(), "cpu", repeats=2, warmup=0, min_seconds=0.02)
    assert 2 < many["timed_calls"] <= run.MAX_REPEATS


def test_extrapolated_rows_scale_times_only():
    fn = providers("mmd", "cpu")["reference"]
    row = run.measure("mmd", "reference", fn, 64, (3, 64, 64), "cpu", repeats=1, warmup=0, memory=False)
    assert row["extrapolated_from"].startswith("B=8")
    assert row["timed_calls"] <= run.MAX_REPEATS  # a count, not scaled with the times
    small = run.time_step(
        fn, torch.randn(8, *run.EXTRAPOLATION_SHAPE), torch.randn(8, *run.EXTRAPOLATION_SHAPE), "cpu", 1, 0
    )
    assert row["full_ms"] > 100 * small["full_ms"]


@pytest.mark.parametrize("compiles", [False, True])
def test_a_compilers_slow_first_call_keeps_its_warm_up(monkeypatch, compiles):
    # A slow first call ends the warm-up of a slow provider (2 timed calls), but not of a provider
    # that compiles on its first call: CUDA graph trees record on a later warm-up call.
    monkeypatch.setattr(run, "SLOW_CALL_SECONDS", 0.01)
    calls = []

    def step(q, k):
        if not calls:
            time.sleep(0.05)
        calls.append(1)
        return (q * k).sum()

    if compiles:
        providers_module.compiles_on_first_call(step)
    q = torch.randn(2, 3)
    result = run.time_step(step, q, q.clone(), "cpu", repeats=5, warmup=3)
    assert result["timed_calls"] == (5 if compiles else 2)
    assert len(calls) == (8 if compiles else 3)


def test_overhead_case_times_every_candidate_including_the_loss_alone():
    rows = run.run_overhead("cpu", rounds=1)
    timed = {(row["what"], row["provider"]) for row in rows if row.get("host_us", 0) > 0}
    assert {("overhead-loss", "rcl_ops"), ("overhead-loss", "naive"), run.TWO_OP} <= timed
    assert timed == {(row["what"], row["provider"]) for row in rows}, [row for row in rows if "error" in row]
