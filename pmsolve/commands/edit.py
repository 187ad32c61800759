"""`pmsolve edit`: write facts into a model and save the result, the updates and a report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import PMSolveError
from ._args import json_object, nonneg_float, nonneg_int, parse_layers, positive_int


def add_document_start(p: argparse.ArgumentParser) -> None:
    p.add_argument("--document-start", default="auto", metavar="auto|none|TOKEN",
                   help="token every prompt starts with (default auto: <|endoftext|> or BOS when the "
                        "tokenizer adds none; none: the tokenizer as shipped)")


def document_start(args: argparse.Namespace) -> str | None:
    value = getattr(args, "document_start", "auto")
    return None if value == "none" else value


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or Hugging Face id (default: built-in SmolLM2)")
    add_document_start(p)
    p.add_argument("--method", default="emmet", choices=["emmet", "memit", "rome", "alphaedit"],
                   help="default emmet (pmsolve edit --state: the saved editor's)")
    p.add_argument("--layers", type=parse_layers, default=None, help="e.g. 5 or 3-8 (default: the preset's)")
    p.add_argument("--distribution", default=None, choices=["single", "memit", "balanced"])
    p.add_argument("--mu", type=float, default=None, help="ridge / MEMIT lambda (default: the preset's)")
    p.add_argument("--preset", default="auto", help="preset name or JSON file (default: matched to the model)")
    p.add_argument("--stats-tokens", type=positive_int, default=100_000,
                   help="tokens for the covariance statistics when not cached (default 100000)")
    p.add_argument("--corpus", default=None, help="text/JSONL file or hf:name for statistics (default: offline)")
    p.add_argument("--stats", default=None, metavar="PATH",
                   help="precomputed statistics instead of collecting them: a folder with `pmsolve stats` files "
                        "or the reference's layer_stats .npz files (matched by module name), or one file")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--start-key", default="preset", choices=["preset", "on", "off"],
                   help="also constrain the bare prompt's key for subject-first prompts (default: the preset's)")
    p.add_argument("--key-source", default=None, choices=["average", "prompt", "both"],
                   help="keys per fact: template average, the rewrite prompt's own, or both (default: the preset's)")
    p.add_argument("--preserve-prompts", type=float, default=None, metavar="ALPHA",
                   help="weight of the batch's own prompt tokens in the preservation term (default: the preset's)")
    p.add_argument("--values", type=json_object, default=None, metavar="JSON",
                   help="v* settings over the preset's, e.g. '{\"clamp\": 0.2}' (pmsolve.editing.ValueConfig)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def note_ignored_corpus(args: argparse.Namespace, command: str) -> None:
    if args.stats and args.corpus:
        print(f"pmsolve {command}: --corpus is ignored: the statistics come from --stats", file=sys.stderr)


def key_options(args: argparse.Namespace) -> dict[str, Any]:
    """edit() keyword arguments for the key options and v* settings on the command line
    (None: the preset's)."""
    return {"start_key": {"preset": None, "on": True, "off": False}[args.start_key],
            "key_source": args.key_source, "preserve_prompts": args.preserve_prompts,
            "preserve_edits": getattr(args, "preserve_edits", None), "value_config": args.values}


CHECKPOINT = "edit-checkpoint"  # folder in --out while an edit runs (see pmsolve.edit's checkpoint)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="edit facts into a model (ROME/MEMIT/EMMET/AlphaEdit)")
    p.add_argument("--requests", default=None, help="JSON or JSONL file of edit requests")
    add_common(p)
    p.add_argument("--retention", default=None, choices=["soft", "hard"],
                   help="how later batches treat earlier edits: soft (--preserve-edits, default) or hard "
                        "(their outputs kept exactly, up to each layer's capacity)")
    p.add_argument("--null-space", type=json_object, default=None, metavar="JSON",
                   help="alphaedit's projector and ridge, e.g. '{\"threshold\": 0.5, \"alpha\": 1}'")
    p.add_argument("--state", default=None, metavar="DIR",
                   help="a persistent editor: created in DIR, or reopened (on the unedited model, its batches "
                        "re-applied) and the requests appended; saved after every batch")
    p.add_argument("--undo", type=positive_int, default=None, metavar="K",
                   help="with --state: take the editor's last K batches back (before editing --requests, if given)")
    p.add_argument("--preserve-edits", type=nonneg_float, default=None, metavar="BETA",
                   help="weight of keys edited by earlier batches (--batch-size) in later batches' preservation term "
                        "(default: the preset's, else 0.1; 0 turns it off)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="requests per solve (default: all at once)")
    p.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto")
    p.add_argument("--templates", default=None, help="JSON module-name templates for unknown architectures")
    p.add_argument("--out", required=True, help="output folder: model/, updates.safetensors, report.json")
    p.add_argument("--no-save-model", action="store_true", help="write only the updates and the report")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if --out holds the checkpoint of this same edit, interrupted")
    p.set_defaults(func=run, method=None)  # None: emmet, or the --state editor's


def load(args: argparse.Namespace):
    import torch

    from ..models import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype),
                      device_map=getattr(args, "device_map", None), document_start=document_start(args))


