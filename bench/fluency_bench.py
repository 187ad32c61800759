"""Fluency change at one batch size, measured on enough generations to resolve a few percent.

`pmsolve experiments` measures fluency on the first batch of each point (64 generations at
batch 64), where the paired standard error is ~2.5 points: per-generation entropy changes
span tens of percent, because an edit makes a greedy continuation fall into a loop or leave
one. This script edits every fact of the experiments' seeded sample in independent batches
(each on the unedited model, like experiment 1), generates from each fact's generation
prompts, and reports the relative change of mean entropy with its paired standard error, next
to the efficacy, paraphrase and neighbourhood scores of the same edits.

    python bench/fluency_bench.py --batch 64 --facts 256 --prompts 1 --out bench/results/fluency-b64.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pmsolve
from pmsolve.editing import preset_for
from pmsolve.editing.keys import cache_dir
from pmsolve.evaluation import generate_texts, ngram_entropy
from pmsolve.evaluation.records import load_builtin_facts
from pmsolve.experiments import runner
from pmsolve.editing.steps import WeightSnapshot
from pmsolve.experiments.precompute import solve_and_apply
from pmsolve.models import load_model

warnings.simplefilter("ignore", pmsolve.NumericalWarning)


def generate(model, tok, prompts: list[str], tokens: int, top_k: int | None,
             seed: int = 0) -> tuple[list[float], list[str]]:
    # Sampled: each prompt draws the same random numbers before and after the edit (paired).
    texts = generate_texts(model, tok, prompts, tokens, batch_size=16, top_k=top_k, seed=seed)
    return [ngram_entropy(t) for t in texts], texts


def change(pre: list[float], post: list[float]) -> dict:
    d = [b - a for a, b in zip(pre, post)]
    m = statistics.fmean(pre)
    return {"n": len(d), "change": statistics.fmean(d) / m, "se": statistics.stdev(d) / math.sqrt(len(d)) / m,
            "per_generation_min": min(x / a for x, a in zip(d, pre)),
            "per_generation_max": max(x / a for x, a in zip(d, pre))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--facts", type=int, default=256)
    p.add_argument("--prompts", type=int, default=1, help="generation prompts per fact")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--alpha", type=float, default=1.0, help="prompt preservation of the emmet-pp series")
    p.add_argument("--value-config", type=json.loads, default=None,
                   help='v* settings over the preset\'s, e.g. \'{"stop_nll": 1e9}\'')
    p.add_argument("--layer", type=int, default=None, help="single edit layer (default: experiments')")
    p.add_argument("--stats-tokens", type=int, default=None, help="statistics tokens per layer (default: experiments')")
    p.add_argument("--series", nargs="*", default=None,
                   help="emmet memit emmet-pp (single layer, as experiment 1; default: these three), "
                        "preset-emmet preset-memit (pmsolve.edit with the preset's layers, spread and key options)")
    p.add_argument("--texts", action="store_true", help="keep every generation (before and after) in the output")
    p.add_argument("--gen-seed", type=int, default=0, help="random numbers of --top-k sampling")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the top k tokens (the reference metric: 5) instead of greedy decoding")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    values = preset_for(model, lm.model_id).values
    if args.value_config:
        values = replace(values, **args.value_config)
    env = runner.setup(model, tok, lm.model_id, load_builtin_facts(), runner.Config(n_facts=args.facts, layer=args.layer, **({"stats_tokens": args.stats_tokens} if args.stats_tokens else {})), cache_dir(),
                       log=lambda s: None, value_config=values)
    facts = list(range(args.facts))
    prompts, owner = [], []
    for i in facts:
        for g in env.records[i].generation_prompts[: args.prompts]:
            prompts.append(g)
            owner.append(i)
    t0 = time.perf_counter()
    pre, pre_texts = generate(model, tok, prompts, args.tokens, args.top_k, args.gen_seed)
    out = {"batch": args.batch, "layer": env.layer, "facts": args.facts, "generations": len(prompts), "tokens": args.tokens,
           "decoding": "greedy" if args.top_k is None else f"top-{args.top_k} sampling, seed {args.gen_seed}, per-prompt random numbers",
           "value_config": asdict(values), "statistics": env.corpus, "unedited_s": time.perf_counter() - t0, "series": {}}
    if args.texts:
        out["unedited"] = pre_texts
    series = {"emmet": ("emmet", None, "average", 0.0), "memit": ("memit", env.memit_mu, "average", 0.0),
              runner.PP_SERIES: ("emmet", None, "prompt", args.alpha)}
    presets = {"preset-emmet": "emmet", "preset-memit": "memit"}
    if args.series:
        unknown = set(args.series) - set(series) - set(presets)
        if unknown:
            p.error(f"unknown series {sorted(unknown)}")
        series = {k: series.get(k) for k in args.series}
    snap = WeightSnapshot(model)
    spread_values: dict = {}  # v* per fact, shared by the preset series (same unedited model)
    for label, spec in series.items():
        post, post_texts, parts = [0.0] * len(prompts), [""] * len(prompts), []
        for s in range(0, len(facts), args.batch):
            chunk = facts[s : s + args.batch]
            if spec is None:  # the preset's way, through pmsolve.edit (every layer it edits restored below)
                res = pmsolve.edit(model, tok, env.requests(chunk), method=presets[label], stats=env.factors,
                                   seed=env.config.seed, model_id=lm.model_id, value_config=values,
                                   value_cache=spread_values)
                restore = res.restore
            else:
                method, mu, source, alpha = spec
                solve_and_apply(snap, env.factors[env.layer], env.facts, chunk, method, mu, key_source=source,
                                preserve_prompts=alpha, tokenizer=tok, seed=env.config.seed)
                restore = snap.restore
            try:
                members = set(chunk)
                rows = [j for j, i in enumerate(owner) if i in members]
                texts = generate(model, tok, [prompts[j] for j in rows], args.tokens, args.top_k, args.gen_seed)
                for j, e, text in zip(rows, *texts):
                    post[j], post_texts[j] = e, text
                parts.append(runner.score(env, chunk, full=chunk))
            finally:
                restore()
        scores = runner.summarise(parts)
        out["series"][label] = {**change(pre, post), **{k: scores[k] for k in ("es", "ps", "ns")}}
        if args.texts:
            out["series"][label]["generations"] = [{"fact": i, "entropy_before": a, "entropy_after": b, "after": t}
                                                   for i, a, b, t in zip(owner, pre, post, post_texts)]
        print(json.dumps({label: out["series"][label]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
