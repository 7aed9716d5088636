"""Scale-out figures of the sketch design (issue 15), side by side on one machine:

1. communication per step of gather_distributed, sketches vs residuals, computed for B = 64
   keys of 3x128x128 per rank and W = 8, 64, 1,024 ranks (all-gather forward + all-reduce of
   the gathered gradient backward, as rcl_ops.distributed implements them, ring algorithms);
   the negatives per step and the memory of a queue of 65,536 sketches;
2. fused pairwise_* vs sketch-then-pair (forward+backward) in one process;
3. measured loss steps (forward+backward, per rank) on CPU with W = 1 and 2 gloo processes,
   gathering sketches vs gathering the residuals.

python -m benchmarks.scale_out [--batch 64 --shape 3 64 64] -> benchmarks/results/cpu-scale-out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rcl_ops
from rcl_ops.distributed import all_gather_rows

RESULTS = Path(__file__).parent / "results"
QUEUE = 65_536
FLOAT32, FLOAT64 = 4, 8


# distance label -> (sketch bytes per residual of M values, loss options)
def sketch_layouts(num_values: int) -> dict[str, tuple[int, dict]]:
    return {
        "EMD exact (sorted values)": (num_values * FLOAT32, {"distance": "emd"}),
        "EMD K=1024 quantiles": (1024 * FLOAT32, {"distance": "emd", "num_quantiles": 1024}),
        "MMD G=4096 grid": (4096 * FLOAT64, {"distance": "mmd", "num_bins": 4096}),
        "BD moments": (2 * FLOAT64, {"distance": "bd"}),
    }


def bytes_per_rank(world: int, batch: int, row_bytes: int) -> int:
    """Bytes each rank receives per step: all-gather of (W - 1) B rows forward, ring all-reduce of
    the (W B)-row gradient backward (2 (W - 1) / W of it)."""
    return (world - 1) * batch * row_bytes + 2 * (world - 1) * batch * row_bytes


def communication_table(batch: int, shape: tuple[int, ...], worlds=(8, 64, 1024)) -> list[dict]:
    num_values = int(torch.tensor(shape).prod())
    residual_bytes = num_values * FLOAT32
    rows = []
    for label, (row_bytes, _) in sketch_layouts(num_values).items():
        for world in worlds:
            rows.append(
                {
                    "distance": label,
                    "world": world,
                    "negatives_per_query": world * batch - 1,
                    "sketch_bytes_per_rank": bytes_per_rank(world, batch, row_bytes),
                    "residual_bytes_per_rank": bytes_per_rank(world, batch, residual_bytes),
                    "saving": residual_bytes / row_bytes,
                    "queue_bytes_65536": QUEUE * row_bytes,
                    "residual_queue_bytes_65536": QUEUE * residual_bytes,
                }
            )
    return rows


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fused_vs_sketch(batch: int, shape: tuple[int, ...], repeats: int) -> list[dict]:
    q = torch.randn(batch, *shape, requires_grad=True)
    k = torch.randn(batch, *shape, requires_grad=True)
    lo, hi = min(q.min().item(), k.min().item()), max(q.max().item(), k.max().item())
    cases = {
        "EMD exact": (
            lambda: rcl_ops.pairwise_emd(q, k),
            lambda: rcl_ops.pairwise_emd(rcl_ops.emd_sketch(q), rcl_ops.emd_sketch(k)),
        ),
        "EMD K=1024": (
            lambda: rcl_ops.pairwise_emd(q, k, num_quantiles=1024),
            lambda: rcl_ops.pairwise_emd(
                rcl_ops.emd_sketch(q, num_quantiles=1024), rcl_ops.emd_sketch(k, num_quantiles=1024)
            ),
        ),
        "MMD grid G=4096": (
            lambda: rcl_ops.pairwise_mmd(q, k, bandwidth=1.0, method="grid"),
            lambda: rcl_ops.pairwise_mmd(
                rcl_ops.mmd_sketch(q, value_range=(lo, hi)), rcl_ops.mmd_sketch(k, value_range=(lo, hi)), bandwidth=1.0
            ),
        ),
        "BD": (
            lambda: rcl_ops.pairwise_bd(q, k),
            lambda: rcl_ops.pairwise_bd(rcl_ops.bd_sketch(q), rcl_ops.bd_sketch(k)),
        ),
    }
    rows = []
    for label, (fused, sketched) in cases.items():

        def step(fn):
            return lambda: torch.autograd.grad(fn().sum(), (q, k))

        # Interleaved, so that a drift of the shared machine hits both alike.
        fused_times, sketch_times = [], []
        for _ in range(3):
            fused_times.append(_time(step(fused), repeats))
            sketch_times.append(_time(step(sketched), repeats))
        rows.append(
            {
                "distance": label,
                "fused_ms": 1e3 * min(fused_times),
                "sketch_then_pair_ms": 1e3 * min(sketch_times),
            }
        )
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gathered_residual_loss(options: dict):
    """The loss with keys gathered as residuals (what peers do), for the time comparison."""
    loss_fn = rcl_ops.ResidualContrastiveLoss(**options)

    def loss(q, k):
        keys = all_gather_rows(k.flatten(1))
        offset = dist.get_rank() * k.shape[0] if dist.is_initialized() else 0
        distances = loss_fn.distance_fn(q.flatten(1), keys, **loss_fn.distance_kwargs)
        return rcl_ops.residual_contrastive_loss(distances, loss_fn.temperature, first_positive=offset)

    return loss


def _step_worker(rank: int, world: int, port: int, batch: int, shape, repeats: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    q = torch.randn(batch, *shape, requires_grad=True)
    k = torch.randn(batch, *shape, requires_grad=True)
    results = []
    for label, (_, options) in sketch_layouts(int(torch.tensor(shape).prod())).items():
        if options["distance"] == "mmd":
            options = {**options, "bandwidth": 1.0}
        losses = {
            "sketches": rcl_ops.ResidualContrastiveLoss(gather_distributed=True, **options),
            "residuals": _gathered_residual_loss(options),
        }
        for how, loss_fn in losses.items():

            def step(loss_fn=loss_fn):
                torch.autograd.grad(loss_fn(q, k), (q, k))
                dist.barrier()

            results.append({"distance": label, "gather": how, "world": world, "ms": 1e3 * _time(step, repeats)})
    if rank == 0:
        Path(path).write_text(json.dumps(results))
    dist.destroy_process_group()


def measured_steps(batch: int, shape, repeats: int) -> list[dict]:
    rows = []
    for world in (1, 2):
        path = RESULTS / f".scale-out-steps-{world}.json"
        mp.spawn(_step_worker, args=(world, _free_port(), batch, shape, repeats, str(path)), nprocs=world, join=True)
        rows += json.loads(path.read_text())
        path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch of the measured steps")
    parser.add_argument(
        "--shape", type=int, nargs="+", default=[3, 64, 64], help="residual shape of the measured steps"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(args.shape)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": commit,
        "communication": {"batch": 64, "shape": [3, 128, 128], "rows": communication_table(64, (3, 128, 128))},
        "fused_vs_sketch": {
            "batch": args.batch,
            "shape": shape,
            "rows": fused_vs_sketch(args.batch, shape, args.repeats),
        },
        "steps": {"batch": args.batch, "shape": shape, "rows": measured_steps(args.batch, shape, args.repeats)},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "cpu-scale-out.json"
    out.write_text(json.dumps(report, indent=2))
    for section in ("fused_vs_sketch", "steps"):
        for row in report[section]["rows"]:
            print(section, row)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
