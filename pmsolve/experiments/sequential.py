"""The sequential ("lifelong") editing benchmark: thousands of CounterFact facts edited into one
model batch after batch, every edit so far scored at checkpoints (issue #25).

    from pmsolve.experiments import sequential as seq
    cfg = seq.SequentialConfig(edits=2000, batch_size=100, checkpoints=(500, 1000, 2000))
    records = seq.select_records(seq.default_data_path(), cfg)    # seeded, documented selection
    rows = seq.run(model, tokenizer, records, cfg, run_dir, methods=("memit", "emmet"))

What one run does, per method, on the same records in the same order:

* Batch b (``batch_size`` facts) is edited into the model that batches 0 … b-1 left: keys and
  v* are computed on that current model (as AlphaEdit does), not on the unedited one. Every
  batch's stage timings (``EditResult.timings``: keys, values = v*, solve, apply) are kept, so
  the solver's cost per batch late in the run can be compared with the first batch's.
* After ``c`` edits, for each checkpoint ``c``: efficacy (ES) over all ``c`` edits;
  paraphrase (PS) and neighbourhood (NS) success over a fixed seeded subsample of them
  (``eval_sample``; the unedited model's ES/PS/NS on the same subsample beside it); fluency (n-gram
  entropy of top-5 sampled generations, pmsolve.evaluation's reference decoding) on
  ``fluency_sample`` of them, paired with the unedited model's generations from the same
  prompts; perplexity of held-out text (the offline statistics corpus past the part the
  statistics read) against the unedited model's.

Methods (:data:`METHODS`): "memit" and "emmet" are the baselines as AlphaEdit's paper ran
them: each batch a fresh ``pmsolve.edit(..., preserve_edits=0)`` on the current model, with
only the preservation statistics C. "memit+beta", "emmet+beta", "alphaedit", "alphaedit+gamma"
(AlphaEdit with C weighted inside the kept directions, :data:`METHOD_DEFAULTS`) and "hard" keep
state across batches and need ``pmsolve.Editor``; they are refused with a clear reason where
it is missing.

Resumable: ``run_dir`` holds, per method, the edited rewrite weights and the per-batch log after
the last finished batch (one safetensors file, written atomically) and the finished checkpoint
evaluations (one JSON line each). A killed run started again with the same settings goes on
from the last finished batch; finished checkpoints are not evaluated again. The unedited
model's scores are kept in ``run_dir`` too (computed once, shared by the methods).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write, content_hash, read_safetensors, write_json
from ..errors import CacheError, InputError

FORMAT = "pmsolve.sequential/1"
DATA_FILE = "counterfact-flat.jsonl"
STATELESS = ("memit", "emmet")
WITH_EDITOR = ("alphaedit", "alphaedit+gamma", "memit+beta", "emmet+beta", "hard")
METHODS = STATELESS + WITH_EDITOR
# Per-method Editor settings a run starts from (the caller's options override them field by
# field). alphaedit+gamma is AlphaEdit with γ·C weighted inside the kept directions
# (NullSpaceSettings.c_weight): γ = 3000 retained the most after 2000 sequential CounterFact
# edits on SmolLM2 of the values tried (docs/RESULTS.md, "Sequential editing at scale").
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"alphaedit+gamma": {"null_space": {"c_weight": 3000.0}}}


class DataUnavailable(InputError):
    """The records file is not there: the benchmark is skipped with this reason."""


@dataclass(frozen=True)
class SequentialConfig:
    """Everything that decides the results.

    ``edits`` facts in batches of ``batch_size``; every checkpoint (a multiple of the batch
    size, at most ``edits``; ``edits`` itself is always one) evaluates all edits so far.
    ``eval_sample``: PS/NS on at most this many of the edits so far (seeded; ES always on all);
    ``fluency_sample``: generations per checkpoint (one per sampled edit, from its rewrite
    prompt: the flat CounterFact schema has no generation prompts). Perplexity: ``ppl_tokens``
    tokens of the offline corpus in windows of ``ppl_seq_len``, from the documents after the
    first ``ppl_skip_tokens`` tokens (the statistics read the first ``stats_tokens`` plus at
    most one 64k-token read-ahead pool)."""

    edits: int = 2000
    batch_size: int = 100
    checkpoints: tuple[int, ...] = (500, 1000, 2000)
    seed: int = 0
    eval_sample: int = 500
    fluency_sample: int = 100
    max_new_tokens: int = 100
    fluency_top_k: int | None = 5
    ppl_tokens: int = 16_384
    ppl_seq_len: int = 256
    ppl_skip_tokens: int = 300_000
    stats_tokens: int = 100_000

    def check(self) -> None:
        for name in ("edits", "batch_size", "eval_sample", "fluency_sample", "ppl_tokens", "ppl_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "fluency_sample" else 1):
                raise InputError(f"{name} must be a positive int, got {v!r}")
        if self.edits % self.batch_size:
            raise InputError(f"edits ({self.edits}) must be a multiple of batch_size ({self.batch_size})")
        bad = [c for c in self.checkpoints if c < 1 or c > self.edits or c % self.batch_size]
        if bad:
            raise InputError(f"checkpoints {bad} must be multiples of batch_size ({self.batch_size}) "
                             f"between {self.batch_size} and edits ({self.edits})")

    @property
    def checkpoint_list(self) -> list[int]:
        return sorted({*self.checkpoints, self.edits})

    def identity(self) -> dict[str, Any]:
        """The settings a run folder is keyed by: not ``edits`` nor ``checkpoints``, so that a
        longer run (or one with more checkpoints) continues a shorter one."""
        d = asdict(self)
        for k in ("edits", "checkpoints"):
            d.pop(k)
        return d


# ---------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------


def default_data_path() -> Path:
    """``shared/data/counterfact-flat.jsonl`` beside the repository checkout pmsolve runs from."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / DATA_FILE


