"""The lock of a run folder: a file ``.rcl-train.lock`` in it, held with ``flock`` by the one process that
trains there, so that two runs never write into one folder and a --resume never joins a run still in progress.

The kernel releases the lock when its process ends, however it ends. The file itself stays; it holds the id and
host of the process while it runs and is emptied when the run ends cleanly, so a lock file that is free but not
empty was left by a process that was killed (a stale lock), which the next run says and takes over.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable
from pathlib import Path

from .preflight import RunError

LOCK_NAME = ".rcl-train.lock"


class RunLock:
    """The lock of one run folder, held by this process until ``release``."""

    def __init__(self, path: Path, descriptor: int):
        self.path, self._descriptor = path, descriptor

    def release(self) -> None:
        """Empty the lock file (the mark of a clean end) and release it; releasing twice does nothing."""
        if self._descriptor is None:
            return
        try:
            os.ftruncate(self._descriptor, 0)
        finally:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None


def _locked_descriptor(path: Path, create: bool) -> int | None:
    """A descriptor of ``path`` holding its exclusive lock, or None when another process holds it (or, without
    ``create``, when there is no lock file)."""
    try:
        descriptor = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        if create:
            raise
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def _holder_text(path: Path) -> str:
    """'process 123 on host' from a lock file's contents ('another process' when it cannot be read)."""
    try:
        pid, _, host = path.read_text().strip().partition(" ")
    except OSError:
        return "another process"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the lock of ``run_dir`` ('process 123'), or None when no live process does; takes nothing."""
    path = run_dir / LOCK_NAME
    if not path.is_file():
        return None
    descriptor = _locked_descriptor(path, create=False)
    if descriptor is None:
        return _holder_text(path) if path.exists() else None
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    os.close(descriptor)
    return None


def _is_running(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def take_lock(run_dir: Path, say: Callable[[str], None], busy: Callable[[str], str]) -> RunLock:
    """Hold the lock of ``run_dir`` for this process; RunError with ``busy(holder)`` when a live process holds
    it. A stale lock (the file of a process that ended without releasing it) is said through ``say`` and taken
    over."""
    path = run_dir / LOCK_NAME
    descriptor = _locked_descriptor(path, create=True)
    if descriptor is None:
        raise RunError(busy(_holder_text(path)))
    previous = os.pread(descriptor, 256, 0).decode(errors="replace").strip()
    if previous:
        pid, _, host = previous.partition(" ")
        here = host in ("", socket.gethostname())
        state = "is no longer running" if here and not _is_running(pid) else "no longer holds it"
        say(
            f"run folder {run_dir}: its lock was left by process {pid}{'' if here else f' on {host}'}, which {state} "
            "(the run was killed, not finished); this run takes the lock over"
        )
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return RunLock(path, descriptor)
