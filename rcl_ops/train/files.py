"""Files of a run folder: atomic writes, and reads that name the file when it is damaged."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


class DamagedFileError(RuntimeError):
    """A run file that exists but cannot be read (truncated, corrupted or hand-edited)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is damaged ({reason})")
        self.path = path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; it replaces ``path`` only when the block succeeds.

    A kill during the write leaves at most a stray temporary file, never a truncated ``path``. The
    temporary name keeps the suffix, since numpy and matplotlib pick the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield temporary
        with temporary.open("rb+") as handle:  # on disk before the rename, so a power cut cannot tear it either
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``atomic_path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json_atomically(path: Path, value) -> None:
    """Write ``value`` as indented JSON to ``path`` through ``atomic_path`` (non-JSON numbers as floats)."""
    write_text_atomically(path, json.dumps(value, indent=2, default=float))


def read_json(path: Path):
    """The JSON value in ``path``; DamagedFileError naming the file when it does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(path, f"not valid JSON: {error}") from error
