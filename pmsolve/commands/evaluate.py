"""`pmsolve eval`: edit records batch by batch, score each batch, restore, repeat.

    pmsolve eval --out runs/emmet16                                  # built-in facts, EMMET, batch 16
    pmsolve eval --data cf.json --format counterfact --method memit --batch-size 64 --out runs/cf

Every batch is edited into the unedited model, evaluated (efficacy, paraphrase and
neighbourhood success, magnitudes, generation entropy) and restored. Pre-edit scores are
computed once per (model weights, records, settings) and cached. Results are written as
they come: DIR/records.jsonl (one line per record), DIR/errors.json (malformed records
and failed batches, with record indices) and DIR/summary.json (aggregate so far,
"complete": false until the end). A rerun with the same settings and DIR resumes after
the last finished batch. The pipeline is pmsolve.evaluation.pipeline; this module maps
the command line onto it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .._io import content_hash
from ..errors import PMSolveError
from ..evaluation import pipeline
from . import sequential
from ._args import nonneg_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .edit import add_common

    p = sub.add_parser("eval", help="edit and evaluate records (CounterFact/zsRE-style scores, fluency)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="records file, JSON or JSONL (default: the built-in facts)")
    p.add_argument("--format", default="auto", choices=["auto", "builtin", "counterfact", "flat", "zsre"])
    add_common(p)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="records edited together (default 16; with --sequential 100)")
    p.add_argument("--out", default=None, help="output folder (required; with --sequential the run folder, "
                                               "default under the pmsolve cache)")
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
    sequential.add_arguments(p)
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace, layers: list[int], model_id: str | None) -> pipeline.EvalSettings:
    from .edit import key_options

    return pipeline.EvalSettings(
        layers=layers, method=args.method, batch_size=args.batch_size, seed=args.seed,
        max_new_tokens=args.max_new_tokens, generations=args.generations, fluency_top_k=_top_k(args),
        on_error=args.on_error,
        edit_options={"distribution": args.distribution, "mu": args.mu, "preset": args.preset, "model_id": model_id,
                      **key_options(args)})


def _config(args: argparse.Namespace, indexed, fingerprint: str, layers: list[int],
            document_start: str | None, stats_autocast: str | None = None) -> dict[str, Any]:
    """Everything that changes the results: a previous run resumes only when all of it matches."""
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


def _top_k(args: argparse.Namespace) -> int | None:
    return args.fluency_top_k or None  # 0: greedy


def run(args: argparse.Namespace) -> int:
    if args.sequential:
        return sequential.run(args)
    if args.out is None:
        print("pmsolve eval: --out is required", file=sys.stderr)
        return 2
    if args.batch_size is None:
        args.batch_size = 16
    if args.batch_size < 1 or (args.method == "rome" and args.batch_size != 1):
        print(f"pmsolve eval: --batch-size must be ≥ 1 (and 1 for ROME), got {args.batch_size}", file=sys.stderr)
        return 2
    if args.fluency_top_k < 0:
        print(f"pmsolve eval: --fluency-top-k must be ≥ 0 (0: greedy), got {args.fluency_top_k}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        indexed, malformed = pipeline.load_indexed(args.data, args.format)
    except PMSolveError as exc:
        print(f"pmsolve eval: error: {exc}", file=sys.stderr)
        return 2
    pipeline.write_errors(out, malformed)
    for m in malformed[:20]:
        print(f"record {m['index']}: {m['error']}", file=sys.stderr)
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


def _run(args, out: Path, indexed, malformed) -> int:
    from ..models.precision import resolve_autocast
    from ..stats import collect_stats, load_stats, weights_fingerprint
    from .edit import load, note_ignored_corpus

    cache_dir = _cache_dir(args)
    lm = load(args)
    fingerprint = weights_fingerprint(lm.model)
    layers = _layers(args, lm.model)
    stats_autocast = resolve_autocast("auto", next(lm.model.parameters()).device)  # as edit(stats="auto")
    config = _config(args, indexed, fingerprint, layers, lm.document_start, stats_autocast)
    if args.stats:
        note_ignored_corpus(args, "eval")
        stats = load_stats(args.stats, lm.model, layers)
    else:
        stats = collect_stats(lm.model, lm.tokenizer, layers, args.corpus, max_tokens=args.stats_tokens,
                              cache_dir=cache_dir / "stats", model_id=lm.model_id, progress=True,
                              autocast=stats_autocast)
    summary = pipeline.evaluate_edits(lm.model, lm.tokenizer, indexed, stats, _settings(args, layers, lm.model_id),
                                      out, config=config, malformed=malformed, cache_dir=cache_dir,
                                      fingerprint=fingerprint, resume=not args.no_resume)
    print(json.dumps({k: summary[k] for k in ("n_records", "pre", "post", "fluency_change_relative")}, indent=1))
    print(f"wrote {out}/summary.json, {out}/records.jsonl, {out}/errors.json", file=sys.stderr)
    return 0 if not summary["n_failed_records"] else 1


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
