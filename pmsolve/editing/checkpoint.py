"""Resumable edits: after every batch, what :func:`pmsolve.edit` has done so far goes to one
file (written atomically); a later call with the same inputs puts it back and goes on from the
next batch.

The resumed result equals an uninterrupted run's bit for bit: the saved updates are re-applied
with the same arithmetic, and the context templates (text the model itself generates, so they
would differ on a partly edited model) are the ones the first run used. "The same inputs" is a
hash of the unedited weights, the requests, every setting and each layer's factor.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .._io import atomic_write
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

    def factor_id(f: Factor) -> list[Any]:  # diag(L) moves with any change of C
        diag = torch.diagonal(f.L).detach().to("cpu", torch.float64).contiguous()
        return [f.d, f.jitter, hashlib.sha256(diag.numpy().tobytes()).hexdigest()[:16]]

    parts = {"weights": weights_fingerprint(model), "requests": [r.as_dict() for r in requests],
             "settings": settings, "factors": {str(l): factor_id(f) for l, f in sorted(factors.items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def save(path: str | os.PathLike[str], key: str, progress: Progress) -> None:
    from safetensors.torch import save as encode

    tensors, entries = {}, []
    for i, e in enumerate(progress.edits):
        tensors[f"{i}.U"] = e.update.U.detach().cpu().contiguous()
        tensors[f"{i}.B"] = e.update.B.detach().cpu().contiguous()
        entries.append({"batch": e.batch, "layer": e.layer, "module": e.module, "layout": e.layout,
                        "share": e.share, "residual_rounded": e.residual_rounded,
                        "diagnostics": e.update.diagnostics.as_dict()})
    header = {"format": _FORMAT, "key": key, "batches_done": progress.batches_done, "edits": entries,
              "values": progress.values, "context_templates": progress.context_templates}
    atomic_write(path, encode(tensors, metadata={"pmsolve": json.dumps(header)}))


def load(path: str | os.PathLike[str], key: str, device: torch.device) -> Progress | None:
    """The progress saved at ``path`` if it is for this edit (same key); None if there is no
    file. A file of another edit is left alone with a warning (None); a damaged one raises."""
    from safetensors import safe_open

    from .editor import LayerEdit

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {}).get("pmsolve", "{}"))
            if header.get("format") != _FORMAT:
                raise CacheError(f"{path} is not a pmsolve edit checkpoint")
            if header["key"] != key:
                warnings.warn(f"{path} is the checkpoint of another edit (other weights, requests, settings or "
                              "statistics): starting over, it will be overwritten", stacklevel=3)
                return None
            edits = [LayerEdit(e["batch"], e["layer"], e["module"], e["layout"], e["share"],
                               Update(fh.get_tensor(f"{i}.U").to(device), fh.get_tensor(f"{i}.B").to(device),
                                      SolveDiagnostics(**e["diagnostics"])),
                               e["residual_rounded"])
                     for i, e in enumerate(header["edits"])]
    except CacheError:
        raise
    except Exception as exc:  # safetensors' own errors, missing fields
        raise CacheError(f"edit checkpoint {path} is unreadable ({exc}); delete it to start over") from None
    return Progress(header["batches_done"], edits, header["values"], header["context_templates"])


def reapply(model, edits: Sequence[Any], originals: dict[str, torch.Tensor]) -> None:
    """Apply saved LayerEdits in their order, as edit() applied them (same arithmetic)."""
    for e in edits:
        weight = model.get_submodule(e.module).weight
        originals.setdefault(e.module, weight.detach().clone())
        e.update.apply_(weight.data, layout=e.layout)


def settings_of(method: str, layers: Sequence[int], distribution: str, mu: float | None, batch_size: int | None,
                seed: int, value_config: Any, key_options: Any) -> dict[str, Any]:
    return {"method": method, "layers": list(layers), "distribution": distribution, "mu": mu,
            "batch_size": batch_size, "seed": seed, "values": asdict(value_config), "keys": asdict(key_options)}
