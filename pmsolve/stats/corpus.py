"""Text corpora for preservation statistics: deterministic document streams with an id.

    open_corpus("notes.txt")           plain text; documents separated by blank lines
    open_corpus("wiki.jsonl")          one JSON object per line, field "text"
    open_corpus("/data/wiki_saved")    a Hugging Face dataset saved with save_to_disk
    open_corpus("hf:wikitext:wikitext-103-raw-v1:train")   by name (needs `datasets` and a network)
    open_corpus(None) / "offline"      the offline default (below)

The id (stored in cache metadata) names the source and, for files, a hash of
their content, so statistics from different text never share a cache entry.

Offline default ("offline-pydocs"): English prose that ships with every
CPython installation, read without importing anything:
  1. the Python Language Reference topics behind ``help()`` (``pydoc_data.topics``,
     ~0.46 M characters), in sorted topic order;
  2. docstrings of at least 200 characters from the standard library's ``.py``
     sources (modules, classes, functions; tests excluded), ~1.3 M characters,
     in sorted path order;
interleaved (one topic per 30 docstrings) so that short runs see both.
About 0.4 M tokens with a Llama-style tokenizer. It is technical English about
programming with code fragments mixed in: fine for smoke tests, for checking
that a pipeline runs, and for a rough C on machines with no data, but far
narrower than the Wikipedia text the reference statistics use (no narrative,
biography, geography or news). Statistics from it are a stand-in; pass a real
corpus for edits that must preserve general knowledge.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

_MIN_DOCSTRING = 200
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


@dataclass(frozen=True)
class Corpus:
    """A deterministic stream of documents. ``id`` identifies the content for caches."""

    id: str
    description: str
    _texts: Callable[[], Iterator[str]]

    def texts(self) -> Iterator[str]:
        """Non-empty documents, always in the same order."""
        return (t for t in self._texts() if t and t.strip())


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _text_file(path: Path) -> Corpus:
    def texts() -> Iterator[str]:
        para: list[str] = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    para.append(line.rstrip("\n"))
                elif para:
                    yield "\n".join(para)
                    para = []
        if para:
            yield "\n".join(para)

    return Corpus(f"text:{path.name}:{_file_digest(path)}", f"plain text file {path}", texts)


def _jsonl_file(path: Path, field: str) -> Corpus:
    def texts() -> Iterator[str]:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)[field]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise InputError(f"{path}:{lineno}: not a JSON object with a {field!r} string ({exc})") from None
                yield _document(value, f"{path}:{lineno}", field)

    return Corpus(f"jsonl:{path.name}:{field}:{_file_digest(path)}", f"JSONL file {path} (field {field!r})", texts)


def _document(value: object, where: str, field: str) -> str:
    """A document's text: a string, or "" for a missing value (null / None: skipped, as empty
    documents are); anything else is an error naming where it is."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: field {field!r} holds a value of type {type(value).__name__}, not a string")
    return value


def _import_datasets():  # type: ignore[no-untyped-def]
    try:
        import datasets
    except ImportError:
        raise InputError("reading Hugging Face datasets needs the `datasets` package (pip install datasets)") from None
    return datasets


def _hf_texts(ds, field: str, source: str) -> Callable[[], Iterator[str]]:  # type: ignore[no-untyped-def]
    """The field's values row by row, checked for the column up front (the error lists the ones
    there are) and for strings as rows are read (the error names the row)."""
    columns = list(getattr(ds, "column_names", None) or [])
    if field not in columns:
        raise InputError(f"{source} has no column {field!r}; its columns: {columns} (pick one with field=, or "
                         "--corpus-field on the command line)")
    only = ds.select_columns([field]) if hasattr(ds, "select_columns") else ds  # rows decode only this column
    return lambda: (_document(row[field], f"{source}, row {i}", field) for i, row in enumerate(only))


def _hf_saved(path: Path, field: str) -> Corpus:
    ds = _import_datasets().load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take "train" when present
        ds = ds["train"] if "train" in ds else ds[sorted(ds.keys())[0]]
    fingerprint = getattr(ds, "_fingerprint", "unknown")
    source = f"saved Hugging Face dataset {path}"
    return Corpus(f"hf-disk:{path.name}:{field}:{fingerprint}", source, _hf_texts(ds, field, source))


def _hf_named(spec: str, field: str) -> Corpus:
    name, config, split = (spec.split(":") + [None, None])[:3]
    if not name:
        raise InputError(f"'hf:{spec}': name the dataset, as hf:NAME[:CONFIG[:SPLIT]]")
    ds = _import_datasets().load_dataset(name, config or None, split=split or "train")
    source = f"Hugging Face dataset {spec}"
    fingerprint = getattr(ds, "_fingerprint", "unknown")
    return Corpus(f"hf:{name}:{config}:{split or 'train'}:{field}:{fingerprint}", source, _hf_texts(ds, field, source))


def _stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= _MIN_DOCSTRING:
                        yield doc


def _offline_texts() -> Iterator[str]:
    """Reference topics and docstrings interleaved (one topic per 30 docstrings, about their size
    ratio), so that a short run already sees both kinds of text."""
    from pydoc_data.topics import topics

    reference = (topics[key] for key in sorted(topics))
    for i, doc in enumerate(_stdlib_docstrings()):
        if i % 30 == 0:
            yield from (t for t in [next(reference, None)] if t)
        yield doc
    yield from reference


def offline_default() -> Corpus:
    v = sys.version_info
    return Corpus(
        f"offline-pydocs/2:py{v.major}.{v.minor}.{v.micro}",
        "Python reference topics and standard-library docstrings (offline default; see pmsolve.stats.corpus)",
        _offline_texts,
    )


def open_corpus(spec: str | os.PathLike[str] | Corpus | None = None, *, field: str = "text") -> Corpus:
    """Resolve a corpus: a Corpus, None/"offline", "hf:name[:config[:split]]", or a path (.txt, .jsonl, saved dataset)."""
    if isinstance(spec, Corpus):
        return spec
    if spec is None or spec in ("offline", "default"):
        return offline_default()
    text = os.fspath(spec)
    if text.startswith("hf:"):
        return _hf_named(text[3:], field)
    path = Path(text)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _hf_saved(path, field)
        raise InputError(f"{path} is a folder but not a dataset saved with save_to_disk")
    if not path.exists():
        raise InputError(f"corpus {text!r} is neither a file, a saved dataset, 'offline', nor 'hf:<name>'")
    if path.suffix in (".jsonl", ".ndjson"):
        return _jsonl_file(path, field)
    return _text_file(path)


def shard(texts: Iterator[str], rank: int, world: int) -> Iterator[str]:
    """Documents rank, rank + world, rank + 2·world, ... (a data-parallel shard)."""
    for i, t in enumerate(texts):
        if i % world == rank:
            yield t