def progress_bar(total_batches: int):
    """A callback for pmsolve.edit that drives one tqdm bar over batches."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_batches, desc="editing", unit="batch", file=sys.stderr)

    def cb(stage: str, done: int, total: int) -> None:
        if stage == "resumed":
            bar.update(done)
        elif stage == "layer":
            bar.set_postfix_str(f"layer {done}/{total}")
            if done == total:
                bar.update(1)

    return bar, cb


def margins(model, tokenizer, requests) -> list[float | None]:
    """Per request: NLL(true) − NLL(new) on the rewrite prompt (> 0: the new target wins)."""
    from ..evaluation import target_nll

    have = [r for r in requests if r.target_true]
    if not have:
        return [None] * len(requests)
    prompts = [r.text for r in have]
    new = target_nll(model, tokenizer, prompts, [r.target_new for r in have])
    true = target_nll(model, tokenizer, prompts, [r.target_true for r in have])
    it = iter(t - n for n, t in zip(new, true))
    return [next(it) if r.target_true else None for r in requests]


def run(args: argparse.Namespace) -> int:
    from ..editing import checkpoint as resume
    from ..editing import load_requests
    from ..editing.presets import mark_edited

    if args.undo and not args.state:
        print("pmsolve edit: error: --undo takes batches back from a persistent editor: give its --state DIR",
              file=sys.stderr)
        return 2
    if args.requests is None and not (args.state and args.undo):
        print("pmsolve edit: error: --requests is required (or --state DIR --undo K alone)", file=sys.stderr)
        return 2
    checkpoint = Path(args.out) / CHECKPOINT
    try:
        requests = load_requests(args.requests) if args.requests is not None else []
        templates = json.loads(args.templates) if args.templates else None
        t0 = time.perf_counter()
        lm = load(args)
        print(f"loaded {lm.model_id} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        before = margins(lm.model, lm.tokenizer, requests)
        if args.state:
            result, state = _edit_with_state(args, lm, templates, requests)
        else:
            result, state = _edit_once(args, lm, templates, requests, checkpoint), None
        after = margins(lm.model, lm.tokenizer, requests)
    except (PMSolveError, OSError, json.JSONDecodeError) as exc:
        print(f"pmsolve edit: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = result.report() if result is not None else {}
    report["model"] = lm.model_id
    report["document_start"] = lm.document_start
    if state is not None:
        report["state"] = {"folder": str(args.state), "undone": args.undo or 0, **state.summary()}
    report["margins"] = [{"subject": r.subject, "before": b, "after": a}
                         for r, b, a in zip(requests, before, after)]
    if result is not None:
        result.save_updates(out / "updates.safetensors")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if not args.no_save_model:
        mark_edited(lm.model, lm.model_id)
        lm.model.save_pretrained(out / "model")
        lm.tokenizer.save_pretrained(out / "model")
    resume.clear(checkpoint)  # everything it held is in the files above
    if result is not None:
        print(summary(result, report))
    if state is not None:
        print(state_summary(report["state"]))
    wrote = [f"{out}/report.json"] + ([f"{out}/updates.safetensors"] if result is not None else [])
    print("\nwrote " + ", ".join(wrote + ([] if args.no_save_model else [f"{out}/model/"])))
    return 0


def _edit_once(args, lm, templates, requests, checkpoint):
    """One edit() call, resumable through the checkpoint folder in --out."""
    from ..editing import checkpoint as resume
    from ..editing import edit

    method = args.method or "emmet"
    stats = _stats(args, lm, templates, _layers(args, lm, templates, method))
    if args.no_resume:
        resume.clear(checkpoint)
    bar, cb = progress_bar(1 if not args.batch_size else -(-len(requests) // args.batch_size))
    try:
        return edit(lm.model, lm.tokenizer, requests, method=method, layers=args.layers,
                    distribution=args.distribution, batch_size=args.batch_size, stats=stats, mu=args.mu,
                    seed=args.seed, preset=args.preset, templates=templates, model_id=lm.model_id,
                    progress=cb, checkpoint=checkpoint, retention=args.retention or "soft",
                    null_space=args.null_space, **key_options(args))
    except BaseException:
        if checkpoint.is_dir():
            print(f"\npmsolve edit: the batches done so far are saved in {checkpoint}; "
                  "run the same command again to go on from there", file=sys.stderr)
        raise
    finally:
        bar.close()


def _changed_settings(args: argparse.Namespace, saved: dict[str, Any]) -> list[str]:
    """The flags given that differ from a saved editor's settings (fixed when it was created)."""
    ko = saved["key_options"]
    start_key = {"preset": None, "on": True, "off": False}[args.start_key]
    pairs = [("--method", args.method, saved["method"]), ("--retention", args.retention, saved["retention"]),
             ("--layers", args.layers and list(args.layers), saved["layers"]),
             ("--distribution", args.distribution, saved["distribution"]), ("--mu", args.mu, saved["mu"]),
             ("--key-source", args.key_source, ko["source"]), ("--start-key", start_key, ko["start_key"]),
             ("--preserve-prompts", args.preserve_prompts, ko["preserve_prompts"]),
             ("--preserve-edits", args.preserve_edits, ko["preserve_edits"])]
    changed = [f"{flag} {given}" for flag, given, have in pairs if given is not None and given != have]
    for flag, given, have in (("--values", args.values, saved["value_config"]),
                              ("--null-space", args.null_space, saved["null_space"])):
        if given and any(have.get(k) != v for k, v in given.items()):
            changed.append(flag)
    return changed


