"""Batch evaluation of edits (what `pmsolve eval` runs): every batch of records is edited into
the unedited model with :func:`pmsolve.edit`, scored, and restored.

    from pmsolve.evaluation.pipeline import EvalSettings, evaluate_edits, load_indexed
    indexed, malformed = load_indexed("cf.jsonl")
    summary = evaluate_edits(model, tokenizer, indexed, stats, EvalSettings(layers=[4]), "runs/cf")

Pre-edit scores are computed once per (model weights, records, settings) and cached. Results
are written as they come: DIR/records.jsonl (one line per record), DIR/errors.json (malformed
records and failed batches, with record indices) and DIR/summary.json (aggregate so far,
"complete": false until the end). A run with the same configuration in the same DIR resumes
after the last finished batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import cached_json, content_hash, write_json
from ..errors import InputError, PMSolveError
from ..models.document_start import document_start_tag
from .metrics import evaluate_records, harmonic_score, mean_or_none, record_fluency, relative_change

BASELINE_VERSION = 1  # in the baseline cache key: bump when what a baseline holds changes
METRICS = ("efficacy", "paraphrase_success", "neighborhood_success", "efficacy_magnitude",
           "paraphrase_magnitude", "neighborhood_magnitude", "fluency")


@dataclass(frozen=True)
class EvalSettings:
    """How records are edited and scored.

    ``edit_options`` are further :func:`pmsolve.edit` keyword arguments (distribution, mu,
    preset, key options, value_config, model_id). Fluency: the entropy of ``max_new_tokens``
    generated after each record's first ``generations`` generation prompts (0 tokens: skip),
    sampled from the top ``fluency_top_k`` tokens (None: greedy). ``on_error``: "raise" stops
    at a batch whose edit fails, "skip" reports it and goes on."""

    layers: Sequence[int]
    method: str = "emmet"
    batch_size: int = 16
    seed: int = 0
    max_new_tokens: int = 100
    generations: int = 1
    fluency_top_k: int | None = 5
    on_error: str = "raise"
    edit_options: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.method == "rome" and self.batch_size != 1:
            raise InputError("ROME edits one fact per solve: batch_size must be 1")
        if self.on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.fluency_top_k is not None and self.fluency_top_k < 1:
            raise InputError(f"fluency_top_k must be a positive int or None (greedy), got {self.fluency_top_k!r}")


# ---------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------


def load_indexed(data: str | os.PathLike[str] | None, fmt: str = "auto"
                 ) -> tuple[list[tuple[int, Any]], list[dict[str, Any]]]:
    """(index, record) pairs of the valid records of a JSON/JSONL file (None: the built-in
    facts) and {index, error} for the others. A record is invalid if it does not parse or if
    the editor would reject it as a request (checked here, before any model is loaded)."""
    from ..editing.requests import validate
    from .records import BUILTIN_FACTS, parse_records, read_json_records

    raw = read_json_records(data or BUILTIN_FACTS)
    errors: list[dict[str, Any]] = []
    good: list[tuple[int, Any]] = []
    for i, item in enumerate(raw):
        recs, errs = parse_records([item], fmt)
        if errs:
            errors.append({"index": i, "error": str(errs[0]).removeprefix("record 0: ")})
            continue
        try:
            validate([recs[0].as_request()])
        except PMSolveError as exc:
            errors.append({"index": i, "error": str(exc).removeprefix("request 0: ")})
            continue
        good.append((i, recs[0]))
    return good, errors


# ---------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------


def score_records(model, tokenizer, records: Sequence[Any], settings: EvalSettings) -> list[dict[str, Any]]:
    """Per record: the evaluation scores and its fluency (see EvalSettings)."""
    rows = evaluate_records(model, tokenizer, records).records
    if settings.max_new_tokens <= 0 or settings.generations <= 0:
        return [dict(r, fluency=None) for r in rows]
    flu = record_fluency(model, tokenizer, records, generations=settings.generations,
                         max_new_tokens=settings.max_new_tokens, top_k=settings.fluency_top_k, seed=settings.seed)
    return [dict(r, fluency=f) for r, f in zip(rows, flu)]


def baseline(model, tokenizer, indexed: Sequence[tuple[int, Any]], settings: EvalSettings, cache_dir: Path,
             fingerprint: str) -> tuple[dict[int, dict[str, Any]], bool, Path]:
    """Pre-edit scores per record index, cached by weights fingerprint, records and the
    settings that change them: (scores, cache hit, cache file)."""
    key = content_hash({"records": [(i, r.to_dict()) for i, r in indexed], "max_new_tokens": settings.max_new_tokens,
                        "generations": settings.generations, "version": BASELINE_VERSION,
                        "fluency_top_k": settings.fluency_top_k, "fluency_seed": settings.seed,
                        "document_start": document_start_tag(tokenizer)})
    path = Path(cache_dir) / "eval-baselines" / f"{fingerprint}-{key}.json"

    def compute() -> dict[str, Any]:
        rows = score_records(model, tokenizer, [r for _, r in indexed], settings)
        return {str(i): row for (i, _), row in zip(indexed, rows)}

    data, hit = cached_json(path, compute)
    return {int(k): v for k, v in data.items()}, hit, path


def aggregate(lines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over records of the pre- and post-edit metrics, Score, and the fluency change."""
    out: dict[str, Any] = {"n_records": len(lines)}
    for when in ("pre", "post"):
        m = {k: mean_or_none([ln[when].get(k) for ln in lines]) for k in METRICS}
        m["score"] = harmonic_score(m["efficacy"], m["paraphrase_success"], m["neighborhood_success"])
        out[when] = m
    out["fluency_change_relative"] = relative_change(out["pre"]["fluency"], out["post"]["fluency"])
    return out


