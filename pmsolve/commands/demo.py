"""`pmsolve demo` (also `pmsolve` alone): edit a few built-in facts into SmolLM2 with EMMET
and show completions before and after, the scores, and that unrelated facts still hold."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import PMSolveError
from ._args import nonneg_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="edit built-in facts into the default model and show the effect")
    p.add_argument("--facts", type=positive_int, default=8, help="how many facts to edit (default 8)")
    p.add_argument("--control", type=nonneg_int, default=4, help="unrelated facts to check (default 4)")
    p.add_argument("--method", default="emmet", choices=["emmet", "memit", "rome"])
    p.add_argument("--stats-tokens", type=positive_int, default=50_000,
                   help="tokens of the offline corpus for the statistics (cached after the first run)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.set_defaults(func=run)


def _complete(model, tokenizer, prompts: list[str], n_tokens: int = 5) -> list[str]:
    import torch

    device = model.get_input_embeddings().weight.device
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt").to(device)
            gen = model.generate(**ids, max_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(gen[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
            out.append(" ".join(text.split()))
    return out


def _say(text: str = "") -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..editing import edit
    from ..editing.editor import auto_stats, resolve_settings
    from ..evaluation import evaluate_records, load_builtin_facts
    from ..models import load_model
    from ..models.adapters import adapter_for
    from ..solver import NumericalWarning

    warnings.simplefilter("ignore", NumericalWarning)
    try:
        t0 = time.perf_counter()
        lm = load_model()
        model, tok = lm.model, lm.tokenizer
        _say(f"model: {lm.model_id} (loaded in {time.perf_counter() - t0:.1f}s)")
        records = load_builtin_facts()
        edits, control = records[: args.facts], records[args.facts : args.facts + args.control]
        layers, *_ = resolve_settings(model, args.method, None, None, None, "auto", None, adapter_for(model),
                                      lm.model_id)
        t0 = time.perf_counter()
        stats = auto_stats(model, tok, layers, lm.model_id, max_tokens=args.stats_tokens, progress=True)
        _say(f"statistics for layers {layers}: "
             f"{'cached' if stats.from_cache else f'{stats.tokens} tokens'} ({time.perf_counter() - t0:.1f}s)")
        prompts = [r.rewrite_prompt for r in edits + control]
        before = _complete(model, tok, prompts)
        scores_before = evaluate_records(model, tok, edits)
        t0 = time.perf_counter()
        result = edit(model, tok, edits, method=args.method, stats=stats, seed=args.seed, model_id=lm.model_id)
        took = time.perf_counter() - t0
        after = _complete(model, tok, prompts)
        scores_after = evaluate_records(model, tok, edits)
    except (PMSolveError, OSError) as exc:
        print(f"pmsolve demo: error: {exc}", file=sys.stderr)
        return 2
    _say(f"\nedited {len(edits)} facts with {args.method} on layers {result.layers} in {took:.1f}s "
         f"({', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items())})\n")
    _say("EDITED FACTS   prompt → before | after   (wanted)")
    for r, p, b, a in zip(edits, prompts, before, after):
        _say(f"  {p} → {b} | {a}   (wanted: {r.target_new})")
    _say("\nUNRELATED FACTS (should not change)")
    n = len(edits)
    for r, p, b, a in zip(control, prompts[n:], before[n:], after[n:]):
        _say(f"  {p} → {b} | {a}   (true: {r.target_true})")
    _say("\nSCORES on the edited facts (before → after)")
    for key, name in (("es", "efficacy"), ("ps", "paraphrase"), ("ns", "neighbourhood")):
        _say(f"  {name:<14} {100 * scores_before.aggregate[key]:5.1f}% → {100 * scores_after.aggregate[key]:5.1f}%")
    held = sum(b == a for b, a in zip(before[n:], after[n:]))
    _say(f"  unrelated completions unchanged: {held}/{len(control)}")
    return 0