def _edit_with_state(args, lm, templates, requests):
    """Create the editor in --state or reopen it (its batches re-applied to the unedited model),
    undo --undo batches, then append the requests; every finished batch is saved there."""
    from ..editing import Editor
    from ..editing.state import STATE_FILE, saved_settings
    from ..errors import InputError

    folder = Path(args.state)
    if (folder / STATE_FILE).exists():
        saved = saved_settings(folder)
        changed = _changed_settings(args, saved)
        if changed:
            raise InputError(f"{folder} holds an editor ({saved['method']}, retention {saved['retention']}, layers "
                             f"{saved['layers']}) whose settings are fixed: drop {', '.join(changed)}, or use another "
                             "--state folder")
        stats = _stats(args, lm, templates, saved["layers"])
        t0 = time.perf_counter()
        ed = Editor.open(folder, lm.model, lm.tokenizer, stats, templates=templates)
        print(f"reopened the editor in {folder}: {ed.batches_done} batches, {len(ed.requests)} requests "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    else:
        if args.undo:
            raise InputError(f"--undo: {folder} holds no editor yet")
        method = args.method or "emmet"
        stats = _stats(args, lm, templates, _layers(args, lm, templates, method))
        ed = Editor(lm.model, lm.tokenizer, method, args.layers, args.distribution, stats, args.mu, args.seed,
                    retention=args.retention or "soft", null_space=args.null_space, preset=args.preset,
                    templates=templates, model_id=lm.model_id, state=folder, **key_options(args))
    if args.undo:
        ed.undo(args.undo)
    if not requests:
        return None, ed
    bar, cb = progress_bar(1 if not args.batch_size else -(-len(requests) // args.batch_size))
    try:
        return ed.edit(requests, args.batch_size, progress=cb), ed
    except BaseException:
        print(f"\npmsolve edit: the finished batches are saved in {folder}; run the same command again to go on "
              "from there", file=sys.stderr)
        raise
    finally:
        bar.close()


def _layers(args, lm, templates, method: str) -> list[int]:
    from ..editing.editor import resolve_settings
    from ..models.adapters import adapter_for

    layers, *_ = resolve_settings(lm.model, method, args.layers, args.distribution, args.mu, args.preset, None,
                                  adapter_for(lm.model, templates), lm.model_id)
    return layers


def state_summary(state: dict[str, Any]) -> str:
    lines = [f"editor in {state['folder']}: {state['method']} (retention {state['retention']}) on layers "
             f"{state['layers']}, {state['batches']} batches, {state['requests']} requests"
             + (f"; {state['undone']} batches undone" if state["undone"] else "")]
    for layer, st in state["layer_states"].items():
        detail = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in st.items())
        lines.append(f"  layer {layer}: {detail}")
    return "\n".join(lines)


def _stats(args, lm, templates, layers: list[int]):
    """Collect (or load cached) statistics for the layers the edit will use, before editing."""
    from ..editing.editor import auto_stats

    t0 = time.perf_counter()
    if args.stats:
        from ..stats import load_stats

        note_ignored_corpus(args, "edit")
        res = load_stats(args.stats, lm.model, layers)
        how = "from " + ", ".join(str(p) for p in res.paths.values())
    else:
        res = auto_stats(lm.model, lm.tokenizer, layers, lm.model_id, max_tokens=args.stats_tokens,
                         corpus=args.corpus, progress=True)
        how = "cached" if res.from_cache else f"{res.tokens} tokens"
    print(f"statistics for layers {layers}: {how}, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return res


def summary(result, report) -> str:
    lines = [f"{result.method} on layers {result.layers} ({result.distribution}), "
             f"{len(result.requests)} requests, {report['facts_per_second']:.2f} facts/s"
             + (f" ({result.resumed_requests} from an interrupted run's checkpoint)" if result.resumed_requests else "")]
    lines.append("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    lines.append(f"{'subject':<28} {'target':<16} {'v* steps':>8}  margin before → after")
    for m, v, r in zip(report["margins"], result.values, result.requests):
        fmt = (lambda x: "   n/a" if x is None else f"{x:+6.2f}")
        lines.append(f"{r.subject[:28]:<28} {r.target_new[:16]:<16} {v['steps']:>8}  "
                     f"{fmt(m['before'])} → {fmt(m['after'])}")
    worst = max(e.residual_rounded for e in result.edits)
    lines.append(f"largest memorisation residual after rounding to the weight dtype: {worst:.2e}")
    return "\n".join(lines)

