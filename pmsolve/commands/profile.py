"""`pmsolve profile`: time, peak memory and conditioning of each stage of an edit.

    pmsolve profile --model PATH --n 16                      # measure a real model
    pmsolve profile --d-in 14336 --d-out 4096 --n 1000 --layers 5 --tokens 44000000
                                                             # synthetic, extrapolated
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from ._args import nonneg_int, positive_int
from .edit import add_document_start, document_start


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="time and peak memory of each stage of an edit (plan big runs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model path or id; 'default' for the built-in SmolLM2 (model mode)")
    add_document_start(p)
    p.add_argument("--d-in", type=positive_int, help="key width (dimension mode: synthetic data, extrapolated)")
    p.add_argument("--d-out", type=positive_int, help="value width (dimension mode; default: d_in)")
    p.add_argument("--n", type=positive_int, default=16, help="edits per batch (default 16)")
    p.add_argument("--layers", help="model mode: comma-separated layer indices (default: preset); "
                                    "dimension mode: number of edited layers (default 1)")
    p.add_argument("--tokens", type=positive_int, help="preservation tokens per layer (default: 20000 in model mode, "
                                              "44M, the reference pipeline's count, in dimension mode)")
    p.add_argument("--method", default="emmet", choices=("emmet", "memit", "rome"))
    p.add_argument("--mu", type=float, help="ridge / MEMIT lambda (default: the solver's)")
    p.add_argument("--requests", help="model mode: requests file (default: the built-in facts)")
    p.add_argument("--corpus", help="model mode: corpus for the statistics (default: offline)")
    p.add_argument("--weight-bytes", type=int, default=2, choices=(2, 4), help="dimension mode: bytes per weight")
    p.add_argument("--max-d", type=positive_int, default=2048, help="dimension mode: largest d_in actually run here")
    p.add_argument("--device", default="cpu", help="dimension mode: where to run (cpu, cuda)")
    p.add_argument("--backend", default="auto", help="solver backend: auto, cpu (native), cuda, torch")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--json", dest="json_out", help="write the profile as JSON to this file ('-': stdout only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import settings

    if (args.model is None) == (args.d_in is None):
        print("pmsolve profile: give either --model or --d-in (with --d-out, --n, --layers)", file=sys.stderr)
        return 2
    # "auto" keeps the process-wide choice (pmsolve.settings.backend) instead of resetting it.
    with settings.backend(args.backend) if args.backend != "auto" else contextlib.nullcontext():
        prof = _profile_dims(args) if args.d_in is not None else _profile_model(args)
    out = prof.as_dict()
    if args.json_out == "-":
        print(json.dumps(out, indent=2))
        return 0
    print(prof.table())
    print(f"\nconditioning: {json.dumps(prof.conditioning, indent=1)}")
    print(f"memory: {prof.memory_method}")
    for note in prof.notes:
        print(f"note: {note}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


def _profile_dims(args: argparse.Namespace):
    from ..profiling import Dims, profile_dims

    layers = int(args.layers) if args.layers else 1
    dims = Dims(args.d_in, args.d_out or args.d_in, args.n, layers, args.tokens or 44_000_000, args.weight_bytes)
    return profile_dims(dims, method=args.method, mu=args.mu, max_d=args.max_d, seed=args.seed, device=args.device)


def _profile_model(args: argparse.Namespace):
    from ..editing.presets import preset_for
    from ..evaluation.records import load_builtin_facts
    from ..models import load_model
    from ..profiling import profile_model

    lm = load_model(None if args.model == "default" else args.model, document_start=document_start(args))
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    else:
        preset = preset_for(lm.model)
        if preset is None:
            raise SystemExit("pmsolve profile: no preset for this model; pass --layers")
        layers = preset.for_method(args.method).layers
    if args.requests:
        reqs = args.requests
    else:
        reqs = [r.as_request() for r in load_builtin_facts(limit=args.n)]
    return profile_model(lm.model, lm.tokenizer, reqs, layers, method=args.method, mu=args.mu,
                         tokens=args.tokens or 20_000, corpus=args.corpus, seed=args.seed)
