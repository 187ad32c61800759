"""Statistics files: pmsolve's safetensors format and the reference `.npz` layout.

pmsolve format (``pmsolve.stats/1``): a safetensors file with the tensors of an
accumulator state (``sum``, and ``mean``/``m2`` when centred) plus string
metadata: identity fields (model, fingerprint, layer, module, corpus, dtype, ...),
the count, and a SHA-256 of the tensor bytes. safetensors rejects a truncated
header; the checksum catches damage inside the data. Writes are atomic
(pmsolve._io.atomic_write: temporary file, fsync, rename, fsync of the folder), so a
crash leaves either the old file or the new one, never half of one.

Reference layout (ROME/MEMIT/EMMET ``layer_stats``): ``np.savez`` of a
``CombinedStat(mom2=SecondMoment())`` state: ``mom2.mom2`` (the *sum* Σxxᵀ),
``mom2.count`` and ``mom2.constructor``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write, read_safetensors, tensor_checksum
from ..errors import CacheError

FORMAT = "pmsolve.stats/1"
_REF_CONSTRUCTOR = "util.runningstats.SecondMoment()"


def _meta_str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def encode_states(states: dict[str, dict[str, Any]], metadata: dict[str, Any]) -> bytes:
    """Serialise named accumulator states (``prefix -> state_dict``) with metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, Any] = {}
    for prefix, st in states.items():
        for key in ("sum", "mean", "m2"):
            if key in st:
                tensors[f"{prefix}{key}"] = st[key].detach().to("cpu", torch.float64).contiguous()
        shapes[prefix] = {k: st[k] for k in ("d", "count", "dtype_products", "centered")}
    meta = {k: _meta_str(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, states=json.dumps(shapes), sha256=tensor_checksum(tensors))
    return save(tensors, metadata=meta)


def decode_states(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Inverse of :func:`encode_states`; CacheError on anything missing, truncated or corrupt."""
    if not path.exists():
        raise CacheError(f"statistics file {path} does not exist")
    if is_npz(path):
        raise CacheError(f"{path} is an .npz file (the ROME/MEMIT reference layout?), not a pmsolve statistics "
                         "file: read it with CovarianceAccumulator.load or .from_npz, or pmsolve.stats.load_stats")
    tensors, meta = read_safetensors(path, "statistics")
    if meta.get("format") != FORMAT:
        raise CacheError(f"{path} is not a pmsolve statistics file (format {meta.get('format')!r}, expected {FORMAT!r})")
    if tensor_checksum(tensors) != meta.get("sha256"):
        raise CacheError(f"statistics file {path} is corrupt: checksum of its tensors does not match")
    states: dict[str, dict[str, Any]] = {}
    for prefix, info in json.loads(meta["states"]).items():
        st = dict(info)
        for key in ("sum", "mean", "m2"):
            if f"{prefix}{key}" in tensors:
                st[key] = tensors[f"{prefix}{key}"]
        if tuple(st["sum"].shape) != (st["d"], st["d"]):
            raise CacheError(f"statistics file {path} is inconsistent: {prefix}sum has shape {tuple(st['sum'].shape)}")
        states[prefix] = st
    return states, meta


def check_metadata(path: Path, meta: dict[str, str], expect: dict[str, Any]) -> None:
    """CacheError naming the first field whose stored value differs from the expected one."""
    for key, want in expect.items():
        have = meta.get(key)
        if have != _meta_str(want):
            raise CacheError(
                f"statistics file {path} does not match this request: {key} is {have!r} in the file, expected "
                f"{_meta_str(want)!r}; delete the file or point cache_dir elsewhere to recompute"
            )


def save_state(path: Any, state: dict[str, Any], metadata: dict[str, Any]) -> None:
    atomic_write(Path(path), encode_states({"": state}, metadata))


def load_state(path: Any, *, expect: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    path = Path(path)
    states, meta = decode_states(path)
    check_metadata(path, meta, expect or {})
    if "" not in states:
        raise CacheError(f"{path} holds several states ({sorted(states)}); it is a checkpoint, not a single statistic")
    return states[""], meta


# -- reference .npz -----------------------------------------------------------


_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive; a safetensors file starts with its header length


def is_npz(path: Any) -> bool:
    """Whether ``path`` is a zip archive (an .npz), judged by its first bytes, not its name."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _ZIP_MAGIC
    except OSError:
        return False


def write_reference_npz(path: Any, total: torch.Tensor, count: int, *, dtype: Any = np.float32, **extra: Any) -> None:
    """Write Σxxᵀ and the count in the ROME/MEMIT ``layer_stats`` layout (atomically).

    ``dtype`` is float32 by default, as the reference stores it; ``extra`` adds top-level
    fields the reference cache check compares (e.g. ``sample_size``).
    """
    import io

    fields = {
        "mom2.mom2": total.detach().cpu().numpy().astype(dtype),
        "mom2.count": np.array(int(count)),
        "mom2.constructor": np.array(_REF_CONSTRUCTOR),
        **{k: np.array(v) for k, v in extra.items()},
    }
    buf = io.BytesIO()
    np.savez(buf, **fields)
    path = Path(path)
    if path.suffix != ".npz":  # np.savez would append it; keep the caller's name honest
        raise CacheError(f"reference statistics files end in .npz, got {path.name}")
    atomic_write(path, buf.getvalue())


def read_reference_npz(path: Any) -> tuple[torch.Tensor, int]:
    """(Σxxᵀ as fp64, count) from a reference ``.npz``; CacheError if it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mom2.mom2" not in z or "mom2.count" not in z:
                raise CacheError(f"{path} has no mom2.mom2/mom2.count: not a reference second-moment file ({list(z)})")
            total, count = z["mom2.mom2"], z["mom2.count"]
    except FileNotFoundError:
        raise CacheError(f"statistics file {path} does not exist") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CacheError(f"{path} is truncated or not an .npz file: {exc}") from exc
    if total.ndim != 2 or total.shape[0] != total.shape[1] or count.ndim != 0 or int(count) <= 0:
        raise CacheError(f"{path}: mom2.mom2 has shape {total.shape} and mom2.count {count!r}; expected d × d and a count > 0")
    out = torch.from_numpy(np.asarray(total, dtype=np.float64))
    if not bool(torch.isfinite(out).all()):
        raise CacheError(f"{path}: mom2.mom2 contains NaN or Inf")
    return out, int(count)