def select_records(path: str | Path | None, config: SequentialConfig) -> list[Any]:
    """The ``config.edits`` records of the run, in edit order.

    Rule: read the flat CounterFact file (pmsolve's flat loader; records the editor would reject
    are left out), keep records with a true target, at least one paraphrase and one
    neighbourhood prompt, drop every record whose subject occurred earlier in the file (two
    facts about one subject in one batch share a key and can contradict each other), shuffle
    with ``random.Random(seed)``, take the first ``edits``. A longer run's records start with
    a shorter run's. Raises DataUnavailable when the file is missing."""
    from ..evaluation.pipeline import load_indexed

    path = Path(path) if path is not None else default_data_path()
    if not path.is_file():
        raise DataUnavailable(f"CounterFact records not found at {path} (the flat file {DATA_FILE} of "
                              "shared/data; pass another file with --data)")
    indexed, _ = load_indexed(path, "flat")
    seen: set[str] = set()
    keep = []
    for _, r in indexed:
        if r.target_true is None or not r.paraphrase_prompts or not r.neighborhood_prompts:
            continue
        if r.subject.lower() in seen:
            continue
        seen.add(r.subject.lower())
        keep.append(r)
    random.Random(config.seed).shuffle(keep)
    if len(keep) < config.edits:
        raise InputError(f"{path} has {len(keep)} usable records, the run needs {config.edits}")
    return keep[: config.edits]


def _sample(c: int, k: int, seed: int, salt: int) -> list[int]:
    """A fixed seeded subsample (sorted positions) of the first ``c`` edits, at most ``k``."""
    if k >= c:
        return list(range(c))
    return sorted(random.Random(seed * 1_000_003 + salt * 7919 + c).sample(range(c), k))


# ---------------------------------------------------------------------------
# held-out text and perplexity
# ---------------------------------------------------------------------------


def heldout_windows(tokenizer, config: SequentialConfig, corpus=None) -> list[list[int]]:
    """Token windows of held-out text: documents of the offline corpus (or ``corpus``) after
    the first ``ppl_skip_tokens`` tokens (counted as the statistics count them: each document
    truncated at 512), each document cut to ``ppl_seq_len`` tokens, until ``ppl_tokens``."""
    from ..stats.corpus import open_corpus

    seen, out, total = 0, [], 0
    for text in open_corpus(corpus).texts():
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if seen < config.ppl_skip_tokens:
            seen += min(len(ids), 512)
            continue
        ids = ids[: config.ppl_seq_len]
        if len(ids) < 8:
            continue
        out.append(ids)
        total += len(ids)
        if total >= config.ppl_tokens:
            return out
    raise InputError(f"the corpus has too little text past the first {config.ppl_skip_tokens} tokens for "
                     f"{config.ppl_tokens} held-out tokens (got {total})")


