"""Resumable edits: after every batch, what :func:`pmsolve.edit` did in it goes to a file of
its own in a checkpoint folder (written atomically, so the cost per batch does not grow with
the batches before it); a later call with the same inputs puts the saved batches back and
goes on from the next one.

The resumed result equals an uninterrupted run's bit for bit: the saved updates are re-applied
with the same arithmetic, and the context templates (text the model itself generates, so they
would differ on a partly edited model) are the ones the first run used. "The same inputs" is a
hash of the unedited weights, the requests, every setting and each layer's factor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .._io import atomic_write, content_hash
from ..errors import CacheError
from ..solver import Factor, SolveDiagnostics, Update

_FORMAT = "pmsolve.edit-checkpoint/1"


@dataclass
class Progress:
    """What a checkpoint holds: batches done, their LayerEdits and v* records, the templates."""

    batches_done: int
    edits: list  # list[LayerEdit]
    values: list[dict[str, Any]]
    context_templates: list[str]


def config_key(model, requests: Sequence[Any], settings: dict[str, Any], factors: dict[int, Factor]) -> str:
    """Hash of everything that decides the edit: weights, requests, settings, factors."""
    from ..stats import weights_fingerprint

    def factor_id(f: Factor) -> list[Any]:  # diag(L) fixes every leading principal minor of C
        diag = torch.diagonal(f.L).detach().to("cpu", torch.float64).contiguous()
        return [f.d, f.jitter, hashlib.sha256(diag.numpy().tobytes()).hexdigest()[:16]]

    parts = {"weights": weights_fingerprint(model), "requests": [r.as_dict() for r in requests],
             "settings": settings, "factors": {str(l): factor_id(f) for l, f in sorted(factors.items())}}
    return content_hash(parts, 32)


def _batch_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("batch-*.safetensors"))


def save_batch(folder: str | os.PathLike[str], key: str, batch: int, edits: Sequence[Any],
               values: list[dict[str, Any]], context_templates: list[str]) -> None:
    """One batch's LayerEdits and v* records, as ``folder/batch-NNNNNN.safetensors``."""
    from .editor import encode_edits

    header = {"format": _FORMAT, "key": key, "batch": batch, "values": values, "context_templates": context_templates}
    atomic_write(Path(folder) / f"batch-{batch:06d}.safetensors", encode_edits(edits, header, full=True))


def clear(folder: str | os.PathLike[str]) -> None:
    """Remove the batch files (and the folder, if nothing else is in it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for f in _batch_files(folder):
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def load(folder: str | os.PathLike[str], key: str, device: torch.device) -> Progress | None:
    """The batches saved in ``folder`` if they are of this edit (same key); None if there are
    none. Batches of another edit are deleted with a warning (None); a damaged file raises."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CacheError(f"edit checkpoint {folder} is a file, not a checkpoint folder")
    files = _batch_files(folder) if folder.is_dir() else []
    if not files:
        return None
    done = Progress(0, [], [], [])
    for expected, path in enumerate(files):
        header, edits = _read(path, device)
        if header["key"] != key:
            warnings.warn(f"{folder} holds the checkpoint of another edit (other weights, requests, settings or "
                          "statistics): starting over, its batches are deleted", stacklevel=3)
            clear(folder)
            return None
        if header["batch"] != expected:  # a gap cannot happen with in-order saves; stop at it
            break
        done.batches_done += 1
        done.edits += edits
        done.values += header["values"]
        done.context_templates = header["context_templates"]
    return done


def _read(path: Path, device: torch.device) -> tuple[dict[str, Any], list]:
    from safetensors import safe_open

    from .editor import LayerEdit

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {}).get("pmsolve", "{}"))
            if header.get("format") != _FORMAT:
                raise CacheError(f"{path} is not a pmsolve edit checkpoint")
            edits = [LayerEdit(e["batch"], e["layer"], e["module"], e["layout"], e["share"],
                               Update(fh.get_tensor(f"{i}.U").to(device), fh.get_tensor(f"{i}.B").to(device),
                                      SolveDiagnostics(**e["diagnostics"])),
                               e["residual_rounded"],
                               fh.get_tensor(f"{i}.K").to(device) if f"{i}.K" in fh.keys() else None)
                     for i, e in enumerate(header["edits"])]
    except CacheError:
        raise
    except Exception as exc:  # safetensors' own errors, missing fields
        raise CacheError(f"edit checkpoint file {path} is unreadable ({exc}); delete it to start over") from None
    return header, edits


def reapply(model, edits: Sequence[Any], originals) -> None:
    """Apply saved LayerEdits in their order, as edit() applied them (same arithmetic);
    ``originals`` (a steps.WeightSnapshot) keeps the weights they change."""
    for e in edits:
        e.update.apply_(originals.keep(e.module).data, layout=e.layout)


def settings_of(method: str, layers: Sequence[int], distribution: str, mu: float | None, batch_size: int | None,
                seed: int, value_config: Any, key_options: Any) -> dict[str, Any]:
    keys = asdict(key_options)
    # Absent when off, or when there is one batch (nothing earlier to preserve): checkpoints of
    # earlier versions, whose default was off, still match.
    if not keys.get("preserve_edits") or batch_size is None:
        keys.pop("preserve_edits", None)
    return {"method": method, "layers": list(layers), "distribution": distribution, "mu": mu,
            "batch_size": batch_size, "seed": seed, "values": asdict(value_config), "keys": keys}
