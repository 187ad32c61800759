"""Editing benchmarks on SmolLM2-135M-Instruct (docs/design.md §7; the targets of issue #4).

    python bench/editing_bench.py sweep      # choose layers: edit success per candidate layer set
    python bench/editing_bench.py targets    # 32 facts, EMMET and MEMIT (λ sweep), throughput
    python bench/editing_bench.py configs --configs '[{"method": "emmet", "layers": [2],
        "value_config": {"stop_nll": 0.05}, "start_key": false}, ...]'   # any edit() settings

Statistics come from pmsolve.stats.collect_stats on the offline default corpus, cached
(--stats-cache), and are computed before anything is timed. Throughput is facts per
second of the whole edit (keys, values, solve, apply) with statistics cached, against a
one-fact-at-a-time baseline in the same process: the reference implementation's way of
computing v* (one fact per optimisation, every step running the full context-prefixed
prompts), followed by the same solve.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

import pmsolve
from pmsolve.editing import ValueConfig, edit, preset_for
from pmsolve.evaluation import evaluate_records, load_builtin_facts
from pmsolve.models import load_model
from pmsolve.stats import collect_stats

warnings.simplefilter("ignore", pmsolve.NumericalWarning)


def facts(n: int, skip: int = 0) -> list:
    """n built-in facts spread evenly over the file (it is grouped by relation), shifted by skip."""
    recs = load_builtin_facts()
    stride = max(1, len(recs) // n)
    picked = recs[skip::stride][:n]
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} built-in facts available for n={n}, skip={skip}")
    return picked


def scores(model, tok, recs) -> dict:
    a = evaluate_records(model, tok, recs).aggregate
    return {k: a[k] for k in ("es", "ps", "ns", "score")}


def run_edit(model, tok, recs, stats, **kw) -> tuple[dict, object]:
    t0 = time.perf_counter()
    res = edit(model, tok, recs, stats=stats, **kw)
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "facts_per_s": len(recs) / wall, "timings": res.timings,
           "v_steps_mean": sum(v["steps"] for v in res.values) / len(res.values),
           "v_converged": sum(v["converged"] for v in res.values),
           "residual_rounded_max": max(e.residual_rounded for e in res.edits)}
    return out, res


def sweep(args, model, tok, stats) -> list[dict]:
    recs = facts(args.n, skip=7)  # not the facts of the targets run
    base = scores(model, tok, recs)
    print(json.dumps({"unedited": base}), flush=True)
    rows = []
    configs = [("emmet", [layer], None, "single") for layer in args.single] + \
              [(args.set_method, ls, args.mu if args.set_method == "memit" else None, "memit") for ls in args.sets]
    for method, layers, mu, dist in configs:
        for stop in args.stop_nll or [float("inf")]:
            cfg = ValueConfig(stop_nll=stop)
            info, res = run_edit(model, tok, recs, stats, method=method, layers=layers, mu=mu,
                                 distribution=dist, value_config=cfg, model_id=args.model_id)
            after = scores(model, tok, recs)
            res.restore()
            row = {"method": method, "layers": layers, "mu": mu, "stop_nll": stop, **after,
                   "ns_drop": base["ns"] - after["ns"], **{k: info[k] for k in ("wall_s", "v_steps_mean")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _model_precision(cfg: ValueConfig) -> ValueConfig:
    """``cfg`` with v* in the model's own dtype and attention implementation (no autocast)."""
    return replace(cfg, autocast=None, attention=None)


def per_fact_baseline(model, tok, recs, stats, **kw) -> dict:
    """One fact at a time, v* as the reference computes it: full prompts every step, in the
    model's dtype (fp32) with its own attention implementation."""
    cfg = replace(_model_precision(kw.pop("value_config")), prefix_cache=False, skip_lower_layers=False)
    t0 = time.perf_counter()
    results = []
    for r in recs:
        results.append(edit(model, tok, [r], stats=stats, value_config=cfg, **kw))
    wall = time.perf_counter() - t0
    for res in reversed(results):  # undo in reverse order: each restore returns its own start
        res.restore()
    return {"n": len(recs), "wall_s": wall, "facts_per_s": len(recs) / wall}


