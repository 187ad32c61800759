"""One method of the sequential benchmark with Editor settings the command line does not take
(layers per method, any NullSpaceSettings field), in a run folder of its own.

    python bench/sequential_variant.py --out ~/.cache/pmsolve/sequential/alphaedit-l2-4-g300 \\
        --method alphaedit --options '{"null_space": {"c_weight": 300.0}}' \\
        --edits 2000 --checkpoints 500,1000,1500,2000 \\
        --reference ~/.cache/pmsolve/sequential/smollm2-counterfact

Same records, model, statistics and scoring as `pmsolve eval --sequential` (it calls
pmsolve.experiments.sequential.run); ``--options`` are keyword arguments of pmsolve.Editor for
the method. ``--reference``: a run folder of the same records and settings whose unedited
model's scores are copied in (they are keyed by the run's identity, so a folder of another run is
ignored and the scores are computed afresh). The folder resumes like the command's.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from pmsolve.experiments import sequential as seq
from pmsolve.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--method", required=True, choices=seq.METHODS)
    p.add_argument("--options", default="{}", help="JSON object: pmsolve.Editor keyword arguments")
    p.add_argument("--edits", type=int, default=2000)
    p.add_argument("--checkpoints", default="500,1000,2000")
    p.add_argument("--reference", type=Path, default=None, help="run folder to take unedited scores from")
    args = p.parse_args()
    cfg = seq.SequentialConfig(edits=args.edits, checkpoints=tuple(int(c) for c in args.checkpoints.split(",")))
    records = seq.select_records(None, cfg)
    lm = load_model(None, dtype=torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reference and not (args.out / "unedited.json").exists():
        shutil.copy(args.reference / "unedited.json", args.out / "unedited.json")
    options = {**json.loads(args.options), "model_id": lm.model_id}
    res = seq.run(lm.model, lm.tokenizer, records, cfg, args.out, methods=[args.method], model_id=lm.model_id,
                  method_options={args.method: options})
    print(seq.report(res["rows"], res["solver_times"]))


if __name__ == "__main__":
    main()
