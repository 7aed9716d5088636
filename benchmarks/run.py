"""Side-by-side benchmarks of rcl_ops against the alternatives, with ratios.

    python -m benchmarks.run --device cpu --quick     # B=64, 3x64x64 (the targets'), + a few scaling points
    python -m benchmarks.run --device cuda --full     # B and M sweeps, exponent fits
    python -m benchmarks.run --device cpu --overhead  # only the host-overhead case (B=8, M=16)

For each distance and for the whole ResidualContrastiveLoss step, every provider
(benchmarks/providers.py) is timed on the same inputs in the same run: forward, backward and
forward+backward (median and interquartile range over repeats, after warm-up), and its peak
extra memory. Providers whose direct cost would exceed the cap are timed at a smaller size
and extrapolated by their known complexity, and marked so. Results go to a JSON file with
the device name, versions and git commit; a table of ratios is printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import rcl_ops
from benchmarks.plots import plot_results
from benchmarks.providers import (
    DIRECT_SUM_PROVIDERS,
    DISTANCES,
    EXPANDED_VALUES_CAP,
    EXPANDING_PROVIDERS,
    NAIVE_MMD_SUBSAMPLE,
    kernel_evaluations,
    loss_providers,
    providers,
)

RESULTS_DIR = Path(__file__).parent / "results"
SLOW_CALL_SECONDS = 1.0
# Fast calls are repeated beyond --repeats until --min-seconds of calls are sampled (at most
# MAX_REPEATS): a median of 5 millisecond-scale calls drifts with the machine's noise.
MIN_SAMPLED_SECONDS = 1.0
MAX_REPEATS = 200
DIRECT_COST_CAP = 5e9  # element pairs; beyond this a provider is extrapolated, not run
EXTRAPOLATION_SHAPE = (3, 16, 16)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Marks points of a step: CUDA events on the GPU (device time between the marks, no
    host sync inside the step), perf_counter with a sync at each mark on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (syncs the GPU once)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def time_step(fn, q, k, device: str, repeats: int, warmup: int, min_seconds: float = 0.0) -> dict:
    """Forward, backward and full times in ms: median and interquartile range over at least
    ``repeats`` calls after ``warmup``, and more until ``min_seconds`` are sampled. On CUDA
    the times are CUDA-event times of the GPU's work (the step is queued, then synced once)."""
    forward_only = getattr(fn, "forward_only", False)
    compiles = getattr(fn, "compiles_on_first_call", False)
    samples = {"forward": [], "backward": [], "full": []}
    step, steps = 0, warmup + repeats
    while step < steps or (
        step >= warmup and sum(samples["full"]) < min_seconds and len(samples["full"]) < MAX_REPEATS
    ):
        qa, ka = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        _sync(device)
        clock = _Clock(device)
        clock.mark()
        out = fn(qa, ka)
        clock.mark()
        if not forward_only:
            out.sum().backward()
        clock.mark()
        forward, backward = clock.seconds()
        if step >= warmup:
            samples["forward"].append(forward)
            samples["backward"].append(backward)
            samples["full"].append(forward + backward)
        elif forward + backward > SLOW_CALL_SECONDS and not (step == 0 and compiles):
            # A slow provider: end the warm-up, 2 timed calls (a compiler's first call is not slow).
            warmup, steps = step + 1, min(steps, step + 3)
        step += 1
    return _summary(samples)


def _summary(samples: dict[str, list[float]]) -> dict:
    result = {"timed_calls": len(samples["full"])}
    for mode, values in samples.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        result[f"{mode}_ms"] = 1e3 * statistics.median(values)
        result[f"{mode}_iqr_ms"] = 1e3 * (quartiles[2] - quartiles[0])
    return result


OVERHEAD_BATCH, OVERHEAD_SHAPE = 8, (1, 4, 4)
# The host-overhead case runs in interleaved rounds (every candidate OVERHEAD_CALLS calls per
# round), so that a shared machine's changing load moves all of a round's times together: the
# ratios to the two-op step are per round, then their median.
OVERHEAD_ROUNDS, OVERHEAD_CALLS, OVERHEAD_WARMUP = 30, 20, 20
TWO_OP = ("overhead-torch", "two-op step")


