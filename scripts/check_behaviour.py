"""Check that a change to the trainer leaves its numbers unchanged: tiny runs of ``rcl-train experiment
table1 .. table5`` and of ``--preset quick``, through the command line, then every number they wrote.

    python scripts/check_behaviour.py record runs/behaviour-before     # on the commit before the change
    python scripts/check_behaviour.py compare runs/behaviour-before    # after it (into runs/behaviour-before-now):
                                                                       # exit 1 on any difference

Compared byte for byte: each run's results.json (without the fields that measure time or name the run
folder and command line, listed in ``MACHINE_FIELDS``), results.md and paper_comparison.md (without their
lines of times). "Tiny": 3 pre-training, fine-tuning and label-study steps, seeds 0 and 1, everything else
as the preset (the contrast check, every method, task, encoder and the figures' data included). About
8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
from pathlib import Path

# The checkout this script lives in, not whichever rcl_ops is installed: a baseline recorded in a worktree of
# the old commit must run the old code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcl_ops.train.cli import main as rcl_train  # noqa: E402

TINY = ["--pretrain-steps", "3", "--finetune-steps", "3", "--sl-steps", "3", "--seeds", "0", "1", "--threads", "1"]
RUNS = {
    **{f"table{n}": ["experiment", f"table{n}"] for n in range(1, 6)},
    "quick": ["--preset", "quick"],
}
# Before the DnCNN head started at 1e-3 (models.RESIDUAL_HEAD_GAIN), the contrast check refused the quick Table 5;
# baselines recorded then ran it with --ignore-contrast-check, which changes no number (the check still runs).
RUNS["table5"] += ["--ignore-contrast-check"]
# Fields that measure time or name where and how the run was launched: they differ between any two runs.
MACHINE_FIELDS = {
    "seconds",
    "wall_seconds",
    "finetune_seconds",
    "pretrain_seconds",
    "run_dir",
    "output_dir",
    "command",
}
TIME_LINE = re.compile(r"\d+(\.\d+)? (s|min)\b|wall|seconds|minutes", re.IGNORECASE)


# results.json is strict JSON since issue 25: a non-finite number is one of these strings (a bare NaN before).
NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _without_machine_fields(value):
    if isinstance(value, dict):
        return {k: _without_machine_fields(v) for k, v in value.items() if k not in MACHINE_FIELDS}
    if isinstance(value, list):
        return [_without_machine_fields(v) for v in value]
    return NON_FINITE.get(value, value) if isinstance(value, str) else value


def _without_time_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not TIME_LINE.search(line))


def record(folder: Path, names: list[str] | None = None) -> None:
    """Run every tiny experiment (or those ``names``) and write its comparable files into ``folder``/<name>/."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rcl-behaviour-") as runs:
        for name in names or RUNS:
            command = RUNS[name]
            argv = [*command, *TINY, "--output-dir", runs, "--run-name", name]
            with contextlib.redirect_stdout(io.StringIO()):
                status = rcl_train(argv)
            if status != 0:
                sys.exit(f"rcl-train {' '.join(argv)} exited with {status}")
            run_dir, out = Path(runs) / name, folder / name
            out.mkdir(exist_ok=True)
            summary = _without_machine_fields(json.loads((run_dir / "results.json").read_text()))
            (out / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
            for text_file in ("results.md", "paper_comparison.md"):
                if (run_dir / text_file).exists():
                    (out / text_file).write_text(_without_time_lines((run_dir / text_file).read_text()) + "\n")
            print(f"{name}: recorded", flush=True)


def _comparable(path: Path) -> bytes:
    """A recorded file without what differs between any two runs (applied again at comparison time, so a
    baseline recorded with fewer exclusions still compares)."""
    if path.suffix == ".json":
        summary = _without_machine_fields(json.loads(path.read_text()))
        return (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode()
    return (_without_time_lines(path.read_text()) + "\n").encode()


def compare(baseline: Path, now: Path) -> int:
    """Record afresh into ``now`` (kept, to inspect a difference) and compare with ``baseline``; the number
    of files that differ."""
    record(now)
    differ = 0
    for before in sorted(baseline.rglob("*")):
        if before.is_file():
            after = now / before.relative_to(baseline)
            same = after.exists() and _comparable(after) == _comparable(before)
            differ += not same
            print(f"{'same' if same else 'DIFFERS'}: {before.relative_to(baseline)}")
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), help="record only these runs")
    options = parser.parse_args()
    if options.action == "record":
        record(options.folder, options.only)
        return 0
    differ = compare(options.folder, options.folder.with_name(options.folder.name + "-now"))
    print("bit-identical" if differ == 0 else f"{differ} files differ")
    return int(differ > 0)


if __name__ == "__main__":
    sys.exit(main())
