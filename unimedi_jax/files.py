"""Atomic file writes (a reader sees the old file or the whole new one, never half of it), and
the one checked JSON read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls write(tmp) on a temporary file beside `path`, then renames it into place; on any
    error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike, required: Sequence[str] = (), what: str = "") -> dict:
    """The JSON object in `path`; ValueError naming `what` and the path when it is not valid JSON
    or lacks a `required` key."""
    path = Path(path)
    label = f"{what} {path}".strip()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{label} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{label} holds a JSON {type(data).__name__}, not an object")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{label} lacks required key(s) {missing}")
    return data
