"""Pieces shared by `pmsolve eval` and the experiments runner: content hashes, a JSON file
cache, atomic writes, fluency, and per-layer factors from cached statistics."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from .._io import atomic_write


def content_hash(obj: Any) -> str:
    """A short hash of anything JSON-serialisable (records as dicts, settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write atomically: readers (and a crash) see the old file or the new one, never half."""
    atomic_write(path, json.dumps(obj, indent=1).encode())


def cached_json(path: Path, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(value, hit): the JSON stored at ``path``, or ``compute()`` stored there."""
    try:
        return json.loads(path.read_text()), True
    except (OSError, ValueError):
        value = compute()
        write_json(path, value)
        return value, False


def fluency(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100,
            batch_size: int = 16, top_k: int | None = None, seed: int = 0) -> list[float]:
    """Generation entropy (weighted bi/trigram entropy) of a continuation per prompt: greedy
    (top_k None) or sampled from the top_k tokens with per-prompt random numbers (seed), so
    that the same prompt before and after an edit is a paired comparison."""
    from ..evaluation import generate_texts, ngram_entropy

    if not prompts:
        return []
    texts = generate_texts(model, tokenizer, list(prompts), max_new_tokens, batch_size, top_k, seed)
    return [ngram_entropy(t) for t in texts]


def mean_or_none(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return fmean(vals) if vals else None


def factors_for(stats, layers: Sequence[int]) -> dict:
    """Cholesky factors per layer from a collect_stats result, computed once: every later
    edit batch then costs O(d²n) instead of refactoring C."""
    from ..solver import factorize

    # mean() is a fresh tensor: factor it in place rather than beside a copy.
    return {layer: factorize(stats.stats[layer].mean(), overwrite_c=True) for layer in layers}