@torch.no_grad()
def perplexity(model, windows: Sequence[Sequence[int]], batch_size: int = 4) -> float:
    """exp of the mean next-token NLL over all predicted tokens of the windows."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, w in enumerate(chunk):
            ids[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        m = mask[:, 1:].to(device).bool()
        # only the predicted positions, through the fused log-softmax (no second vocab-wide tensor)
        tok = torch.nn.functional.cross_entropy(logits[:, :-1][m].float(), ids[:, 1:].to(device)[m],
                                                reduction="sum")
        nll += float(tok)
        count += int(m.sum())
    return math.exp(nll / count)


# ---------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------


def _generation_record(rec):
    """The record with its rewrite prompt (subject filled in) as its one generation prompt."""
    return replace(rec, generation_prompts=[rec.rewrite_prompt])


def score_checkpoint(model, tokenizer, records: Sequence[Any], c: int, config: SequentialConfig,
                     windows: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Per-record raw scores of the current model on the first ``c`` records: ES on all,
    PS/NS on the eval subsample, entropies on the fluency subsample, and the perplexity."""
    from ..evaluation import evaluate_records, record_fluency

    full = set(_sample(c, config.eval_sample, config.seed, 1))
    flu = _sample(c, config.fluency_sample, config.seed, 2) if config.fluency_sample else []
    recs = [records[i] if i in full else replace(records[i], paraphrase_prompts=[], neighborhood_prompts=[])
            for i in range(c)]
    rows = evaluate_records(model, tokenizer, recs).records
    ent = record_fluency(model, tokenizer, [_generation_record(records[i]) for i in flu], generations=1,
                         max_new_tokens=config.max_new_tokens, top_k=config.fluency_top_k,
                         seed=config.seed) if flu else []
    return {"es": [r["efficacy"] for r in rows],
            "ps": {i: rows[i]["paraphrase_success"] for i in sorted(full)},
            "ns": {i: rows[i]["neighborhood_success"] for i in sorted(full)},
            "fluency": dict(zip(flu, ent)), "ppl": perplexity(model, windows) if windows else None}


class Baseline:
    """The unedited model's scores, computed on first use per record and kept in a JSON file:
    ES/PS/NS per record position and entropy of its generation, and the held-out perplexity."""

    def __init__(self, path: Path, model, tokenizer, records: Sequence[Any], config: SequentialConfig,
                 windows: Sequence[Sequence[int]], key: str = "",
                 originals: Mapping[str, torch.Tensor] | None = None) -> None:
        self.path, self.model, self.tokenizer, self.records, self.config = path, model, tokenizer, records, config
        self.windows = windows
        # The unedited rewrite weights: whatever is computed here is computed on them, even
        # while the model carries edits (they are swapped in and back).
        self.originals = dict(originals or {})
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}
        if self.data.get("key") != key:  # another model, records or settings: start afresh
            self.data = {"key": key, "rows": {}, "fluency": {}, "ppl": None}

    def _save(self) -> None:
        write_json(self.path, self.data)

    @contextlib.contextmanager
    def _unedited(self):
        weights = {name: self.model.get_submodule(name).weight for name in self.originals}
        edited = {name: w.detach().clone() for name, w in weights.items()}
        try:
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(self.originals[name])
            yield
        finally:
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(edited[name])

    def rows(self, idx: Sequence[int]) -> dict[int, dict[str, Any]]:
        from ..evaluation import evaluate_records

        missing = [i for i in idx if str(i) not in self.data["rows"]]
        if missing:
            with self._unedited():
                got = evaluate_records(self.model, self.tokenizer, [self.records[i] for i in missing]).records
            for i, r in zip(missing, got):
                self.data["rows"][str(i)] = {k: r[k] for k in ("efficacy", "paraphrase_success",
                                                               "neighborhood_success")}
            self._save()
        return {i: self.data["rows"][str(i)] for i in idx}

    def fluency(self, idx: Sequence[int]) -> dict[int, float | None]:
        from ..evaluation import record_fluency

        missing = [i for i in idx if str(i) not in self.data["fluency"]]
        if missing:
            cfg = self.config
            with self._unedited():
                ent = record_fluency(self.model, self.tokenizer,
                                     [_generation_record(self.records[i]) for i in missing], generations=1,
                                     max_new_tokens=cfg.max_new_tokens, top_k=cfg.fluency_top_k, seed=cfg.seed)
            self.data["fluency"].update({str(i): e for i, e in zip(missing, ent)})
            self._save()
        return {i: self.data["fluency"][str(i)] for i in idx}

    def ppl(self) -> float | None:
        if self.data["ppl"] is None and self.windows:
            with self._unedited():
                self.data["ppl"] = perplexity(self.model, self.windows)
            self._save()
        return self.data["ppl"]


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def es_by_age(es: Sequence[float], batch_size: int, blocks: int = 4) -> dict[str, Any]:
    """Efficacy split by when the facts were edited (percent): over consecutive quarters of the
    edits so far, oldest first, and over the newest batch alone. Tells forgetting (old quarters
    low, newest batch high) from failing to write (the newest batch low too)."""
    n = len(es)
    bounds = [i * n // blocks for i in range(blocks + 1)]
    mean = lambda part: round(100 * statistics.fmean(part), 2) if part else None  # noqa: E731
    return {"es_by_quarter": [mean(es[a:b]) for a, b in zip(bounds, bounds[1:])],
            "es_newest_batch": mean(es[max(0, n - batch_size):])}


def summarise(raw: Mapping[str, Any], base: Baseline, c: int, config: SequentialConfig) -> dict[str, Any]:
    """The checkpoint row: means (percent for ES/PS/NS) with sample sizes, ES by age of the edit,
    and the unedited model's numbers on the same records and prompts."""
    idx = sorted(raw["ps"])
    pre_all = base.rows(idx)  # the unedited model on the same subsample (its ES there too)
    flu_idx = sorted(raw["fluency"])
    flu_pre = base.fluency(flu_idx)
    pairs = [(flu_pre[i], raw["fluency"][i]) for i in flu_idx
             if flu_pre[i] is not None and raw["fluency"][i] is not None]
    pct = lambda v: None if v is None else round(100 * v, 2)  # noqa: E731
    f_pre, f_post = _mean(p for p, _ in pairs), _mean(q for _, q in pairs)
    se = None
    if len(pairs) >= 2 and f_pre:
        diffs = [q - p for p, q in pairs]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) / f_pre
    ppl0 = base.ppl()
    return {
        "edits": c,
        "es": pct(_mean(raw["es"])), "n_es": len(raw["es"]), **es_by_age(raw["es"], config.batch_size),
        "ps": pct(_mean(raw["ps"].values())), "ns": pct(_mean(raw["ns"].values())), "n_ps_ns": len(idx),
        "unedited_es": pct(_mean(pre_all[i]["efficacy"] for i in idx)),
        "unedited_ps": pct(_mean(pre_all[i]["paraphrase_success"] for i in idx)),
        "unedited_ns": pct(_mean(pre_all[i]["neighborhood_success"] for i in idx)),
        "fluency": None if f_post is None else round(f_post, 4),
        "unedited_fluency": None if f_pre is None else round(f_pre, 4),
        "fluency_change_pct": None if not f_pre or f_post is None else round(100 * (f_post - f_pre) / f_pre, 2),
        "fluency_change_se_pct": None if se is None else round(100 * se, 2), "n_fluency": len(pairs),
        "ppl": None if raw["ppl"] is None else round(raw["ppl"], 4),
        "unedited_ppl": None if ppl0 is None else round(ppl0, 4),
        "ppl_tokens": config.ppl_tokens,
    }


