"""Peak extra CPU memory of one forward+backward, measured in a fresh process.

    python -m benchmarks.memory_probe <emd|mmd|bd|loss-emd|...> <provider> <B> <C> <H> <W>

Prints JSON {"extra_bytes", "uncertainty_bytes"}: the peak resident set size during the step
minus the resident size before it (inputs allocated and touched). The peak is the kernel's
VmHWM, reset just before the step (``echo 5 > /proc/self/clear_refs``); where the reset is
not permitted, the earlier peak's excess over the baseline is reported as the uncertainty.
getrusage's ru_maxrss is not used: Linux carries it over from the parent across exec.
"""

from __future__ import annotations

import json
import resource
import sys

import torch


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    def step(a, b):
        out = fn(a, b)
        if not getattr(fn, "forward_only", False):
            out.sum().backward()

    step(torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True))
    _reset_peak()
    before, high_before = _resident_bytes(), _peak_resident_bytes()
    step(q, k)
    after = _peak_resident_bytes()
    print(json.dumps({"extra_bytes": max(0, after - before), "uncertainty_bytes": max(0, high_before - before)}))


if __name__ == "__main__":
    main(sys.argv[1:])