def targets(args, model, tok, stats) -> dict:
    """The issue's targets with the model's preset (each setting can be overridden)."""
    recs = facts(args.n, skip=0)
    base = scores(model, tok, recs)
    print(json.dumps({"unedited": base}), flush=True)
    out = {"unedited": base, "runs": []}
    preset = preset_for(model, args.model_id)
    cfg = preset.values if args.stop_nll is None else replace(preset.values, stop_nll=args.stop_nll[0])
    emmet = preset.for_method("emmet")
    emmet_layers, emmet_dist = args.emmet_layers or emmet.layers, args.emmet_distribution or emmet.distribution
    runs = [("emmet", emmet_layers, None, emmet_dist)] + [("memit", args.memit_layers, lam, None)
                                                           for lam in args.lambdas]
    for method, layers, mu, dist in runs:
        info, res = run_edit(model, tok, recs, stats, method=method, layers=layers, mu=mu,
                             distribution=dist, value_config=cfg, model_id=args.model_id)
        after = scores(model, tok, recs)
        res.restore()
        row = {"method": method, "layers": layers, "mu": mu, **after, "ns_drop": base["ns"] - after["ns"], **info}
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    # Throughput: batched EMMET (above) vs one fact at a time, on a subset for the slow baseline.
    sub = recs[: args.baseline_n]
    b1, res = run_edit(model, tok, sub, stats, method="emmet", layers=emmet_layers, distribution=emmet_dist,
                       value_config=cfg, model_id=args.model_id)
    res.restore()
    # The same batched edit in fp32 with the model's attention: what batching alone buys.
    fp32 = _model_precision(cfg)
    b32, res = run_edit(model, tok, recs, stats, method="emmet", layers=emmet_layers, distribution=emmet_dist,
                        value_config=fp32, model_id=args.model_id)
    res.restore()
    ours_1 = per_fact_baseline(model, tok, sub, stats, method="emmet", layers=emmet_layers,
                               distribution=emmet_dist, value_config=cfg, model_id=args.model_id)
    out["throughput"] = {"batched_32": out["runs"][0]["facts_per_s"], "batched_subset": b1["facts_per_s"],
                         "batched_32_fp32_model_attention": b32["facts_per_s"],
                         "baseline_one_at_a_time": ours_1["facts_per_s"], "baseline_n": len(sub)}
    out["throughput"]["speedup"] = out["throughput"]["batched_32"] / ours_1["facts_per_s"]
    print(json.dumps(out["throughput"]), flush=True)
    return out


def configs(args, model, tok, stats) -> list[dict]:
    """Each config is a dict of pmsolve.edit keyword arguments, scored on the targets' facts;
    v* is shared between configs that optimise it the same way (value_cache)."""
    recs = facts(args.n, skip=args.skip)
    base = scores(model, tok, recs)
    print(json.dumps({"unedited": base}), flush=True)
    rows, cache = [], {}
    for cfg in args.configs:
        kw = dict(cfg)
        if "value_config" in kw:  # else the preset's v* settings
            kw["value_config"] = ValueConfig(**kw["value_config"])
        info, res = run_edit(model, tok, recs, stats, model_id=args.model_id, value_cache=cache, **kw)
        after = scores(model, tok, recs)
        res.restore()
        row = {"config": cfg, **after, "ns_drop": base["ns"] - after["ns"],
               **{k: info[k] for k in ("wall_s", "v_steps_mean", "v_converged")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["sweep", "targets", "configs"])
    p.add_argument("--configs", type=json.loads, default=[], help="JSON list of edit() keyword dicts")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--skip", type=int, default=0, help="configs: facts shifted by this (0 = the targets' facts)")
    p.add_argument("--single", type=int, nargs="*", default=[2, 3, 4, 5, 6, 8, 10])
    p.add_argument("--sets", type=json.loads, nargs="*", default=[[3, 4, 5, 6], [4, 5, 6, 7, 8]])
    p.add_argument("--mu", type=float, default=1e4)
    p.add_argument("--set-method", default="memit", choices=["memit", "emmet"])
    p.add_argument("--stop-nll", type=float, nargs="*", default=None,
                   help="sweep: v* stop values (default inf); targets: override the preset's")
    p.add_argument("--emmet-layers", type=json.loads, default=None, help="targets: default the preset's")
    p.add_argument("--emmet-distribution", default=None, help="targets: default the preset's")
    p.add_argument("--memit-layers", type=json.loads, default=None, help="targets: default the preset's")
    p.add_argument("--lambdas", type=float, nargs="*", default=[None], help="targets: default the preset's")
    p.add_argument("--baseline-n", type=int, default=8)
    p.add_argument("--stats-tokens", type=int, default=50_000)
    p.add_argument("--stats-cache", default=str(Path.home() / ".cache" / "pmsolve" / "stats"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--document-start", default="auto", help="auto | none | a token (pmsolve.models.load_model)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.n = args.n or (8 if args.what == "sweep" else 32)
    lm = load_model(document_start=None if args.document_start == "none" else args.document_start)
    model, tok = lm.model, lm.tokenizer
    args.model_id = lm.model_id
    preset = preset_for(model, lm.model_id)
    layers = sorted(set(args.single + [x for s in args.sets for x in s]
                        + (args.emmet_layers or preset.for_method("emmet").layers)
                        + (args.memit_layers or preset.for_method("memit").layers)
                        + [x for c in args.configs for x in c.get("layers", [])]))
    t0 = time.perf_counter()
    stats = collect_stats(model, tok, layers, None, max_tokens=args.stats_tokens, cache_dir=args.stats_cache,
                          model_id=lm.model_id, progress=False)
    print(json.dumps({"stats_s": time.perf_counter() - t0, "tokens": stats.tokens, "cached": stats.from_cache,
                      "threads": torch.get_num_threads(), "document_start": lm.document_start, "machine": platform.processor() or platform.machine(),
                      "load": os.getloadavg()}), flush=True)
    result = {"sweep": sweep, "targets": targets, "configs": configs}[args.what](args, model, tok, stats)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