# ---------------------------------------------------------------------------
# methods: one object per method that edits the next batch into the current model
# ---------------------------------------------------------------------------


class StatelessEditor:
    """A baseline as AlphaEdit's paper ran it: each batch a fresh ``pmsolve.edit`` on the current
    model with the preservation statistics only (``preserve_edits=0``). Its whole state is the
    model's weights."""

    persistent = False

    def __init__(self, model, tokenizer, method: str, factors: Mapping[int, Any], layers: Sequence[int] | None,
                 seed: int, options: Mapping[str, Any]) -> None:
        self.model, self.tokenizer, self.method, self.factors = model, tokenizer, method, factors
        self.layers, self.seed, self.options = layers, seed, dict(options)

    def edit(self, requests: Sequence[Mapping[str, Any]]):
        from ..editing import edit

        return edit(self.model, self.tokenizer, list(requests), method=self.method, layers=self.layers,
                    stats=self.factors, seed=self.seed, preserve_edits=0, **self.options)


class PersistentEditor:
    """A method that keeps state across batches, on ``pmsolve.Editor`` (retained keys, null-space
    projector, β-extended factor). The Editor saves itself after every batch (``state=``) and
    owns the edited weights: a resumed run reopens it on the unedited model, which re-applies
    its batches (``Editor.open``)."""

    persistent = True

    def __init__(self, model, tokenizer, editor_kwargs: Mapping[str, Any]) -> None:
        from ..editing import Editor

        self._cls = Editor
        self.model, self.tokenizer, self.kwargs = model, tokenizer, dict(editor_kwargs)
        self.ed = None

    def start(self, folder: Path) -> int:
        """Open the editor saved in ``folder`` or make a new one there: the batches it holds."""
        if (folder / "editor.json").exists():
            self.ed = self._cls.open(folder, self.model, self.tokenizer, self.kwargs.get("stats", "auto"))
        else:
            self.ed = self._cls(self.model, self.tokenizer, **self.kwargs, state=folder)
        return self.ed.batches_done

    def edit(self, requests: Sequence[Mapping[str, Any]]):
        return self.ed.edit(list(requests), batch_size=len(requests))


def method_settings(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over the method's :data:`METHOD_DEFAULTS`, merged one level down (a given
    ``null_space`` without c_weight keeps alphaedit+gamma's γ). Part of the run's identity, so a
    folder resumes only under the settings it was made with."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in METHOD_DEFAULTS.get(name, {}).items()}
    for k, v in options.items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), Mapping) and isinstance(v, Mapping) else v
    return out


