"""`pmsolve demo` (also `pmsolve` alone): edit a few built-in facts into SmolLM2 with EMMET
and show completions before and after, the scores, and that unrelated facts still hold."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from ..errors import PMSolveError
from ._args import nonneg_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="edit built-in facts into the default model and show the effect")
    p.add_argument("--facts", type=positive_int, default=8, help="how many facts to edit (default 8)")
    p.add_argument("--control", type=nonneg_int, default=4, help="unrelated facts to check (default 4)")
    p.add_argument("--method", default="emmet", choices=["emmet", "memit", "rome"])
    # 10k tokens (6.5 per dimension of the 1536-wide keys) edit the built-in facts as well as
    # 50k did (ES/PS 100 %, NS 95 %, no jitter; docs/benchmarks.md) at a fifth of the cost.
    p.add_argument("--stats-tokens", type=positive_int, default=10_000,
                   help="tokens of the offline corpus for the statistics (default 10000; cached after "
                        "the first run)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--fresh", action="store_true",
                   help="recompute v* and the unedited model's completions and scores instead of "
                        "reusing those of an earlier demo run (statistics stay cached)")
    p.set_defaults(func=run)


def _complete(model, tokenizer, prompts: list[str], n_tokens: int = 5) -> list[str]:
    """Greedy continuations of all prompts in one left-padded batch (one generate call instead
    of one per prompt: a 135M model's single-token steps cost the same at batch 1 and 12)."""
    from ..evaluation.metrics import generate_greedy

    texts = generate_greedy(model, tokenizer, prompts, max_new_tokens=n_tokens, batch_size=len(prompts))
    return [" ".join(t[len(p):].split()) for p, t in zip(prompts, texts)]


def _say(text: str = "") -> None:
    print(text, flush=True)


class _Stages:
    """One line per stage of the demo: what starts, then its wall-clock and CPU time (CPU is
    the process's, all threads: above wall when both cores work, far below it when the
    process waits for cores another process holds)."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.rows = total, 0, []

    @contextlib.contextmanager
    def __call__(self, name: str, doing: str):
        self.n += 1
        _say(f"[{self.n}/{self.total}] {doing} ...")
        t0, c0 = time.perf_counter(), time.process_time()
        note: list[str] = []
        yield note
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.rows.append((name, wall, cpu))
        _say(f"      {name}: {wall:.1f} s (CPU {cpu:.1f} s){'  ' + note[0] if note else ''}")

    def table(self, total_wall: float, total_cpu: float) -> None:
        parts = ", ".join(f"{name} {wall:.1f}" for name, wall, _ in self.rows)
        _say(f"\ntime: {total_wall:.1f} s wall ({parts}); process CPU {total_cpu:.1f} s")


class _RunCache:
    """What an earlier demo run computed on the same unedited weights: v* per fact (the
    ``value_cache`` of :func:`pmsolve.edit`, which is valid across edits of one unedited
    model) and the unedited model's completions and scores. All of it is a deterministic
    function of the weights (fingerprinted), the facts and the settings, like the cached
    statistics; it is about 60 % of a cached run's CPU time. One file per weights fingerprint,
    written atomically; ``--fresh`` ignores it."""

    def __init__(self, folder, fingerprint: str, enabled: bool) -> None:
        self.path = folder / f"demo.w{fingerprint[:16]}.pt"
        self.data: dict = {"values": {}, "before": {}}
        self.enabled = enabled
        if enabled and self.path.is_file():
            import torch

            try:
                self.data = torch.load(self.path, weights_only=True)
            except Exception:  # unreadable or from another version: recompute
                self.data = {"values": {}, "before": {}}
        self.values = _ReprKeys(self.data["values"])

    def save(self) -> None:
        import os

        import torch

        if not self.enabled:
            return
        self.data["values"] = dict(self.values)  # a plain dict for torch.load(weights_only=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        torch.save(self.data, tmp)
        os.replace(tmp, self.path)


class _ReprKeys(dict):
    """A dict keyed by repr(key), so the value cache's tuple keys (layer, seed, ValueConfig,
    templates, fact) survive torch.save / torch.load(weights_only=True)."""

    def __contains__(self, key) -> bool:
        return super().__contains__(repr(key))

    def __getitem__(self, key):
        return super().__getitem__(repr(key))

    def __setitem__(self, key, value) -> None:
        super().__setitem__(repr(key), value)


def run(args: argparse.Namespace) -> int:
    import warnings

    t_start = time.perf_counter()
    from ..editing import edit
    from ..editing.editor import auto_stats, resolve_settings
    from ..evaluation import evaluate_records, load_builtin_facts
    from ..models import load_model
    from ..models.adapters import adapter_for
    from ..editing.keys import cache_dir
    from ..models.loading import DEFAULT_MODEL_ID, default_cache_dir
    from ..stats.collect import weights_fingerprint
    from ..solver import NumericalWarning

    warnings.simplefilter("ignore", NumericalWarning)
    stage = _Stages(5)
    try:
        first = not (default_cache_dir() / DEFAULT_MODEL_ID).exists()
        with stage("model", "loading SmolLM2-135M-Instruct"
                   + (" (first run: converting its GGUF file to safetensors once)" if first else "")):
            lm = load_model()
        model, tok = lm.model, lm.tokenizer
        runs = _RunCache(cache_dir() / "demo", weights_fingerprint(model), enabled=not args.fresh)
        records = load_builtin_facts()
        edits, control = records[: args.facts], records[args.facts : args.facts + args.control]
        layers, *_ = resolve_settings(model, args.method, None, None, None, "auto", None, adapter_for(model),
                                      lm.model_id)
        with stage("statistics", f"preservation statistics of layers {layers} "
                   f"({args.stats_tokens} tokens of the offline corpus, cached after the first run)") as note:
            stats = auto_stats(model, tok, layers, lm.model_id, max_tokens=args.stats_tokens, progress=True)
            note.append("(cached)" if stats.from_cache else f"({stats.tokens} tokens)")
        prompts = [r.rewrite_prompt for r in edits + control]
        before_key = repr((prompts, [(r.prompt, r.subject, r.target_new, r.target_true) for r in edits]))
        with stage("before", "completions and scores of the unedited model") as note:
            if before_key in runs.data["before"]:
                before, scores_before = runs.data["before"][before_key]
                note.append("(from an earlier run; --fresh recomputes)")
            else:
                before = _complete(model, tok, prompts)
                scores_before = {k: float(v) for k, v in evaluate_records(model, tok, edits).aggregate.items()
                                 if isinstance(v, (int, float))}
                runs.data["before"][before_key] = (before, scores_before)

        def on_layer(what: str, done: int, total: int) -> None:
            if what == "layer":
                _say(f"      layer {done}/{total} edited")

        with stage("edit", f"editing {len(edits)} facts with {args.method} "
                   "(keys, v* optimisation, solve, apply)") as note:
            known = len(runs.values)
            result = edit(model, tok, edits, method=args.method, stats=stats, seed=args.seed,
                          model_id=lm.model_id, progress=on_layer, value_cache=runs.values)
            reused = "; v* from an earlier run, --fresh recomputes" if len(runs.values) == known and known else ""
            note.append("(" + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()) + reused + ")")
            runs.save()
        with stage("after", "completions and scores of the edited model"):
            after = _complete(model, tok, prompts)
            scores_after = evaluate_records(model, tok, edits)
    except (PMSolveError, OSError) as exc:
        print(f"pmsolve demo: error: {exc}", file=sys.stderr)
        return 2
    _say(f"\nedited {len(edits)} facts with {args.method} on layers {result.layers}\n")
    _say("EDITED FACTS   prompt → before | after   (wanted)")
    for r, p, b, a in zip(edits, prompts, before, after):
        _say(f"  {p} → {b} | {a}   (wanted: {r.target_new})")
    _say("\nUNRELATED FACTS (should not change)")
    n = len(edits)
    for r, p, b, a in zip(control, prompts[n:], before[n:], after[n:]):
        _say(f"  {p} → {b} | {a}   (true: {r.target_true})")
    _say("\nSCORES on the edited facts (before → after)")
    for key, name in (("es", "efficacy"), ("ps", "paraphrase"), ("ns", "neighbourhood")):
        _say(f"  {name:<14} {100 * scores_before[key]:5.1f}% → {100 * scores_after.aggregate[key]:5.1f}%")
    held = sum(b == a for b, a in zip(before[n:], after[n:]))
    _say(f"  unrelated completions unchanged: {held}/{len(control)}")
    stage.table(time.perf_counter() - t_start, time.process_time())
    return 0
