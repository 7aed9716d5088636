"""Peak extra CPU memory of one forward+backward, measured in a fresh process.

    python -m benchmarks.memory_probe <emd|mmd|bd|loss-emd|...> <provider> <B> <C> <H> <W>

Prints JSON {"extra_bytes", "uncertainty_bytes"}: the high-water resident set size after the
step minus the resident size before it (inputs allocated and touched), and how far the
process's earlier high-water mark was above that baseline (an upper bound on the error).
"""

from __future__ import annotations

import json
import resource
import sys

import torch


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _max_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str]) -> None:
    from benchmarks.providers import loss_providers, providers

    what, provider, batch, *shape = argv
    batch, shape = int(batch), tuple(int(s) for s in shape)
    found = loss_providers(what[5:], "cpu") if what.startswith("loss-") else providers(what, "cpu")
    if provider not in found:
        raise SystemExit(f"unknown provider {provider!r} for {what}; choose one of {sorted(found)}")
    fn = found[provider]
    torch.manual_seed(0)
    q = torch.randn(batch, *shape, requires_grad=True)
    k = torch.randn(batch, *shape, requires_grad=True)
    # Warm up at a tiny size so one-time allocations (thread pools, caches) are not counted.
    small = (torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True))
    fn(*small).sum().backward()
    before, high_before = _resident_bytes(), _max_resident_bytes()
    fn(q, k).sum().backward()
    after = _max_resident_bytes()
    print(json.dumps({"extra_bytes": max(0, after - before), "uncertainty_bytes": max(0, high_before - before)}))


if __name__ == "__main__":
    main(sys.argv[1:])
