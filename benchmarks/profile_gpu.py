"""Where the GPU time of one forward+backward goes: torch.profiler's kernel table per distance
and backend at the headline case (B=64, 3x128x128, float32).

    python -m benchmarks.profile_gpu [--rows 12]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import rcl_ops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=12, help="kernels listed per case")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 128, 128])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rcl_ops.set_check_finite(False)
    q = torch.randn(args.batch, *args.shape, device="cuda")
    k = 0.9 * torch.randn(args.batch, *args.shape, device="cuda") + 0.01
    for backend in [b for b in ("cuda", "triton") if b in rcl_ops.available_backends("cuda")]:
        for distance in ("emd", "mmd", "bd"):
            loss_fn = rcl_ops.ResidualContrastiveLoss(distance, backend=backend)

            def step(loss_fn=loss_fn):
                qa, ka = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
                loss_fn(qa, ka).backward()

            print(f"\n=== loss step, {distance}, backend {backend}, B={args.batch}, {args.shape} ===", flush=True)
            try:
                for _ in range(3):  # warm-up: autotuning, allocator
                    step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
            except Exception as error:  # report and go on to the next case
                print(f"failed: {type(error).__name__}: {error}", flush=True)
                continue
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60)
            print(table, flush=True)


if __name__ == "__main__":
    main()