def method_editor(name: str, model, tokenizer, factors: Mapping[int, Any], seed: int,
                  options: Mapping[str, Any] | None = None, raw_stats: Any = None):
    """The per-method "edit this batch" object (see :data:`METHODS`). ``raw_stats``: the
    statistics before factoring, for the Editor (AlphaEdit's projector needs C itself)."""
    options = dict(options or {})
    if name in STATELESS:
        return StatelessEditor(model, tokenizer, name, factors, options.pop("layers", None), seed, options)
    editor_kwargs = {"alphaedit": {"method": "alphaedit"}, "alphaedit+gamma": {"method": "alphaedit"},
                     "memit+beta": {"method": "memit"},
                     "emmet+beta": {"method": "emmet"},
                     "hard": {"method": "emmet", "retention": "hard"}}.get(name)
    if editor_kwargs is None:
        raise InputError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    stats = raw_stats if raw_stats is not None else factors
    return PersistentEditor(model, tokenizer, {**editor_kwargs, "stats": stats, "seed": seed, **options})


# ---------------------------------------------------------------------------
# state on disk
# ---------------------------------------------------------------------------


def rewrite_weights(model, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    from ..models.adapters import adapter_for

    ad = adapter_for(model)
    return {ad.rewrite_name(layer): ad.weight(layer) for layer in layers}


@dataclass
class MethodState:
    """What a method's folder holds after its last finished batch."""

    batches_done: int = 0
    batches: list[dict[str, Any]] = field(default_factory=list)  # per batch: timings, layers, seconds


def save_state(folder: Path, model, layers: Sequence[int], state: MethodState, key: str) -> None:
    """The edited rewrite weights of every layer that can be edited, and the batch log, in one
    atomically written file: a kill leaves the previous batch's state or this one, never a mix."""
    from safetensors.torch import save

    tensors = {name: w.detach().cpu().contiguous() for name, w in rewrite_weights(model, layers).items()}
    meta = {"format": FORMAT, "key": key, "batches_done": str(state.batches_done),
            "batches": json.dumps(state.batches)}
    atomic_write(folder / "state.safetensors", save(tensors, metadata=meta))
    write_json(folder / "batches.json", state.batches)  # a readable copy of the log


def load_state(folder: Path, model, layers: Sequence[int], key: str) -> MethodState | None:
    """Put the saved weights into ``model`` and return the state; None when there is none (or
    it is of another run: another model, records or settings)."""
    path = folder / "state.safetensors"
    if not path.exists():
        return None
    tensors, meta = read_safetensors(path, "sequential benchmark state")
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise CacheError(f"{path} holds the state of another run (other model, records or settings); "
                         "use another run folder or delete it")
    weights = rewrite_weights(model, layers)
    if set(tensors) != set(weights):
        raise CacheError(f"{path} holds weights {sorted(tensors)}, the model has {sorted(weights)}")
    with torch.no_grad():
        for name, w in weights.items():
            w.copy_(tensors[name].to(w.device, w.dtype))
    return MethodState(int(meta["batches_done"]), json.loads(meta["batches"]))


def _read_state_log(folder: Path, key: str) -> list[dict[str, Any]]:
    """The batch log of ``folder``'s state file without touching the model ([] when none)."""
    path = folder / "state.safetensors"
    if not path.exists():
        return []
    _, meta = read_safetensors(path, "sequential benchmark state")
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise CacheError(f"{path} holds the state of another run (other model, records or settings); "
                         "use another run folder or delete it")
    return json.loads(meta["batches"])


def _read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except FileNotFoundError:
        return []


def _append_line(path: Path, row: Mapping[str, Any]) -> None:
    rows = _read_lines(path) + [dict(row)]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def _timings_row(b: int, res, seconds: float, n: int) -> dict[str, Any]:
    t = {k: round(float(v), 4) for k, v in res.timings.items()}
    solver = t.get("keys", 0) + t.get("solve", 0) + t.get("apply", 0)
    return {"batch": b, "edits_after": (b + 1) * n, "seconds": round(seconds, 3), "timings": t,
            "without_values": round(solver, 4), "layers": list(res.layers)}


def run_method(model, tokenizer, records: Sequence[Any], config: SequentialConfig, folder: Path, editor,
               base: Baseline, windows, key: str, *, all_layers: Sequence[int],
               log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
               stop_at: float | None = None) -> list[dict[str, Any]]:
    """Edit ``records`` batch by batch into ``model`` with ``editor``, evaluating at each
    checkpoint; resume from ``folder``. ``stop_at``: a time.time() after which no new batch
    starts (the state stays resumable). Returns the checkpoint rows done so far."""
    folder.mkdir(parents=True, exist_ok=True)
    if editor.persistent:
        # The Editor's own folder decides how many batches are done; the log is cut to them (a
        # kill between the Editor's save and ours leaves that batch without its timing row).
        saved = _read_state_log(folder, key)
        n = editor.start(folder / "editor")
        state = MethodState(n, [r for r in saved if r["batch"] < n])
    else:
        state = load_state(folder, model, all_layers, key) or MethodState()
    if state.batches_done:
        log(f"{folder.name}: resumed after batch {state.batches_done} ({state.batches_done * config.batch_size} edits)")
    rows_path = folder / "checkpoints.jsonl"
    done = {r["edits"] for r in _read_lines(rows_path)}
    n_batches = config.edits // config.batch_size
    bs = config.batch_size
    b = state.batches_done
    while True:
        c = b * bs
        if c in config.checkpoint_list and c not in done:
            t0 = time.perf_counter()
            raw = score_checkpoint(model, tokenizer, records, c, config, windows)
            row = summarise(raw, base, c, config)
            row.update(method=folder.name, eval_seconds=round(time.perf_counter() - t0, 1))
            _append_line(rows_path, row)
            done.add(c)
            log(f"{folder.name} @ {c}: ES {row['es']} PS {row['ps']} NS {row['ns']} (unedited {row['unedited_ns']}) "
                f"fluency {row['fluency_change_pct']}% ppl {row['ppl']} (unedited {row['unedited_ppl']}) "
                f"[{row['eval_seconds']} s]")
        if b >= n_batches:
            break
        if stop_at is not None and time.time() > stop_at:
            log(f"{folder.name}: stopping before batch {b + 1} (time limit); the run resumes from here")
            break
        batch = records[b * bs : (b + 1) * bs]
        t0 = time.perf_counter()
        res = editor.edit([r.as_request() for r in batch])
        seconds = time.perf_counter() - t0
        state.batches.append(_timings_row(b, res, seconds, bs))
        state.batches_done = b + 1
        save_state(folder, model, all_layers, state, key)
        t = state.batches[-1]
        log(f"{folder.name}: batch {b + 1}/{n_batches} in {seconds:.1f} s (v* {t['timings'].get('values', 0):.1f} s, "
            f"solve {t['timings'].get('solve', 0):.2f} s)")
        b += 1
    return _read_lines(rows_path)


def run(model, tokenizer, records: Sequence[Any], config: SequentialConfig, run_dir: str | Path, *,
        methods: Sequence[str] = STATELESS, stats: Any = "auto", model_id: str | None = None,
        method_options: Mapping[str, Mapping[str, Any]] | None = None, corpus=None,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
        stop_at: float | None = None) -> dict[str, Any]:
    """Run the benchmark for each method in turn (the model is put back to its unedited weights
    between methods and at the end). ``stats``: preservation statistics of the unedited model,
    anything pmsolve.edit takes ("auto": the cached offline statistics, ``stats_tokens`` per
    layer). ``method_options``: per method, further keyword arguments of pmsolve.edit /
    pmsolve.Editor (e.g. layers, value_config). Writes ``run_dir``/results.jsonl (one row per
    method and checkpoint, plus the unedited reference) and returns {rows, batches, ...}."""
    from ..editing.editor import auto_stats
    from ..editing.presets import preset_for
    from ..editing.steps import factor_stats
    from ..models.adapters import adapter_for
    from ..stats import weights_fingerprint

    config.check()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if len(records) < config.edits:
        raise InputError(f"{len(records)} records given, the run needs {config.edits}")
    records = list(records[: config.edits])
    method_options = {m: dict(o) for m, o in (method_options or {}).items()}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    adapter = adapter_for(model)
    model_id = model_id or getattr(getattr(model, "config", None), "_name_or_path", None)
    fingerprint = weights_fingerprint(model)
    preset = preset_for(model, model_id)
    layers_of = {}
    for m in methods:
        given = method_options.get(m, {}).get("layers")
        base_method = {"alphaedit": "emmet", "alphaedit+gamma": "emmet", "memit+beta": "memit", "emmet+beta": "emmet", "hard": "emmet"}.get(m, m)
        if given is None and (preset is None or base_method not in preset.methods):
            raise InputError(f"no preset gives {m}'s layers for this model: pass layers in method_options")
        layers_of[m] = list(given) if given is not None else list(preset.for_method(base_method).layers)
    all_layers = sorted({layer for ls in layers_of.values() for layer in ls})
    t0 = time.perf_counter()
    if isinstance(stats, str) and stats == "auto":
        stats = auto_stats(model, tokenizer, all_layers, model_id, max_tokens=config.stats_tokens)
    factors = factor_stats(stats, all_layers, adapter, model_id)
    log(f"statistics and factors for layers {all_layers}: {time.perf_counter() - t0:.1f} s")
    records_key = content_hash([r.to_dict() for r in records[: config.batch_size]])  # the head fixes the order
    ident = {"format": FORMAT, "fingerprint": fingerprint, "config": config.identity(),
             "records_head": records_key}
    write_json(run_dir / "run.json", {**ident, "edits": config.edits, "checkpoints": config.checkpoint_list,
                                      "records": [r.case_id for r in records]})
    # pmsolve.edit samples its context templates from the model once per model and keeps them
    # (in memory, and on disk for named models): draw them here, from the unedited model, so
    # that a resumed run (a new model object loaded with edited weights) uses the same ones.
    from ..editing.keys import context_templates
    from ..models.document_start import with_document_start

    for start in {o.get("document_start", "auto") for o in [*method_options.values(), {}]}:
        context_templates(model, with_document_start(tokenizer, start)[0], seed=config.seed)
    windows = heldout_windows(tokenizer, config, corpus)
    originals = {name: w.detach().clone() for name, w in rewrite_weights(model, all_layers).items()}
    base = Baseline(run_dir / "unedited.json", model, tokenizer, records, config, windows, content_hash(ident),
                    originals)
    out: dict[str, Any] = {"rows": [], "batches": {}, "run_dir": str(run_dir), "skipped": {}}
    try:
        for m in methods:
            opts = method_settings(m, method_options.get(m, {}))
            opts["layers"] = layers_of[m]
            # Not keyed by the number of edits: a longer run continues a shorter one (the
            # records of a longer run start with a shorter run's; ident holds their head).
            key = content_hash({**ident, "method": m, "options": opts})
            try:
                editor = method_editor(m, model, tokenizer, factors, config.seed, opts, raw_stats=stats)
            except InputError as exc:
                out["skipped"][m] = str(exc)
                log(f"{m}: not run: {exc}")
                continue
            run_method(model, tokenizer, records, config, run_dir / m.replace("+", "_"), editor, base,
                       windows, key, all_layers=all_layers, log=log, stop_at=stop_at)
            with torch.no_grad():
                for name, w in rewrite_weights(model, all_layers).items():
                    w.copy_(originals[name])
    finally:
        with torch.no_grad():
            for name, w in rewrite_weights(model, all_layers).items():
                w.copy_(originals[name])
    # every method run in this folder so far (also by earlier invocations), in METHODS order
    out["rows"], out["batches"] = [], {}
    for m in METHODS:
        folder = run_dir / m.replace("+", "_")
        rows = [dict(r, method=m) for r in _read_lines(folder / "checkpoints.jsonl")]
        if rows:
            out["rows"] += sorted(rows, key=lambda r: r["edits"])
            out["batches"][m] = json.loads((folder / "batches.json").read_text())
    reached = sorted({r["edits"] for r in out["rows"] if r["edits"] <= config.edits} | set(config.checkpoint_list))
    out["rows"] = [unedited_row(base, c, config) for c in reached] + out["rows"]
    atomic_write(run_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in out["rows"]).encode())
    write_json(run_dir / "timings.json", solver_times(out["batches"]))
    out["solver_times"] = solver_times(out["batches"])
    return out


