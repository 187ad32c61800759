"""`pmsolve experiments`: regenerate docs/RESULTS.md and docs/figures/ (seeded, one command).

    pmsolve experiments                      # the full run (long: its timings are in docs/RESULTS.md)
    pmsolve experiments --quick --docs /tmp/x   # a few facts, minutes; for tests
    pmsolve experiments --only sequential    # rerun one experiment, keep the others' results

Keys, values, statistics and the unedited scores are cached (--cache-dir), so a rerun
after a crash redoes only the experiments.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ._args import nonneg_int, parse_layers, positive_int
from .edit import add_document_start, document_start

EXPERIMENTS = ("sweep", "stability", "distribution", "sequential")  # run in this order


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiments", help="run the experiments and write docs/RESULTS.md with figures",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or id (default: built-in SmolLM2)")
    add_document_start(p)
    p.add_argument("--data", default=None, help="records file (default: the built-in facts)")
    p.add_argument("--corpus", default=None, help="text/JSONL corpus for the statistics (default: offline)")
    p.add_argument("--docs", default="docs", help="where RESULTS.md, results.json and figures/ go")
    p.add_argument("--cache-dir", default=None, help="cache for statistics, keys/values, baselines")
    p.add_argument("--quick", action="store_true", help="a reduced run (few facts, short generations)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(EXPERIMENTS)}")
    p.add_argument("--facts", type=positive_int, default=None, help="facts sampled (default 256; quick 8)")
    p.add_argument("--seq-facts", type=positive_int, default=None, help="facts in the sequential experiment")
    p.add_argument("--dist-facts", type=positive_int, default=None, help="facts in the distribution experiment")
    p.add_argument("--stats-tokens", type=positive_int, default=None, help="statistics tokens per layer")
    p.add_argument("--fluency-prompts", type=positive_int, default=None, help="generations per point for fluency (default 64)")
    p.add_argument("--prompt-preservation", type=float, default=None, metavar="ALPHA",
                   help="weight of experiment 1's emmet-pp series (default 1; 0 leaves the series out)")
    p.add_argument("--layer", type=nonneg_int, default=None, help="single edit layer (default: the EMMET preset's)")
    p.add_argument("--spread", type=parse_layers, default=None, help="MEMIT's layers, e.g. 4-8 (default: preset)")
    p.add_argument("--fluency-top-k", type=nonneg_int, default=None,
                   help="fluency generations sample from the top K tokens (default 5, as the reference metric); 0: greedy")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.set_defaults(func=run)


def _config(args):
    from ..experiments.runner import QUICK, Config

    cfg = QUICK if args.quick else Config()
    over = {"n_facts": args.facts, "seq_facts": args.seq_facts, "dist_facts": args.dist_facts,
            "stats_tokens": args.stats_tokens, "layer": args.layer, "fluency_prompts": args.fluency_prompts,
            "prompt_preservation": args.prompt_preservation, "spread": tuple(args.spread) if args.spread else None}
    if args.fluency_top_k is not None:
        if args.fluency_top_k < 0:
            raise SystemExit("pmsolve experiments: --fluency-top-k must be >= 0 (0: greedy)")
        cfg = replace(cfg, fluency_top_k=args.fluency_top_k or None)
    return replace(cfg, seed=args.seed, **{k: v for k, v in over.items() if v is not None})


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options that change results only)."""
    opts = [("model", args.model), ("data", args.data), ("corpus", args.corpus), ("facts", args.facts),
            ("seq_facts", args.seq_facts), ("dist_facts", args.dist_facts), ("stats_tokens", args.stats_tokens),
            ("fluency_prompts", args.fluency_prompts), ("prompt_preservation", args.prompt_preservation),
            ("layer", args.layer), ("spread", ",".join(map(str, args.spread)) if args.spread else None),
            ("fluency_top_k", args.fluency_top_k),
            ("seed", args.seed or None)]
    return "pmsolve experiments" + (" --quick" if args.quick else "") + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in opts if v is not None)


def run(args: argparse.Namespace) -> int:
    from ..editing.keys import cache_dir
    from ..evaluation.records import load_builtin_facts, load_records
    from ..experiments import runner
    from ..models import load_model

    which = args.only.split(",") if args.only else list(EXPERIMENTS)
    unknown = set(which) - set(EXPERIMENTS)
    if unknown:
        print(f"pmsolve experiments: unknown experiment(s) {sorted(unknown)}; choose from {EXPERIMENTS}",
              file=sys.stderr)
        return 2
    cfg = _config(args)
    lm = load_model(args.model, document_start=document_start(args))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    records = load_records(args.data) if args.data else load_builtin_facts()
    env = runner.setup(lm.model, lm.tokenizer, lm.model_id, records, cfg,
                       Path(args.cache_dir) if args.cache_dir else cache_dir(), corpus=args.corpus, log=log)
    files = runner.run_and_report(env, Path(args.docs), which, _command(args))
    print("wrote " + ", ".join(map(str, files)))
    return 0
