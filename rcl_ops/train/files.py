"""Files of a run folder: atomic writes, and reads that name the file when it is damaged."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path


class DamagedFileError(RuntimeError):
    """A run file that exists but cannot be read (truncated, corrupted or hand-edited)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is damaged ({reason})")
        self.path = path


class WriteError(OSError):
    """A run file that cannot be written (a full disk, a file-size limit, no permission), named."""

    def __init__(self, path: Path, error: BaseException):
        super().__init__(f"cannot write {path}: {error}")
        self.path = path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; it replaces ``path`` only when the block succeeds.

    A kill during the write leaves at most a stray temporary file, never a truncated ``path``. The
    temporary name keeps the suffix, since numpy and matplotlib pick the format from it. An OSError of the
    write (a full disk) is raised as a WriteError naming ``path``.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        with temporary.open("rb+") as handle:  # on disk before the rename, so a power cut cannot tear it either
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error) from error
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``atomic_path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


# Strict JSON has no NaN or infinity: they are written as these strings (which float() reads back).
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def strict_json_value(value):
    """``value`` with every number a JSON number: numpy scalars as Python floats, and non-finite floats (an
    interval that cannot be computed, a ratio with a zero denominator) as the strings of ``NON_FINITE``."""
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) or hasattr(value, "__float__"):
        number = float(value)
        if math.isfinite(number):
            return number
        return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")
    return value


def write_json_atomically(path: Path, value) -> None:
    """Write ``value`` as indented strict JSON (``strict_json_value``) to ``path`` through ``atomic_path``."""
    write_text_atomically(path, json.dumps(strict_json_value(value), indent=2, allow_nan=False))


def _non_finite_restored(value):
    if isinstance(value, dict):
        return {key: _non_finite_restored(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_non_finite_restored(item) for item in value]
    return NON_FINITE.get(value, value) if isinstance(value, str) else value


def read_json(path: Path, non_finite: bool = False):
    """The JSON value in ``path``; DamagedFileError naming the file when it does not parse. ``non_finite``: the
    strings of ``NON_FINITE`` (how ``write_json_atomically`` writes non-finite numbers) are read as floats."""
    try:
        value = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(path, f"not valid JSON: {error}") from error
    return _non_finite_restored(value) if non_finite else value
