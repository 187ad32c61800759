"""`pmsolve eval`: edit records batch by batch, score each batch, restore, repeat.

    pmsolve eval --out runs/emmet16                                  # built-in facts, EMMET, batch 16
    pmsolve eval --data cf.json --format counterfact --method memit --batch-size 64 --out runs/cf

Every batch is edited into the unedited model, evaluated (efficacy, paraphrase and
neighbourhood success, magnitudes, generation entropy) and restored. Pre-edit scores are
computed once per (model weights, records, settings) and cached. Results are written as
they come: DIR/records.jsonl (one line per record), DIR/errors.json (malformed records
and failed batches, with record indices) and DIR/summary.json (aggregate so far,
"complete": false until the end). A rerun with the same settings and DIR resumes after
the last finished batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import PMSolveError
from ..models.document_start import document_start_tag
from ._args import nonneg_int, positive_int

_EVAL_VERSION = 1  # bump when what a baseline contains changes


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .edit import add_common

    p = sub.add_parser("eval", help="edit and evaluate records (CounterFact/zsRE-style scores, fluency)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="records file, JSON or JSONL (default: the built-in facts)")
    p.add_argument("--format", default="auto", choices=["auto", "builtin", "counterfact", "flat", "zsre"])
    add_common(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="records edited together (default 16)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="malformed records / failing batches: stop (default) or report and skip")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N valid records")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=100, help="generation length for fluency (0: skip)")
    p.add_argument("--fluency-top-k", type=nonneg_int, default=5,
                   help="fluency generations sample from the top K tokens (default 5, as the reference metric; "
                        "each prompt draws the same random numbers before and after the edit); 0: greedy")
    p.add_argument("--generations", type=positive_int, default=1,
                   help="generation prompts per record used for fluency (default 1; each costs a generation)")
    p.add_argument("--cache-dir", default=None, help="baseline/statistics cache (default: the pmsolve cache)")
    p.add_argument("--no-resume", action="store_true", help="start over even if DIR has a matching run")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------


def load_indexed(data: str | None, fmt: str) -> tuple[list[tuple[int, Any]], list[dict[str, Any]]]:
    """(index, record) pairs of the valid records and {index, error} for the others.

    A record is invalid if it does not parse, or if the editor would reject it as a
    request (checked here, before any model is loaded)."""
    from ..editing.requests import validate
    from ..evaluation.records import BUILTIN_FACTS, parse_records, read_json_records

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


def score(model, tokenizer, records: list, max_new_tokens: int, generations: int,
          top_k: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Per record: the evaluation scores and the mean generation entropy of its first
    ``generations`` generation prompts (greedy, or sampled from the top_k tokens)."""
    from ..evaluation import evaluate_records
    from ..experiments.common import fluency, mean_or_none

    rows = evaluate_records(model, tokenizer, records).records
    if max_new_tokens <= 0 or generations <= 0:
        return [dict(r, fluency=None) for r in rows]
    owners = [i for i, r in enumerate(records) for _ in r.generation_prompts[:generations]]
    ent = fluency(model, tokenizer, [p for r in records for p in r.generation_prompts[:generations]],
                  max_new_tokens=max_new_tokens, top_k=top_k, seed=seed)
    per = [[e for o, e in zip(owners, ent) if o == i] for i in range(len(records))]
    return [dict(r, fluency=mean_or_none(f)) for r, f in zip(rows, per)]


def baseline(model, tokenizer, indexed: list[tuple[int, Any]], cache_dir: Path, max_new_tokens: int,
             generations: int, fingerprint: str, top_k: int | None = None,
             seed: int = 0) -> tuple[dict[int, dict[str, Any]], bool, Path]:
    """Pre-edit scores per record index, cached by weights fingerprint + records + settings."""
    from ..experiments.common import cached_json, content_hash

    key = content_hash({"records": [(i, r.to_dict()) for i, r in indexed], "max_new_tokens": max_new_tokens,
                        "generations": generations, "version": _EVAL_VERSION, "fluency_top_k": top_k,
                        "fluency_seed": seed,
                        "document_start": document_start_tag(tokenizer)})
    path = cache_dir / "eval-baselines" / f"{fingerprint}-{key}.json"

    def compute() -> dict[str, Any]:
        rows = score(model, tokenizer, [r for _, r in indexed], max_new_tokens, generations, top_k, seed)
        return {str(i): row for (i, _), row in zip(indexed, rows)}

    data, hit = cached_json(path, compute)
    return {int(k): v for k, v in data.items()}, hit, path


# ---------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------

_METRICS = ("efficacy", "paraphrase_success", "neighborhood_success", "efficacy_magnitude",
            "paraphrase_magnitude", "neighborhood_magnitude", "fluency")