def unedited_row(base: Baseline, c: int, config: SequentialConfig) -> dict[str, Any]:
    """The unedited model on the eval subsample of the first ``c`` records (ES, PS, NS)."""
    idx = _sample(c, config.eval_sample, config.seed, 1)
    rows = base.rows(idx)  # ES too on the subsample: the unedited model's is near 0 and costs as much as PS/NS
    pct = lambda v: None if v is None else round(100 * v, 2)  # noqa: E731
    flu = base.fluency(_sample(c, config.fluency_sample, config.seed, 2)) if config.fluency_sample else {}
    f = _mean(flu.values())
    ppl = base.ppl()
    return {"method": "unedited", "edits": c, "es": pct(_mean(rows[i]["efficacy"] for i in idx)), "n_es": len(idx),
            "ps": pct(_mean(rows[i]["paraphrase_success"] for i in idx)),
            "ns": pct(_mean(rows[i]["neighborhood_success"] for i in idx)), "n_ps_ns": len(idx),
            "fluency": None if f is None else round(f, 4), "n_fluency": len(flu),
            "ppl": None if ppl is None else round(ppl, 4), "ppl_tokens": config.ppl_tokens}


def solver_times(batches: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Per method: the first and the last batch's stage timings, with and without v*."""
    out = {}
    for m, rows in batches.items():
        if not rows:
            continue
        first, last = rows[0], rows[-1]
        out[m] = {"first_batch": first["batch"], "last_batch": last["batch"], "edits_at_last": last["edits_after"],
                  "batch_size": first["edits_after"] // (first["batch"] + 1),
                  "solve_first": first["timings"].get("solve"), "solve_last": last["timings"].get("solve"),
                  "keys_first": first["timings"].get("keys"), "keys_last": last["timings"].get("keys"),
                  "apply_first": first["timings"].get("apply"), "apply_last": last["timings"].get("apply"),
                  "without_values_first": first["without_values"], "without_values_last": last["without_values"],
                  "total_first": first["seconds"], "total_last": last["seconds"],
                  "values_first": first["timings"].get("values"), "values_last": last["timings"].get("values")}
    return out


def collapse_point(rows: Sequence[Mapping[str, Any]], threshold: float = 80.0) -> int | None:
    """The first checkpoint where efficacy over all edits so far is below ``threshold`` percent."""
    for r in sorted(rows, key=lambda r: r["edits"]):
        if r.get("es") is not None and r["es"] < threshold:
            return r["edits"]
    return None


def plot_curve(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """ES, PS, NS and held-out perplexity against the number of edits, one line per ``method``
    label of ``rows`` (the unedited model dashed), into ``path`` (PNG). Needs matplotlib (the ``experiments`` extra)."""
    from .report import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = (("es", "efficacy (ES, all edits so far)"), ("ps", "paraphrase (PS)"),
              ("ns", "neighbourhood (NS)"), ("ppl", "held-out perplexity"))
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("edits")
    for m in dict.fromkeys(r["method"] for r in rows):  # in order of appearance (any label)
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["edits"])
        for ax, (key, _) in zip(axes, panels):
            pts = [(r["edits"], r[key]) for r in mine if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "k--" if m == "unedited" else "o-", label=m)
    axes[3].set_yscale("log")
    axes[0].axhline(80, color="grey", lw=0.6)  # the collapse line
    axes[0].legend(fontsize=8)
    path = Path(path)
    _save(plt, fig, path.parent, path.name)
    return path


def _age(row: Mapping[str, Any]) -> str:
    """A row's ES by age as "q1 / q2 / q3 / q4; newest", or "–" for rows written before it was kept."""
    if row.get("es_by_quarter") is None:
        return "–"
    return f"{' / '.join(f'{q:g}' for q in row['es_by_quarter'])}; {row['es_newest_batch']:g}"


def report(rows: Sequence[Mapping[str, Any]], times: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown tables of a run: per checkpoint, every method with the unedited reference; each
    method's collapse point; the first and last batch's stage timings."""
    fmt = lambda v, unit="": "–" if v is None else f"{v:g}{unit}"  # noqa: E731
    lines = []
    for c in sorted({r["edits"] for r in rows}):
        lines += [f"**After {c} edits**", "",
                  "| method | ES (n) | ES by age: quarters, oldest first; newest batch | PS | NS (unedited) | n PS/NS "
                  "| fluency (unedited) | Δ fluency % (± se) | perplexity (unedited) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["edits"] == c):
            unedited = r["method"] == "unedited"
            lines.append(
                f"| {r['method']} | {fmt(r['es'])} ({r['n_es']}) | {_age(r)} | {fmt(r['ps'])} | {fmt(r['ns'])}"
                f"{'' if unedited else ' (' + fmt(r.get('unedited_ns')) + ')'} | {r['n_ps_ns']} "
                f"| {fmt(r['fluency'])}{'' if unedited else ' (' + fmt(r.get('unedited_fluency')) + ')'} "
                f"| {'' if unedited else fmt(r.get('fluency_change_pct')) + ' ± ' + fmt(r.get('fluency_change_se_pct'))} "
                f"| {fmt(r['ppl'])}{'' if unedited else ' (' + fmt(r.get('unedited_ppl')) + ')'} |")
        lines.append("")
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    if methods:
        lines += ["| method | last checkpoint | collapse (first ES < 80 %) |", "|---|---|---|"]
        for m in methods:
            mine = [r for r in rows if r["method"] == m]
            cp = collapse_point(mine)
            lines.append(f"| {m} | {max(r['edits'] for r in mine)} | "
                         f"{cp if cp is not None else 'none up to ' + str(max(r['edits'] for r in mine))} |")
        lines.append("")
    if times:
        lines += ["| method | batch (edits after it) | total s | v* s | keys s | solve s | apply s | all but v* s |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, t in times.items():
            for which in ("first", "last"):
                lines.append(f"| {m} | {t[which + '_batch'] + 1} ({(t[which + '_batch'] + 1) * t['batch_size']}) "
                             f"| {fmt(t['total_' + which])} | {fmt(t['values_' + which])} | {fmt(t['keys_' + which])} "
                             f"| {fmt(t['solve_' + which])} | {fmt(t['apply_' + which])} "
                             f"| {fmt(t['without_values_' + which])} |")
    return "\n".join(lines)
