"""Preservation statistics C = E[k kᵀ] of rewrite-module inputs (keys).

    from pmsolve.stats import collect_stats
    res = collect_stats(model, tok, [4, 5, 6], "wiki.jsonl", max_tokens=2_000_000, cache_dir="stats")
    C4 = res.stats[4].mean()            # fp64 d × d, ready for pmsolve.factorize

Building blocks: :class:`CovarianceAccumulator` (streaming, mergeable, native or
torch), :func:`open_corpus` (text/JSONL/HF datasets/offline default), and the
reference ``.npz`` reader/writer in :mod:`pmsolve.stats.io`. :func:`load_stats` finds
precomputed statistics for given layers in a folder (ours or the reference's files).
"""

from .accumulator import CovarianceAccumulator
from .collect import CollectResult, collect_stats, load_stats, merge_stats, weights_fingerprint
from .corpus import Corpus, offline_default, open_corpus
from .io import read_reference_npz, write_reference_npz

__all__ = [
    "CollectResult",
    "Corpus",
    "CovarianceAccumulator",
    "collect_stats",
    "load_stats",
    "merge_stats",
    "offline_default",
    "open_corpus",
    "read_reference_npz",
    "weights_fingerprint",
    "write_reference_npz",
]