def two_op_step(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The host-overhead case's yardstick (issue 24's "two-op torch step"): (q - k).abs() on the
    same tensors, forward and backward (the .sum() before backward is every candidate's)."""
    return (q - k).abs()


def host_times(fn, q, k, device: str, calls: int) -> list[float]:
    """Host seconds of ``calls`` forward+backward steps of ``fn`` (no sync inside a step on CUDA:
    the GPU work of so small a call is shorter than its launch; one every 50 calls keeps the
    launch queue from filling up, and one at the end)."""
    times = []
    for step in range(calls):
        qa, ka = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        start = time.perf_counter()
        fn(qa, ka).sum().backward()
        times.append(time.perf_counter() - start)
        if step % 50 == 49:
            _sync(device)
    _sync(device)
    return times


def _spread(values: list[float]) -> tuple[float, float]:
    """Median and interquartile range."""
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return statistics.median(values), quartiles[2] - quartiles[0]


def overhead_candidates(device: str) -> dict[tuple[str, str], object]:
    """(what, provider) -> callable: the two-op step, then rcl_ops's backends on ``device`` and
    the hand-written naive formulation of each distance (library defaults)."""
    candidates = {TWO_OP: two_op_step}
    for distance in DISTANCES:
        found = providers(distance, device)
        for name in [n for n in found if n.startswith("rcl_ops")] + ["naive"]:
            candidates[(f"overhead-{distance}", name)] = found[name]
    # The loss on a precomputed (B, B) distance matrix (a leaf: q and k unused): rcl_ops' fused
    # InfoNCE op against torch's cross entropy of -D / T (the reference backend's loss).
    distances = torch.rand(OVERHEAD_BATCH, OVERHEAD_BATCH, device=device, requires_grad=True)
    for name, backend in (("rcl_ops", "auto"), ("naive", "reference")):
        candidates[("overhead-loss", name)] = functools.partial(_infonce_step, distances, backend)
    return candidates


def _infonce_step(distances: torch.Tensor, backend: str, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return rcl_ops.residual_contrastive_loss(distances, 0.1, backend=backend)


def run_overhead(device: str, on_row=None, rounds: int = OVERHEAD_ROUNDS) -> list[dict]:
    """The host-overhead case (B=8, M=16, forward+backward, the NaN/Inf check as it is by default):
    host microseconds per call (median over rounds of each round's median) and the ratio to the
    two-op step (median over rounds of the per-round ratios, and its interquartile range)."""
    q = torch.randn(OVERHEAD_BATCH, *OVERHEAD_SHAPE, device=device)
    k = 0.9 * torch.randn(OVERHEAD_BATCH, *OVERHEAD_SHAPE, device=device)
    candidates, rows, samples = overhead_candidates(device), {}, {}
    for (what, name), fn in candidates.items():
        row = {"what": what, "provider": name, "batch": OVERHEAD_BATCH, "values": math.prod(OVERHEAD_SHAPE)}
        row.update({"shape": "x".join(map(str, OVERHEAD_SHAPE)), "check_finite": rcl_ops.check_finite_enabled(device)})
        try:
            host_times(fn, q, k, device, OVERHEAD_WARMUP)
            samples[(what, name)] = []
        except Exception as error:  # one broken candidate must not lose the others' rows
            row["error"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
        rows[(what, name)] = row
    for _ in range(rounds):
        for key in samples:
            samples[key].append(statistics.median(host_times(candidates[key], q, k, device, OVERHEAD_CALLS)))
    for key, medians in samples.items():
        ratios = [m / t for m, t in zip(medians, samples.get(TWO_OP, medians))]
        (host, host_iqr), (ratio, ratio_iqr) = _spread(medians), _spread(ratios)
        rows[key].update({"host_us": 1e6 * host, "host_iqr_us": 1e6 * host_iqr, "rounds": rounds})
        rows[key].update({"calls_per_round": OVERHEAD_CALLS, "vs_two_op": ratio, "vs_two_op_iqr": ratio_iqr})
    for row in rows.values():
        if on_row:
            on_row(row)
    return list(rows.values())


def peak_memory(what: str, provider: str, fn, q, k, device: str) -> dict:
    if device == "cuda":
        qa, ka = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(qa, ka)
        if not getattr(fn, "forward_only", False):
            out.sum().backward()
        torch.cuda.synchronize()
        return {"extra_bytes": torch.cuda.max_memory_allocated() - base, "uncertainty_bytes": 0}
    args = [sys.executable, "-m", "benchmarks.memory_probe", what, provider, str(q.shape[0]), *map(str, q.shape[1:])]
    out = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(what, name, fn, batch, shape, device, repeats, warmup, memory: bool, min_seconds: float = 0.0) -> dict:
    distance = what.split("-")[-1]
    values = math.prod(shape)
    row = {"what": what, "provider": name, "batch": batch, "shape": "x".join(map(str, shape)), "values": values}
    if getattr(fn, "unavailable", None):
        return {**row, "skipped": f"unavailable: {fn.unavailable}"}
    # The naive MMD subsamples its values; its direct sum costs B^2 m^2.
    effective = min(values, NAIVE_MMD_SUBSAMPLE) if name == "naive" else values
    if name in EXPANDING_PROVIDERS and batch * batch * values > EXPANDED_VALUES_CAP:
        return {**row, "skipped": f"over the memory cap ({EXPANDED_VALUES_CAP:.1e} expanded values)"}
    if name in DIRECT_SUM_PROVIDERS and kernel_evaluations(distance, batch, effective) > DIRECT_COST_CAP:
        if name != "reference":
            return {**row, "skipped": f"over the cost cap ({DIRECT_COST_CAP:.0e} element pairs)"}
        # The reference MMD is O(B^2 M^2): time it at a small size, scale by the pair count.
        small = torch.randn(8, *EXTRAPOLATION_SHAPE, device=device)
        timing = time_step(fn, small, small.clone(), device, repeats=2, warmup=1)
        scale = kernel_evaluations(distance, batch, values) / kernel_evaluations(distance, 8, small[0].numel())
        timing = {key: value * scale if key.endswith("_ms") else value for key, value in timing.items()}
        return {**row, **timing, "extrapolated_from": f"B=8, {'x'.join(map(str, EXTRAPOLATION_SHAPE))}"}
    q = torch.randn(batch, *shape, device=device)
    k = 0.9 * torch.randn(batch, *shape, device=device) + 0.01
    row.update(time_step(fn, q, k, device, repeats, warmup, min_seconds))
    if memory and not name.endswith(("+compile", "+graph")):  # compiler / graph pools distort it
        row.update(peak_memory(what, name, fn, q, k, device))
    return row


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    git = ["git", "-C", str(Path(__file__).parent)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "csrc", "rcl_ops"]).returncode != 0:
        commit += "+uncommitted"
    # A copy of the tree without its history (e.g. sent to a GPU machine) names its commit here.
    commit = os.environ.get("RCL_OPS_COMMIT", commit)
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_model_name()
    if device == "cpu":
        name = f"{name}, {torch.get_num_threads()} threads"
    return {
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "rcl_ops": rcl_ops.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def print_ratio_table(rows: list[dict]) -> None:
    """One line per (what, size, provider): full time, memory, and rcl_ops's speed-up over it."""
    by_case: dict[tuple, list[dict]] = {}
    for row in rows:
        by_case.setdefault((row["what"], row["batch"], row["shape"]), []).append(row)
    header = f"{'case':<26}{'provider':<18}{'fwd ms':>10}{'bwd ms':>10}{'full ms':>10}{'mem MiB':>10}"
    print(f"\n{header}  rcl_ops speed-up, memory")
    for (what, batch, shape), case_rows in by_case.items():
        # The ratios are against the best eagerly called backend (graph replay shown beside it).
        ours = [r for r in case_rows if r["provider"].startswith("rcl_ops") and "+" not in r["provider"]]
        ours = [r for r in ours if "full_ms" in r]
        best = min(ours, key=lambda r: r["full_ms"]) if ours else None
        for r in case_rows:
            label = f"{what} B={batch} {shape}"
            if "full_ms" not in r:
                print(f"{label:<26}{r['provider']:<18}{r.get('skipped', r.get('error', '')):>40}")
                continue
            mem = r.get("extra_bytes")
            mem_text = f"{mem / 2**20:10.1f}" if mem is not None else f"{'n/a':>10}"
            ratio = ""
            if best is not None and r["provider"].endswith("+graph"):
                ratio = f"  graph replay: {best['full_ms'] / r['full_ms']:.1f}x faster than the eager call"
            elif best is not None and r is not best:
                ratio = f"  {r['full_ms'] / best['full_ms']:7.1f}x faster"
                if mem and best.get("extra_bytes"):
                    ratio += f", {mem / best['extra_bytes']:6.1f}x leaner"
            mark = " (extrapolated)" if "extrapolated_from" in r else ""
            times = "".join(f"{r[f'{mode}_ms']:10.4g}" for mode in ("forward", "backward", "full"))
            print(f"{label:<26}{r['provider']:<18}{times}{mem_text}{ratio}{mark}")


def print_overhead_table(rows: list[dict]) -> None:
    """Host microseconds per forward+backward at B=8, M=16, each against the two-op step (median of
    the per-round ratios) and against the naive formulation of its distance."""
    overhead = [r for r in rows if r["what"].startswith("overhead")]
    if not overhead:
        return
    rounds = max((r.get("rounds", 0) for r in overhead), default=0)
    print(f"\nhost overhead, one forward+backward at B={OVERHEAD_BATCH}, M={math.prod(OVERHEAD_SHAPE)}", end="")
    print(f" ({rounds} interleaved rounds of {OVERHEAD_CALLS} calls; medians, IQR over rounds)")
    naive = {r["what"]: r["host_us"] for r in overhead if r["provider"] == "naive" and "host_us" in r}
    for r in overhead:
        if "host_us" not in r:
            print(f"{r['what']:<16}{r['provider']:<18}{r.get('error', '')}")
            continue
        versus = f"  {r['vs_two_op']:5.2f}x the two-op step (IQR {r['vs_two_op_iqr']:.2f})"
        if r["what"] in naive and r["provider"] != "naive":
            versus += f", {r['host_us'] / naive[r['what']]:.2f}x naive's"
        check = "on" if r["check_finite"] else "off"
        spread = f"(IQR {r['host_iqr_us']:.1f}, check {check})"
        print(f"{r['what']:<16}{r['provider']:<18}{r['host_us']:9.1f} us {spread}{versus}")


def fit_exponents(rows: list[dict]) -> list[dict]:
    """Least-squares exponent of full time in B (at fixed M) and in M (at fixed B), per provider."""
    fits = []
    for axis, fixed in (("batch", "shape"), ("values", "batch")):
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if "full_ms" in r and "extrapolated_from" not in r:
                groups.setdefault((r["what"], r["provider"], r[fixed]), []).append(r)
        for (what, provider, fixed_value), group in groups.items():
            xs = [math.log(r[axis]) for r in group]
            if len(set(xs)) < 3:
                continue
            ys = [math.log(r["full_ms"]) for r in group]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            fits.append({"what": what, "provider": provider, "axis": axis, fixed: fixed_value, "exponent": slope})
    return fits


def scaling_provider(distance: str, name: str) -> bool:
    """The providers timed at the quick run's scaling points: rcl_ops and plain PyTorch (not the
    peers, and not the naive MMD, whose subsampled direct sum takes seconds per call)."""
    return name.startswith("rcl_ops") or name == "reference" or (name == "naive" and distance != "mmd")


def run_cases(cases, device: str, repeats: int, warmup: int, memory: bool, min_seconds: float, on_row=None):
    """Every provider of every distance and of the loss at each (batch, shape, scaling_only) case;
    scaling_only cases measure the scaling_provider ones only. ``on_row(row)`` sees each row
    as soon as it is measured."""
    rows = []
    for batch, shape, scaling_only in cases:
        # torch.compile providers last: their compile is the slowest part of a run that may be cut off.
        for compiled in (False, True):
            for distance in DISTANCES:
                named = [(distance, name, fn) for name, fn in providers(distance, device).items()]
                named += [(f"loss-{distance}", name, fn) for name, fn in loss_providers(distance, device).items()]
                for what, name, fn in named:
                    if name.endswith("+compile") != compiled or (scaling_only and not scaling_provider(distance, name)):
                        continue
                    try:
                        row = measure(what, name, fn, batch, shape, device, repeats, warmup, memory, min_seconds)
                    except Exception as error:  # one broken provider must not lose the others' rows
                        row = {"what": what, "provider": name, "batch": batch, "shape": "x".join(map(str, shape))}
                        row["error"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
                    rows.append(row)
                    if on_row:
                        on_row(row)
            print(f"measured B={batch}, {shape}{' (compiled providers)' if compiled else ''}", file=sys.stderr)
    return rows


def copy_bandwidth_gbs(device: str, megabytes: int = 1024) -> float | None:
    """Bytes read + written per second by a device-to-device copy of ``megabytes`` (GPU only):
    the roofline a memory-bound kernel is compared against."""
    if device != "cuda":
        return None
    src = torch.empty(megabytes << 18, device=device)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    clock = _Clock(device)
    clock.mark()
    for _ in range(20):
        dst.copy_(src)
    clock.mark()
    (seconds,) = clock.seconds()
    return 2 * src.numel() * 4 * 20 / seconds / 1e9


def device_slug() -> str:
    """The GPU's name for result file names: "NVIDIA H200" -> "h200"."""
    name = torch.cuda.get_device_name().lower().removeprefix("nvidia").strip()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="B=64, 3x64x64 with every provider, plus scaling points (default)"
    )
    size.add_argument("--full", action="store_true", help="sweep B in 8..128 and residual sizes")
    size.add_argument(
        "--headline", action="store_true", help="B=64, 3x128x128 only (the GPU targets' case), and host overhead"
    )
    size.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    size.add_argument(
        "--overhead", action="store_true", help="only the host-overhead case (B=8, M=16), in interleaved rounds"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per provider (default 5 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (allocator, caches, autotuning)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help=f"repeat fast calls until this much time is sampled (default {MIN_SAMPLED_SECONDS}; 0 with --smoke)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-overhead", action="store_true", help="skip the host-overhead case")
    parser.add_argument(
        "--overhead-rounds", type=int, default=OVERHEAD_ROUNDS, help="interleaved rounds of the host-overhead case"
    )
    parser.add_argument("--no-plots", action="store_true", help="write no plots")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    return args


def select_cases(args: argparse.Namespace) -> tuple[list, str]:
    """The (batch, shape, scaling_only) cases of the run and its label."""
    if args.smoke:
        return [(4, (2, 8, 8), False), (2, (2, 8, 8), True), (4, (1, 8, 8), True)], "smoke"
    if args.full:
        shapes = [(3, 32, 32), (3, 64, 64), (3, 128, 128)] + ([(3, 256, 256)] if args.device == "cuda" else [])
        cases = [(b, (3, 64, 64), False) for b in (8, 16, 32, 64, 128)]
        return cases + [(64, s, False) for s in shapes if s != (3, 64, 64)], "full"
    if args.headline:
        return [(64, (3, 128, 128), False)], "headline"
    if args.overhead:
        return [], "overhead"
    # The targets' case with every provider, and scaling points for the plots.
    return [
        (64, (3, 64, 64), False),
        (16, (3, 64, 64), True),
        (32, (3, 64, 64), True),
        (64, (3, 32, 32), True),
    ], "quick"


def main(argv=None) -> Path:
    args = parse_args(argv)
    cases, label = select_cases(args)
    repeats = args.repeats or (2 if args.smoke else 10 if args.device == "cuda" else 5)
    min_seconds = args.min_seconds if args.min_seconds is not None else 0.0 if args.smoke else MIN_SAMPLED_SECONDS

    # Validate and create the output before measuring; the JSON is rewritten (atomically)
    # after every row, so a run that is cut off keeps what it measured.
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.device}-{device_slug()}-{label}" if args.device == "cuda" else f"{args.device}-{label}"
    path = args.output_dir / f"{stem}.json"
    env = environment(args.device)
    env["copy_bandwidth_gbs"] = copy_bandwidth_gbs(args.device)
    print(f"device: {env['device_name']}; torch {env['torch']}; commit {env['commit']}", flush=True)
    rows: list[dict] = []

    def save(row: dict | None = None) -> None:
        if row is not None:
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        write_json_atomically(path, {"environment": env, "rows": rows, "exponent_fits": fit_exponents(rows)})

    if not args.no_overhead and not args.smoke:
        run_overhead(args.device, on_row=save, rounds=args.overhead_rounds)  # the library's defaults
    rcl_ops.set_check_finite(False)  # inputs here are finite; time the kernels, not the check
    try:
        run_cases(cases, args.device, repeats, args.warmup, not args.no_memory, min_seconds, on_row=save)
    finally:
        rcl_ops.set_check_finite(None)
    save()
    print_overhead_table(rows)
    print_ratio_table([r for r in rows if not r["what"].startswith("overhead")])
    for fit in fit_exponents(rows):
        print(f"exponent of full time in {fit['axis']}: {fit['what']} {fit['provider']}: {fit['exponent']:.2f}")
    print(f"wrote {path}")
    if args.no_plots or args.headline or args.overhead:
        return path
    # The plots' fixed case: the batch of the M sweep and the shape of the B sweep.
    base_batch, base_shape = (4, (2, 8, 8)) if args.smoke else (64, (3, 64, 64))
    plots = plot_results(rows, args.output_dir, stem, env["device_name"], base_batch, "x".join(map(str, base_shape)))
    for plot in plots:
        print(f"wrote {plot}")
    return path


if __name__ == "__main__":
    main()