def edit_and_score(model, tokenizer, batch: Sequence[tuple[int, Any]], factors, settings: EvalSettings
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Edit the batch's records into the model, score them, restore the model: (scores per
    record, a summary of the edit)."""
    from ..editing import edit

    result = edit(model, tokenizer, [r.as_request() for _, r in batch], method=settings.method,
                  layers=list(settings.layers), stats=factors, seed=settings.seed, **settings.edit_options)
    try:
        post = score_records(model, tokenizer, [r for _, r in batch], settings)
    finally:
        result.restore()
    info = {"timings": result.timings,
            "layers": [{"layer": e.layer, "cond_G": e.update.diagnostics.cond_G, "mu": e.update.diagnostics.mu,
                        "ridge_fallback": e.update.diagnostics.ridge_fallback,
                        "residual": e.update.diagnostics.residual, "residual_rounded": e.residual_rounded}
                       for e in result.edits]}
    return post, info


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def resume_lines(out: Path, config: Mapping[str, Any], fresh: bool = False) -> list[dict[str, Any]]:
    """Lines of a previous run of the same configuration in ``out`` (empty, and records.jsonl
    emptied, when starting over)."""
    try:
        same = not fresh and json.loads((out / "run.json").read_text()) == config
        lines = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines() if x.strip()] if same else []
    except (OSError, ValueError):
        lines = []
    if not lines:
        (out / "records.jsonl").write_text("")
    return lines


def write_errors(out: Path, malformed: Sequence[Mapping[str, Any]], failed: Sequence[Mapping[str, Any]] = ()) -> None:
    write_json(out / "errors.json", {"malformed": list(malformed), "failed_batches": list(failed)})


def write_summary(out: Path, config: Mapping[str, Any], done: Sequence[Mapping[str, Any]],
                  malformed: Sequence[Any], failed: Sequence[Mapping[str, Any]], *, complete: bool) -> dict[str, Any]:
    summary = {**aggregate(done), "complete": complete, "config": dict(config), "n_malformed": len(malformed),
               "n_failed_records": sum(len(f["indices"]) for f in failed),
               "edit_seconds": sum(sum(ln["edit"]["timings"].values()) for ln in done if ln["edit"])}
    write_json(out / "summary.json", summary)
    return summary


def evaluate_edits(model, tokenizer, indexed: Sequence[tuple[int, Any]], stats, settings: EvalSettings,
                   out: str | os.PathLike[str], *, config: Mapping[str, Any] | None = None,
                   malformed: Sequence[Mapping[str, Any]] = (), cache_dir: str | os.PathLike[str] | None = None,
                   fingerprint: str | None = None, resume: bool = True, progress: bool = True,
                   log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> dict[str, Any]:
    """Edit, score and restore ``indexed`` (from :func:`load_indexed`) batch by batch.

    ``stats``: the preservation statistics of ``settings.layers``, anything pmsolve.edit takes
    (factored once here). ``config``: everything that decides the results (a previous run in
    ``out`` resumes only when it is equal; default: settings, records and weights).
    ``malformed`` records are reported in errors.json. Returns the summary (also in
    ``out``/summary.json); a failed batch raises with ``on_error="raise"``."""
    from tqdm.auto import tqdm

    from ..editing.keys import cache_dir as default_cache_dir
    from ..editing.steps import factor_stats
    from ..models.adapters import adapter_for
    from ..stats import weights_fingerprint

    settings.check()
    if not indexed:
        raise InputError("no valid records to evaluate")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = fingerprint or weights_fingerprint(model)
    if config is None:
        config = {"fingerprint": fingerprint, "records_hash": content_hash([(i, r.to_dict()) for i, r in indexed]),
                  "settings": content_hash(repr(settings))}
    done = resume_lines(out, config, not resume)
    write_json(out / "run.json", dict(config))
    t0 = time.perf_counter()
    pre, hit, path = baseline(model, tokenizer, indexed, settings, Path(cache_dir or default_cache_dir()), fingerprint)
    log(f"pre-edit baseline: {'cache hit' if hit else 'computed'} ({path}, {time.perf_counter() - t0:.1f}s)")
    model_id = settings.edit_options.get("model_id")
    factors = factor_stats(stats, list(settings.layers), adapter_for(model), model_id)
    finished = {ln["batch"] for ln in done}
    failed: list[dict[str, Any]] = []
    write_errors(out, malformed)
    b_size = settings.batch_size
    batches = [list(indexed[i : i + b_size]) for i in range(0, len(indexed), b_size)]
    bar = tqdm(total=len(batches), initial=len(finished), desc=f"eval {settings.method}", unit="batch",
               file=sys.stderr, disable=not progress)
    for b, batch in enumerate(batches):
        if b in finished:
            continue
        try:
            post, info = edit_and_score(model, tokenizer, batch, factors, settings)
        except PMSolveError as exc:
            failed.append({"batch": b, "indices": [i for i, _ in batch], "error": str(exc)})
            write_errors(out, malformed, failed)
            if settings.on_error == "raise":
                write_summary(out, config, done, malformed, failed, complete=False)
                raise
            bar.update(1)
            continue
        new = [{"index": i, "batch": b, "subject": r.subject, "target_new": r.target_new, "pre": pre[i],
                "post": p, "edit": info if k == 0 else None} for k, ((i, r), p) in enumerate(zip(batch, post))]
        with (out / "records.jsonl").open("a") as fh:
            fh.writelines(json.dumps(x) + "\n" for x in new)
        done += new
        summary = write_summary(out, config, done, malformed, failed, complete=False)
        bar.set_postfix_str(f"ES {summary['post']['efficacy']:.2f} NS {summary['post']['neighborhood_success']:.2f}")
        bar.update(1)
    bar.close()
    return write_summary(out, config, done, malformed, failed, complete=True)
