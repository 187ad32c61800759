"""`pmsolve eval --sequential`: the sequential editing benchmark (pmsolve.experiments.sequential)
on the command line. The options are registered on `pmsolve eval` (evaluate.py); this module maps
them onto the library and prints the results.

    pmsolve eval --sequential                                   # SmolLM2, 2000 CounterFact edits, memit+emmet
    pmsolve eval --sequential --methods memit --edits 500 --checkpoints 100,500 --out runs/seq
    pmsolve eval --sequential --time-limit 60                   # stop starting batches after 60 min; rerun resumes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ._args import json_object, nonneg_int, positive_int


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers, got {text!r}")
    return values


def _methods(text: str) -> tuple[str, ...]:
    from ..experiments.sequential import METHODS

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"methods must be some of {','.join(METHODS)}, got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sequential benchmark (--sequential)")
    g.add_argument("--sequential", action="store_true",
                   help="edit the records batch after batch into one model and score all edits so far at "
                        "checkpoints (default data: shared/data/counterfact-flat.jsonl beside the checkout)")
    g.add_argument("--methods", type=_methods, default=("memit", "emmet"),
                   help="comma-separated: memit, emmet (baselines: preserve_edits=0), alphaedit, "
                        "alphaedit+gamma (γ·C inside the kept directions, c_weight 3000), memit+beta, "
                        "emmet+beta, hard (on pmsolve.Editor); default memit,emmet")
    g.add_argument("--edits", type=positive_int, default=2000, help="facts edited in all (default 2000)")
    g.add_argument("--checkpoints", type=_ints, default=(500, 1000, 2000),
                   help="edit counts after which all edits so far are scored (default 500,1000,2000)")
    g.add_argument("--eval-sample", type=positive_int, default=500,
                   help="paraphrase/neighbourhood success on at most this many of the edits so far (seeded "
                        "subsample; efficacy on all; default 500)")
    g.add_argument("--fluency-sample", type=nonneg_int, default=100,
                   help="generations per checkpoint for fluency (default 100; 0: none)")
    g.add_argument("--ppl-tokens", type=positive_int, default=16_384,
                   help="held-out tokens for perplexity (default 16384)")
    g.add_argument("--null-space", type=json_object, default=None, metavar="JSON",
                   help="alphaedit's settings, e.g. '{\"c_weight\": 300}' (threshold, relative_to, alpha, c_weight; "
                        "default the paper's); for alphaedit and alphaedit+gamma; part of the run's identity")
    g.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="start no new batch after this many minutes (the run folder resumes later)")


def run(args: argparse.Namespace) -> int:
    from ..editing.keys import cache_dir
    from ..errors import PMSolveError
    from ..experiments import sequential as seq
    from .edit import key_options, load

    null_space_methods = [m for m in args.methods if m.startswith("alphaedit")]
    if args.null_space and not null_space_methods:
        print("pmsolve eval --sequential: --null-space sets alphaedit's projector: add alphaedit or "
              "alphaedit+gamma to --methods", file=sys.stderr)
        return 2
    if args.stats:
        print("pmsolve eval --sequential: --stats is not supported here: the statistics are the cached offline "
              "ones (--corpus, --stats-tokens)", file=sys.stderr)
        return 2
    bs = args.batch_size or 100
    cfg = seq.SequentialConfig(edits=args.edits, batch_size=bs, checkpoints=args.checkpoints, seed=args.seed,
                               eval_sample=args.eval_sample, fluency_sample=args.fluency_sample,
                               max_new_tokens=args.max_new_tokens, fluency_top_k=args.fluency_top_k or None,
                               ppl_tokens=args.ppl_tokens, stats_tokens=args.stats_tokens)
    try:
        cfg.check()
        records = seq.select_records(args.data, cfg)
    except seq.DataUnavailable as exc:
        if args.data is None:  # the default file is absent on this machine: nothing to run
            print(f"pmsolve eval --sequential: skipped: {exc}", file=sys.stderr)
            return 0
        print(f"pmsolve eval --sequential: error: {exc}", file=sys.stderr)
        return 2
    except PMSolveError as exc:
        print(f"pmsolve eval --sequential: error: {exc}", file=sys.stderr)
        return 2
    lm = load(args)
    opts = {k: v for k, v in {**key_options(args), "distribution": args.distribution, "mu": args.mu,
                              "preset": args.preset, "model_id": lm.model_id, "layers": args.layers}.items()
            if v is not None}
    opts.pop("preserve_edits", None)  # each method sets its own
    from .._io import content_hash
    from ..stats import weights_fingerprint

    out = Path(args.out) if args.out else cache_dir() / "sequential" / content_hash(
        {"model": lm.model_id, "fingerprint": weights_fingerprint(lm.model), "data": str(args.data),
         "config": cfg.identity(), "options": {k: v for k, v in opts.items() if k != "model_id"}})
    stats = "auto"
    print(f"run folder: {out} (rerun the same command to resume)", file=sys.stderr)
    stop_at = time.time() + 60 * args.time_limit if args.time_limit else None
    method_options = {m: dict(opts) for m in args.methods}
    for m in null_space_methods if args.null_space else ():  # over alphaedit+gamma's default γ
        method_options[m]["null_space"] = dict(args.null_space)
    result = seq.run(lm.model, lm.tokenizer, records, cfg, out, methods=args.methods, stats=stats,
                     model_id=lm.model_id, method_options=method_options, stop_at=stop_at,
                     corpus=args.corpus)
    print(seq.report(result["rows"], result["solver_times"]))
    try:
        print(f"curve: {seq.plot_curve(result['rows'], out / 'curve.png')}", file=sys.stderr)
    except ImportError:
        print("no curve.png: matplotlib is not installed (pip install 'pmsolve[experiments]')", file=sys.stderr)
    if result["skipped"]:
        print(json.dumps({"not run": result["skipped"]}, indent=1))
    print(f"wrote {out}/results.jsonl, {out}/timings.json, per method {out}/<method>/", file=sys.stderr)
    return 0
