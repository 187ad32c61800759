"""Sequential editing: do later batches overwrite earlier edits, and does preserve_edits help?

Edits the first N built-in facts into SmolLM2 in batches of B, one batch after another
(each batch's keys and v* are computed on the model the earlier batches left), with
preserve_edits = β for each β given, and scores every fact on the final model: efficacy
(ES), paraphrase (PS) and neighbourhood (NS) success, also for the first half of the
batches alone (the edits that had the most later batches to survive).

    python bench/sequential_bench.py --facts 64 --batch-size 4 --betas 0,1,10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import pmsolve
from pmsolve.evaluation import evaluate_records
from pmsolve.evaluation.records import BUILTIN_FACTS, parse_records, read_json_records
from pmsolve.models.loading import load_model

from fluency_bench import change, generate  # bench/ is on sys.path when run as a script


def _means(rows: list[dict]) -> dict[str, float]:
    keys = ("efficacy", "paraphrase_success", "neighborhood_success")
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = round(100 * sum(vals) / len(vals), 1) if vals else None
    return out


def _entropies(lm, prompts: list[str]) -> list[float]:
    return generate(lm.model, lm.tokenizer, prompts, 100, top_k=5, seed=0)[0]


def _fluency_change(pre: list[float], post: list[float]) -> dict[str, float]:
    c = change(pre, post)
    return {"change_pct": round(100 * c["change"], 2), "se_pct": round(100 * c["se"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--method", default="emmet")
    ap.add_argument("--betas", default="0,1,10")
    ap.add_argument("--fluency", type=int, default=0, metavar="K", help="generation prompts per fact (0: no fluency)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(None)
    records, _ = parse_records(read_json_records(BUILTIN_FACTS)[: args.facts], "auto")
    requests = [r.as_request() for r in records]
    half = (len(records) // args.batch_size // 2) * args.batch_size
    out = {"facts": len(records), "batch_size": args.batch_size, "method": args.method, "runs": []}
    prompts = [g for r in records for g in r.generation_prompts[: args.fluency]]
    if prompts:
        pre = _entropies(lm, prompts)
        out["fluency"] = {"generations": len(prompts), "tokens": 100, "decoding": "top-5 sampling, seed 0",
                          "unedited_entropy": round(statistics.fmean(pre), 4)}
    for beta in (float(b) for b in args.betas.split(",")):
        t0 = time.perf_counter()
        res = pmsolve.edit(lm.model, lm.tokenizer, requests, method=args.method, batch_size=args.batch_size,
                           stats="auto", preserve_edits=beta)
        t_edit = time.perf_counter() - t0
        rows = evaluate_records(lm.model, lm.tokenizer, records).records
        fluency = _fluency_change(pre, _entropies(lm, prompts)) if prompts else None
        res.restore()
        run = {"preserve_edits": beta, "all": _means(rows), "first_half": _means(rows[:half]),
               "second_half": _means(rows[half:]), "fluency": fluency, "edit_seconds": round(t_edit, 1),
               "solve_seconds": round(res.timings.get("solve", 0.0), 2), "layers": res.layers}
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
