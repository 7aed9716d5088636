"""The run's log: every logged loss in metrics.csv (long format) and, when asked, TensorBoard; progress bars."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .files import WriteError, atomic_path
from .preflight import RunError


def progress_bar(enabled: bool, description: str) -> Callable:
    """A function wrapping an iterable in a tqdm bar (or returning it unchanged when disabled)."""
    if not enabled:
        return lambda iterable, **_: iterable
    from tqdm.auto import tqdm

    return lambda iterable, **kwargs: tqdm(iterable, desc=description, leave=False, dynamic_ncols=True, **kwargs)


class RunLogger:
    """Appends (time, method, seed, phase, step, metric, value) rows to metrics.csv, and to TensorBoard
    when ``tensorboard`` is True (tensorboard/<method>/seed<s>/<phase>/, one TensorBoard run per phase; tags
    <method>/seed<s>/<phase>/<metric>).

    With ``resume`` the existing file is kept, less a torn last row (a kill during a write); the first row
    this process logs for a (method, seed, phase) replaces the file's rows of that phase from its step
    on, which the interrupted process logged after its last checkpoint, so no step is logged twice. In
    TensorBoard the same: that phase's writer starts with ``purge_step`` at that step, so TensorBoard drops the
    phase's events the interrupted process wrote from it on.
    """

    COLUMNS = ("wall_time", "method", "seed", "phase", "step", "metric", "value")

    def __init__(self, run_dir: Path, tensorboard: bool, resume: bool = False):
        self.path = run_dir / "metrics.csv"
        # (method, seed, phase) -> the largest step logged before this process, until it logs that phase
        self._logged_before: dict[tuple[str, str, str], int] = {}
        if resume and self.path.exists():
            complete = 0
            for row in self._rows():
                key, step = (row[1], row[2], row[3]), int(row[4])
                self._logged_before[key] = max(step, self._logged_before.get(key, step))
                complete += 1
            with self.path.open(newline="") as handle:
                lines = sum(1 for _ in handle)
            if lines != complete + 1:  # a torn or garbled row, or a missing header
                self._rewrite(lambda row: True)
        else:
            self._rewrite(lambda row: False)
        self._file = self.path.open("a", newline="")
        self._csv = csv.writer(self._file)
        self._tensorboard = run_dir / "tensorboard" if tensorboard else None
        self._resume = resume
        self._writers: dict[tuple[str, str, str], object] = {}  # the open TensorBoard writers, of one (method, seed)
        self._started: set[tuple[str, str, str]] = set()  # the phases this process has written to TensorBoard
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError as error:
                raise RunError("--tensorboard needs the tensorboard package (pip install tensorboard)") from error

    def _rows(self) -> Iterator[list[str]]:
        """The file's complete, well-formed data rows (none when it is missing or lacks its header); a
        last line without its line break is torn, whatever it holds."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            if handle.readline().rstrip("\r\n") != ",".join(self.COLUMNS):
                return
            for line in handle:
                row = next(csv.reader([line]), [])
                if line.endswith("\n") and len(row) == len(self.COLUMNS) and row[4].isdigit() and _is_number(row[6]):
                    yield row

    def _rewrite(self, keep: Callable[[list[str]], bool]) -> None:
        """Replace the file by its header and the complete rows that ``keep`` accepts."""
        rows = [row for row in self._rows() if keep(row)]
        with atomic_path(self.path) as temporary, temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.COLUMNS)
            writer.writerows(rows)

    def log(self, method: str, seed: int, phase: str, step: int, values: dict[str, float]) -> None:
        key = (method, str(seed), phase)
        if self._logged_before.pop(key, -1) >= step:
            self._file.close()
            self._rewrite(lambda row: (row[1], row[2], row[3]) != key or int(row[4]) < step)
            self._file = self.path.open("a", newline="")
            self._csv = csv.writer(self._file)
        now = time.time()
        try:
            for metric, value in values.items():
                self._csv.writerow((f"{now:.3f}", method, seed, phase, step, metric, f"{float(value):.6g}"))
            self._file.flush()
        except OSError as error:
            raise WriteError(self.path, error) from error
        if self._tensorboard is not None:
            writer = self._writer(key, step)
            for metric, value in values.items():
                writer.add_scalar(f"{method}/seed{seed}/{phase}/{metric}", float(value), step)

    def _writer(self, key: tuple[str, str, str], step: int):
        """The TensorBoard writer of phase ``key``, opened at its first ``step`` (the writers of another
        (method, seed) are closed: logging moves from one to the next). On --resume, a phase's first writer in
        this process purges the events from ``step`` on that the interrupted process wrote."""
        if key not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            for other in [k for k in self._writers if k[:2] != key[:2]]:
                self._writers.pop(other).close()
            purge = step if self._resume and key not in self._started else None
            method, seed, phase = key
            folder = self._tensorboard / method / f"seed{seed}" / phase
            self._writers[key] = SummaryWriter(str(folder), purge_step=purge)
            self._started.add(key)
        return self._writers[key]

    def close(self) -> None:
        self._file.close()
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
