"""MEMIT preset sweep on SmolLM2 loaded with plain transformers (issue #26, paraphrase target).

    python bench/memit_preset_sweep.py --set cf --configs '[{"layers": [3,4,5,6], "mu": 300}]'

Each config is a dict of ``pmsolve.edit`` keyword arguments added to ``method="memit"`` (the preset
fills the rest). One batch of 16 facts per set, scored by tests/test_user_model.py's independent
scorer (mean-token NLL of target_new against target_true; neighbours' own target against
target_new) with the document-start token first and as the tokenizer ships. Selection sets only,
all disjoint from the held-out built-in facts ``[11::32]`` the test reports on:

- ``cf``: the first 16 records of counterfact-flat.jsonl that the unedited model knows by the
  scorer's own test under both prompt protocols (true target more likely than the new one after
  the rewrite and rephrase prompts; the locality prompt's own target more likely than the new
  one); one paraphrase and one neighbour each;
- ``b4`` / ``b20``: built-in facts ``[4::32]`` / ``[20::32]`` (16 each).

Prints one JSON line per (config, set) and appends it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import pmsolve  # noqa: E402
import test_user_model as tum  # noqa: E402

warnings.simplefilter("ignore", pmsolve.NumericalWarning)
CF = Path("/work/shared/data/counterfact-flat.jsonl")


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tum._gguf_dir()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=tum.GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=tum.GGUF_FILE)
    return model.eval(), tok


def counterfact_known(model, tok, n: int = 16, cache: Path = ROOT / "bench/results/memit-sweep-cf-ids.json") -> list[dict]:
    """The first n flat CounterFact records the model answers (see module docstring), in the
    built-in facts' layout."""
    if cache.is_file():
        wanted = json.loads(cache.read_text())
        recs = {r["case_id"]: r for r in map(json.loads, CF.open()) if r["case_id"] in wanted}
        picked = [recs[i] for i in wanted]
    else:
        picked = []
        for line in CF.open():
            r = json.loads(line)
            if r["subject"] not in r["prompt"] or r["subject"] not in r["rephrase_prompt"]:
                continue
            if r["locality_ground_truth"].strip() == r["target_new"].strip():
                continue
            fact = as_fact(r)
            if all(s == {"es": 0.0, "ps": 0.0, "ns": 100.0}
                   for s in (tum.score(model, tok, [fact], prefix) for prefix in tum.protocols(tok).values())):
                picked.append(r)
                if len(picked) == n:
                    break
        cache.write_text(json.dumps([r["case_id"] for r in picked]))
    return [as_fact(r) for r in picked]


def as_fact(r: dict) -> dict:
    return {"prompt": r["prompt"].replace(r["subject"], "{}", 1), "subject": r["subject"],
            "target_true": r["ground_truth"], "target_new": r["target_new"],
            "paraphrase_prompts": [r["rephrase_prompt"]],
            "neighborhood_prompts": [{"prompt": r["locality_prompt"], "target": r["locality_ground_truth"]}]}


def builtin(k: int) -> list[dict]:
    facts = [json.loads(line) for line in tum.FACTS.read_text().splitlines() if line.strip()]
    return facts[k::32][:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="cf", help="comma-separated: cf, b4, b20 (or heldout: [11::32], report only)")
    ap.add_argument("--configs", required=True, help="JSON list of pmsolve.edit keyword dicts")
    ap.add_argument("--out", default=str(ROOT / "bench/results/memit-preset-sweep.jsonl"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model()
    configs = json.loads(args.configs)
    for name in args.set.split(","):
        facts = {"cf": lambda: counterfact_known(model, tok), "b4": lambda: builtin(4), "b20": lambda: builtin(20),
                 "heldout": lambda: tum.held_out_facts(16)}[name]()
        base = {p: tum.score(model, tok, facts, prefix) for p, prefix in tum.protocols(tok).items()}
        for cfg in configs:
            t0 = time.perf_counter()
            res = pmsolve.edit(model, tok, [tum.request(f) for f in facts], method="memit", **cfg)
            try:
                after = {p: tum.score(model, tok, facts, prefix) for p, prefix in tum.protocols(tok).items()}
            finally:
                res.restore()
            row = {"set": name, "config": cfg, "layers": res.layers, "mu": getattr(res, "mu", None),
                   "before": base, "after": after, "wall_s": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