def aggregate(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over records of the pre- and post-edit metrics, Score, and the fluency change."""
    from ..evaluation import harmonic_score
    from ..experiments.common import mean_or_none

    out: dict[str, Any] = {"n_records": len(lines)}
    for when in ("pre", "post"):
        m = {k: mean_or_none([ln[when].get(k) for ln in lines]) for k in _METRICS}
        m["score"] = harmonic_score(m["efficacy"], m["paraphrase_success"], m["neighborhood_success"])
        out[when] = m
    pre_f, post_f = out["pre"]["fluency"], out["post"]["fluency"]
    out["fluency_change_relative"] = None if not pre_f or post_f is None else (post_f - pre_f) / pre_f
    return out


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------


def _config(args: argparse.Namespace, indexed, fingerprint: str, layers: list[int],
            document_start: str | None, stats_autocast: str | None = None) -> dict[str, Any]:
    """Everything that changes the results: a previous run resumes only when all of it matches."""
    from ..experiments.common import content_hash

    return {"model": args.model, "fingerprint": fingerprint, "data": args.data, "format": args.format,
            "records_hash": content_hash([(i, r.to_dict()) for i, r in indexed]), "method": args.method,
            "layers": layers, "distribution": args.distribution, "mu": args.mu, "batch_size": args.batch_size,
            "seed": args.seed, "stats_tokens": args.stats_tokens, "corpus": args.corpus,
            "max_new_tokens": args.max_new_tokens, "generations": args.generations, "preset": args.preset,
            "fluency_top_k": _top_k(args),
            "start_key": args.start_key, "key_source": args.key_source, "preserve_prompts": args.preserve_prompts,
            "values": args.values,
            "document_start": document_start,
            **({"stats": args.stats} if args.stats else {}),
            # the statistics' forward precision (see collect_stats); absent when it is the model's
            # own, so that runs of earlier versions still resume
            **({"stats_autocast": stats_autocast} if stats_autocast and not args.stats else {})}


def _resume(out: Path, config: dict[str, Any], fresh: bool) -> list[dict[str, Any]]:
    """Lines of a previous run of the same configuration in ``out`` (empty when starting over)."""
    try:
        same = not fresh and json.loads((out / "run.json").read_text()) == config
        lines = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines() if x.strip()] if same else []
    except (OSError, ValueError):
        lines = []
    if not lines:
        (out / "records.jsonl").write_text("")
    return lines


def _edit_summary(result) -> dict[str, Any]:
    return {"timings": result.timings,
            "layers": [{"layer": e.layer, "cond_G": e.update.diagnostics.cond_G, "mu": e.update.diagnostics.mu,
                        "ridge_fallback": e.update.diagnostics.ridge_fallback,
                        "residual": e.update.diagnostics.residual, "residual_rounded": e.residual_rounded}
                       for e in result.edits]}


def _edit_and_score(lm, args, batch, layers, factors) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ..editing import edit
    from .edit import key_options

    result = edit(lm.model, lm.tokenizer, [r.as_request() for _, r in batch], method=args.method, layers=layers,
                  distribution=args.distribution, stats=factors, mu=args.mu, seed=args.seed, preset=args.preset,
                  model_id=lm.model_id, **key_options(args))
    try:
        post = score(lm.model, lm.tokenizer, [r for _, r in batch], args.max_new_tokens, args.generations,
                     _top_k(args), args.seed)
        return post, _edit_summary(result)
    finally:
        result.restore()


def _top_k(args: argparse.Namespace) -> int | None:
    return args.fluency_top_k or None  # 0: greedy


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or (args.method == "rome" and args.batch_size != 1):
        print(f"pmsolve eval: --batch-size must be ≥ 1 (and 1 for ROME), got {args.batch_size}", file=sys.stderr)
        return 2
    if args.fluency_top_k < 0:
        print(f"pmsolve eval: --fluency-top-k must be ≥ 0 (0: greedy), got {args.fluency_top_k}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        indexed, malformed = load_indexed(args.data, args.format)
    except PMSolveError as exc:
        print(f"pmsolve eval: error: {exc}", file=sys.stderr)
        return 2
    _report_malformed(out, malformed)
    if malformed and args.on_error == "raise":
        print(f"pmsolve eval: {len(malformed)} malformed record(s), first: record {malformed[0]['index']}: "
              f"{malformed[0]['error']} (see {out}/errors.json; --on-error skip to leave them out)", file=sys.stderr)
        return 2
    if args.limit is not None:
        indexed = indexed[: args.limit]
    if not indexed:
        print("pmsolve eval: no valid records", file=sys.stderr)
        return 2
    try:
        return _run(args, out, indexed, malformed)
    except PMSolveError as exc:
        print(f"pmsolve eval: error: {exc} (partial results in {out})", file=sys.stderr)
        return 1


def _report_malformed(out: Path, malformed: list[dict[str, Any]]) -> None:
    from ..experiments.common import write_json

    write_json(out / "errors.json", {"malformed": malformed, "failed_batches": []})
    for m in malformed[:20]:
        print(f"record {m['index']}: {m['error']}", file=sys.stderr)


def _run(args, out: Path, indexed, malformed) -> int:
    from tqdm.auto import tqdm

    from ..experiments.common import factors_for, write_json
    from ..models.precision import resolve_autocast
    from ..stats import collect_stats, load_stats, weights_fingerprint
    from .edit import load, note_ignored_corpus

    cache_dir = _cache_dir(args)
    lm = load(args)
    fingerprint = weights_fingerprint(lm.model)
    layers = _layers(args, lm.model)
    stats_autocast = resolve_autocast("auto", next(lm.model.parameters()).device)  # as edit(stats="auto")
    config = _config(args, indexed, fingerprint, layers, lm.document_start, stats_autocast)
    done = _resume(out, config, args.no_resume)
    write_json(out / "run.json", config)
    t0 = time.perf_counter()
    pre, hit, path = baseline(lm.model, lm.tokenizer, indexed, cache_dir, args.max_new_tokens, args.generations,
                              fingerprint, _top_k(args), args.seed)
    print(f"pre-edit baseline: {'cache hit' if hit else 'computed'} ({path}, {time.perf_counter() - t0:.1f}s)",
          file=sys.stderr)
    if args.stats:
        note_ignored_corpus(args, "eval")
        stats = load_stats(args.stats, lm.model, layers)
    else:
        stats = collect_stats(lm.model, lm.tokenizer, layers, args.corpus, max_tokens=args.stats_tokens,
                              cache_dir=cache_dir / "stats", model_id=lm.model_id, progress=True,
                              autocast=stats_autocast)
    factors = factors_for(stats, layers)
    finished = {ln["batch"] for ln in done}
    failed: list[dict[str, Any]] = []
    batches = [indexed[i : i + args.batch_size] for i in range(0, len(indexed), args.batch_size)]
    bar = tqdm(total=len(batches), initial=len(finished), desc=f"eval {args.method}", unit="batch", file=sys.stderr)
    for b, batch in enumerate(batches):
        if b in finished:
            continue
        try:
            post, info = _edit_and_score(lm, args, batch, layers, factors)
        except PMSolveError as exc:
            failed.append({"batch": b, "indices": [i for i, _ in batch], "error": str(exc)})
            write_json(out / "errors.json", {"malformed": malformed, "failed_batches": failed})
            if args.on_error == "raise":
                _write_summary(out, config, done, malformed, failed, complete=False)
                raise
            bar.update(1)
            continue
        new = [{"index": i, "batch": b, "subject": r.subject, "target_new": r.target_new, "pre": pre[i],
                "post": p, "edit": info if k == 0 else None} for k, ((i, r), p) in enumerate(zip(batch, post))]
        with (out / "records.jsonl").open("a") as fh:
            fh.writelines(json.dumps(x) + "\n" for x in new)
        done += new
        summary = _write_summary(out, config, done, malformed, failed, complete=False)
        bar.set_postfix_str(f"ES {summary['post']['efficacy']:.2f} NS {summary['post']['neighborhood_success']:.2f}")
        bar.update(1)
    bar.close()
    summary = _write_summary(out, config, done, malformed, failed, complete=True)
    print(json.dumps({k: summary[k] for k in ("n_records", "pre", "post", "fluency_change_relative")}, indent=1))
    print(f"wrote {out}/summary.json, {out}/records.jsonl, {out}/errors.json", file=sys.stderr)
    return 0 if not failed else 1


def _layers(args, model) -> list[int]:
    """--layers, else the preset's layers for the method."""
    from ..editing.presets import load_preset, preset_for
    from ..errors import InputError

    if args.layers:
        return list(args.layers)
    preset = preset_for(model) if args.preset == "auto" else load_preset(args.preset)
    if preset is None:
        raise InputError("no preset matches this model: pass --layers")
    return preset.for_method(args.method).layers


def _cache_dir(args) -> Path:
    from ..editing.keys import cache_dir

    return Path(args.cache_dir) if args.cache_dir else cache_dir()


def _write_summary(out: Path, config, done, malformed, failed, *, complete: bool) -> dict[str, Any]:
    from ..experiments.common import write_json

    summary = {**aggregate(done), "complete": complete, "config": config, "n_malformed": len(malformed),
               "n_failed_records": sum(len(f["indices"]) for f in failed),
               "edit_seconds": sum(sum(ln["edit"]["timings"].values()) for ln in done if ln["edit"])}
    write_json(out / "summary.json", summary)
    return summary
