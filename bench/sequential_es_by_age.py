"""Efficacy by age of the edit for finished sequential runs: the saved weights after a method's
last batch, ES of every edit so far split into quarters in edit order and the newest batch.

    python bench/sequential_es_by_age.py ~/.cache/pmsolve/sequential/smollm2-counterfact/alphaedit \\
        ~/.cache/pmsolve/sequential/alphaedit-l2-4-g3000.0/alphaedit

Each argument is a method folder of a run (`pmsolve eval --sequential` or
bench/sequential_variant.py). Its state file holds the rewrite weights after the last finished
batch; they are put into the unedited model and every edited record's rewrite prompt is scored
as the run's checkpoints score it (pmsolve.evaluation.evaluate_records). Prints one JSON line per
folder. Checkpoint rows written since es_by_age existed carry the same numbers.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from pmsolve._io import read_safetensors
from pmsolve.evaluation import evaluate_records
from pmsolve.experiments import sequential as seq
from pmsolve.models import load_model
from pmsolve.models.adapters import adapter_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="method folders holding state.safetensors")
    args = p.parse_args()
    lm = load_model(None, dtype=torch.float32)
    ad = adapter_for(lm.model)
    names = {ad.rewrite_name(i): i for i in range(ad.num_layers)}
    unedited = {name: ad.weight(i).detach().clone() for name, i in names.items()}
    for folder in args.folders:
        run = json.loads((folder.parent / "run.json").read_text())
        tensors, meta = read_safetensors(folder / "state.safetensors", "sequential benchmark state")
        done = int(meta["batches_done"]) * run["config"]["batch_size"]
        records = seq.select_records(None, seq.SequentialConfig(edits=done, checkpoints=(done,),
                                                                 batch_size=run["config"]["batch_size"]))
        if [r.case_id for r in records] != run["records"][:done]:
            raise SystemExit(f"{folder}: the records selected now differ from the run's")
        with torch.no_grad():
            for name, w in unedited.items():  # every method starts from the unedited weights
                ad.weight(names[name]).copy_(tensors.get(name, w))
        rewrite_only = [replace(r, paraphrase_prompts=[], neighborhood_prompts=[]) for r in records]
        es = [r["efficacy"] for r in evaluate_records(lm.model, lm.tokenizer, rewrite_only).records]
        print(json.dumps({"folder": str(folder), "edits": done, "es": round(100 * sum(es) / len(es), 2),
                          **seq.es_by_age(es, run["config"]["batch_size"])}), flush=True)


if __name__ == "__main__":
    main()
