"""Files: writing that never leaves a half-written file behind, JSON results and caches, and
the content hashes that key them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary file) to ``path`` so that
    readers see the old file or the whole new one: temporary file in the same folder, fsync,
    rename, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def content_hash(obj: Any, length: int = 16) -> str:
    """A short hash of anything JSON-serialisable (records as dicts, settings), independent of
    the order of dict keys; values JSON cannot hold count by their str()."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON, atomically (see :func:`atomic_write`)."""
    atomic_write(path, json.dumps(obj, indent=1).encode())


def cached_json(path: str | os.PathLike[str], compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(value, hit): the JSON stored at ``path``, or ``compute()``, stored there. A file that
    is missing or does not parse is recomputed."""
    try:
        return json.loads(Path(path).read_text()), True
    except (OSError, ValueError):
        value = compute()
        write_json(path, value)
        return value, False
