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

import torch

from .errors import CacheError


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


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and raw bytes of ``tensors`` (sorted by name): what a checked
    safetensors file stores, so that a corrupt file is told from a foreign one."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_safetensors(path: str | os.PathLike[str], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (cloned out of the mapping) and metadata of a safetensors file; CacheError naming
    ``what`` the file should hold when it is missing, truncated or not a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise CacheError(f"{what} file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        raise CacheError(f"{what} file {path} is truncated or not a safetensors file: {exc}") from exc
    return tensors, metadata
