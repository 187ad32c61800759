"""`pmsolve apply`: put the updates that `pmsolve edit` saved into a model and save it.

An updates file holds only the factors U, B of each layer's update (d × n per batch, a few
hundred KiB for dozens of facts): it is the cheap way to share or archive an edit. The
file records a fingerprint of every weight before and after the edit, so applying it to
another checkpoint, or a second time, is refused unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CacheError, PMSolveError
from .edit import add_document_start, load, margins


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="apply saved updates (updates.safetensors) to a model and save it")
    p.add_argument("--updates", required=True, nargs="+", metavar="FILE",
                   help="updates file(s) written by `pmsolve edit`; several are applied in the order given, "
                        "each on top of the last (sequential edits), and must have been made in that order")
    p.add_argument("--model", default=None, help="the unedited model: folder or Hugging Face id "
                                                 "(default: built-in SmolLM2)")
    add_document_start(p)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="load the model in this dtype (default: the dtype the edit was made in)")
    p.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto")
    p.add_argument("--out", required=True, help="folder for the edited model (weights and tokenizer)")
    p.add_argument("--force", action="store_true",
                   help="apply even if the weights are not the ones the updates were computed on")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..editing import apply_updates, load_requests, load_updates
    from ..editing.presets import mark_edited

    if args.model and Path(args.out).expanduser().resolve() == Path(args.model).expanduser().resolve():
        print("pmsolve apply: error: --out is the model's own folder: the unedited model would be overwritten; "
              "write the edited one elsewhere", file=sys.stderr)
        return 2
    try:
        headers = [load_updates(f)[1] for f in args.updates]  # damaged files fail before the model loads
        args.dtype = args.dtype or headers[0].get("weight_dtype") or "float32"
        if not isinstance(getattr(torch, str(args.dtype), None), torch.dtype):
            raise CacheError(f"{args.updates[0]}: unknown weight dtype {args.dtype!r} in its header")
        lm = load(args)
        # Each file's requests on their own: sequential edits may change one fact twice.
        requests = [r for h in headers if h.get("requests") for r in load_requests(h["requests"])]
        before = margins(lm.model, lm.tokenizer, requests) if requests else []
        for f in args.updates:  # each file's weights check is against the previous file's result
            apply_updates(lm.model, f, check=not args.force)
        after = margins(lm.model, lm.tokenizer, requests) if requests else []
    except (PMSolveError, OSError, json.JSONDecodeError) as exc:
        print(f"pmsolve apply: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    mark_edited(lm.model, lm.model_id)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    for f, header in zip(args.updates, headers):
        modules = sorted(header.get("weights") or {e["module"] for e in header["edits"]})
        print(f"applied {f}: {len(header['edits'])} updates ({header.get('method', '?')}) to {len(modules)} "
              f"modules of {lm.model_id}")
    print(f"{len(requests)} facts")
    fmt = (lambda x: "   n/a" if x is None else f"{x:+6.2f}")
    if requests:
        print(f"{'subject':<28} {'target':<16}  margin before → after")
    for r, b, a in zip(requests, before, after):
        print(f"{r.subject[:28]:<28} {r.target_new[:16]:<16}  {fmt(b)} → {fmt(a)}")
    print(f"wrote {out}/")
    return 0
