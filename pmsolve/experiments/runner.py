"""The four experiments of docs/RESULTS.md, on one model and one seeded sample of facts.

Shared setup (:class:`Env`): the model, a seeded sample of the built-in facts, Cholesky
factors of the preservation statistics per layer, per-fact keys and values at the
single edit layer (:mod:`.precompute`), and the unedited model's scores (cached).

1. :func:`batch_sweep`: EMMET vs MEMIT, single layer, batch sizes 1 … 256.
2. :func:`distribution`: ROME / EMMET / MEMIT × single layer vs MEMIT's spread.
3. :func:`stability`: cond(KᵀC⁻¹K) vs batch size, the ridge needed, and solves without it.
4. :func:`sequential`: batch after batch into the same model; all earlier edits re-scored.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import settings
from .._io import cached_json, content_hash
from ..editing.steps import WeightSnapshot, factor_stats
from ..errors import PMSolveError
from ..evaluation import harmonic_score, mean_or_none, paired_relative_se, record_fluency, relative_change
from ..models.adapters import adapter_for
from .precompute import FactTensors, apply_solve, fact_tensors, solve_and_apply


@dataclass(frozen=True)
class Config:
    n_facts: int = 256               # facts sampled (with the seed) from the built-in set
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64, 256)
    min_facts_per_point: int = 16    # small batches are repeated over this many facts
    eval_cap: int = 64               # full ES/PS/NS on at most this many facts per point (ES on all)
    # Generation prompts per point (one per fact). Per-generation entropy changes are large, so
    # the change of the mean needs tens of generations to resolve a few %; its standard error
    # is reported beside it.
    fluency_prompts: int = 64
    max_new_tokens: int = 100
    # Fluency generations sample from the top k tokens, as the reference metric does (k = 5);
    # None: greedy. Greedy continuations of a small model fall into loops or out of them at
    # random, so greedy fluency is dominated by a few generations (docs/benchmarks.md).
    fluency_top_k: int | None = 5
    dist_facts: int = 16             # facts in experiment 2
    seq_facts: int = 256             # facts edited one batch after another in experiment 4
    seq_batch: int = 32
    seq_checkpoints: tuple[int, ...] = (1, 2, 4, 8)  # after how many batches everything is re-scored
    seq_eval_cap: int = 32           # PS/NS on at most this many of the edited facts per checkpoint
    drift_facts: int = 16            # facts whose v* is re-optimised on the sequentially edited model
    memit_lambdas: tuple[float, ...] = (1.0, 1e2, 1e3, 1.5e4, 1e5)
    # Experiment 1's third series: EMMET on the rewrite prompts' own keys with the batch's
    # prompt tokens in the preservation term at this weight (pmsolve.edit(preserve_prompts=...));
    # 0 leaves the series out.
    prompt_preservation: float = 1.0
    layer: int | None = None         # single edit layer (None: the EMMET preset's)
    spread: tuple[int, ...] | None = None  # MEMIT's layers (None: the MEMIT preset's)
    stats_tokens: int = 50_000       # per layer; bounded by the CPU budget of a full run
    seed: int = 0


QUICK = Config(n_facts=8, batch_sizes=(1, 4, 8), min_facts_per_point=4, eval_cap=8, fluency_prompts=2,
               max_new_tokens=8, dist_facts=2, seq_facts=8, seq_batch=4, seq_checkpoints=(1, 2), seq_eval_cap=4,
               drift_facts=2, memit_lambdas=(1.0, 1e4), stats_tokens=4000)


@dataclass
class Env:
    model: Any
    tokenizer: Any
    model_id: str
    records: list                    # EditRecord, in the seeded sample order
    layer: int                       # single edit layer (the EMMET preset's)
    spread: list[int]                # MEMIT's layers (its preset's)
    memit_mu: float | None
    factors: dict[int, Any]
    facts: FactTensors
    pre: list[dict[str, Any]]        # unedited per-record scores
    pre_fluency: list[float]         # unedited entropy of each record's first generation prompt
    config: Config
    corpus: str
    value_config: Any                # the preset's v* settings, as pmsolve.edit uses them
    timings: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def requests(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        return [self.records[i].as_request() for i in idx]


# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------


def setup(model, tokenizer, model_id: str, records: Sequence, config: Config, cache_dir: Path, *,
          corpus: str | None = None, log: Callable[[str], None] = print, value_config=None) -> Env:
    """Sample facts, collect/load statistics, factor them, precompute keys/values and baselines
    (v* with ``value_config``, default the model preset's)."""
    from ..editing.presets import preset_for
    from ..editing.requests import load_requests
    from ..stats import collect_stats, weights_fingerprint

    # A seeded shuffle, then a prefix: a smaller n_facts gives the first facts of a larger one,
    # so cached keys/values and baselines carry over between run sizes.
    order = list(records)
    random.Random(config.seed).shuffle(order)
    sample = order[: config.n_facts]
    preset = preset_for(model)
    layer = config.layer if config.layer is not None else preset.for_method("emmet").layers[-1]
    spread = list(config.spread or preset.for_method("memit").layers)
    timings: dict[str, float] = {}
    fp = weights_fingerprint(model)
    t0 = time.perf_counter()
    stats = collect_stats(model, tokenizer, sorted({layer, *spread}), corpus, max_tokens=config.stats_tokens,
                          cache_dir=cache_dir / "stats", model_id=model_id, progress=False)
    factors = factor_stats(stats, sorted({layer, *spread}), adapter_for(model), model_id)
    timings["statistics_and_factors"] = time.perf_counter() - t0
    log(f"statistics: {stats_corpus_id(stats, corpus)}, layers {sorted(factors)}, "
        f"{'cached' if stats.from_cache else 'computed'}")
    t0 = time.perf_counter()
    reqs = load_requests([r.as_request() for r in sample])
    value_config = value_config or preset.values
    facts = fact_tensors(model, tokenizer, reqs, layer, fingerprint=fp, seed=config.seed, value_config=value_config,
                         cache_dir=cache_dir / "experiments",
                         progress=lambda d, n: log(f"keys/values: {d}/{n} new facts"))
    timings["keys_values"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    key = content_hash({"records": [r.to_dict() for r in sample], "tokens": config.max_new_tokens,
                        "fluency_prompts": config.fluency_prompts, "fluency_top_k": config.fluency_top_k,
                        "seed": config.seed})
    base, hit = cached_json(cache_dir / "experiments" / f"baseline-{fp}-{key}.json",
                            lambda: _baseline(model, tokenizer, sample, config))
    timings["baseline"] = time.perf_counter() - t0
    log(f"baseline: {'cache hit' if hit else 'computed'} for {len(sample)} facts")
    return Env(model, tokenizer, model_id, sample, layer, spread, preset.for_method("memit").mu, factors, facts,
               base["scores"], base["fluency"], config, stats_corpus_id(stats, corpus), value_config, timings, log)


def stats_corpus_id(stats, corpus: str | None) -> str:
    """What the statistics were computed on, for the report."""
    return f"{corpus or 'offline default corpus'} ({stats.tokens} tokens per layer)"


def _baseline(model, tokenizer, records, config: Config) -> dict[str, Any]:
    from ..evaluation import evaluate_records

    scores = evaluate_records(model, tokenizer, records).records
    # Fluency is only ever measured on the first facts of the sample (Config.fluency_prompts).
    head = _fluency_of(model, tokenizer, records[: config.fluency_prompts], config)
    return {"scores": scores, "fluency": head + [None] * (len(records) - len(head))}


def _fluency_of(model, tokenizer, records, config: Config) -> list[float | None]:
    """Entropy of the continuation of each record's first generation prompt (None: none)."""
    return record_fluency(model, tokenizer, records, generations=1, max_new_tokens=config.max_new_tokens,
                          top_k=config.fluency_top_k, seed=config.seed)


# ---------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------


def score(env: Env, idx: Sequence[int], *, full: Sequence[int] = (), with_fluency: Sequence[int] = ()
          ) -> dict[str, list]:
    """Scores of the current (edited) model: efficacy for every fact in ``idx``; paraphrase
    and neighbourhood success for those in ``full``; entropy for those in ``with_fluency``."""
    from ..evaluation import evaluate_records

    full_set = set(full)
    recs = [env.records[i] if i in full_set else replace(env.records[i], paraphrase_prompts=[],
                                                          neighborhood_prompts=[]) for i in idx]
    rows = evaluate_records(env.model, env.tokenizer, recs).records if recs else []
    flu = _fluency_of(env.model, env.tokenizer, [env.records[i] for i in with_fluency], env.config)
    out: dict[str, list] = {"es": [], "ps": [], "ns": [], "fluency": [], "fluency_pre": []}
    for i, row in zip(idx, rows):
        out["es"].append(row["efficacy"])
        if i in full_set:
            out["ps"].append(row["paraphrase_success"])
            out["ns"].append(row["neighborhood_success"])
    for i, f in zip(with_fluency, flu):
        if f is not None and env.pre_fluency[i] is not None:
            out["fluency"].append(f)
            out["fluency_pre"].append(env.pre_fluency[i])
    return out


def summarise(parts: Sequence[dict[str, list]]) -> dict[str, Any]:
    """Pool per-chunk score lists into means, Score and counts (facts per number)."""
    pooled = {k: [x for p in parts for x in p[k] if x is not None] for k in parts[0]} if parts else {}
    m = {k: mean_or_none(v) for k, v in pooled.items()}
    out = {"es": m.get("es"), "ps": m.get("ps"), "ns": m.get("ns"),
           "n_es": len(pooled.get("es", [])), "n_full": len(pooled.get("ps", [])),
           "fluency": m.get("fluency"), "fluency_pre": m.get("fluency_pre"), "n_fluency": len(pooled.get("fluency", []))}
    out["score"] = harmonic_score(out["es"], out["ps"], out["ns"])
    out["fluency_change"] = relative_change(out["fluency_pre"], out["fluency"])
    out["fluency_change_se"] = paired_relative_se(pooled.get("fluency_pre", []), pooled.get("fluency", []))
    return out


def pre_scores(env: Env, idx: Sequence[int]) -> dict[str, Any]:
    rows = [env.pre[i] for i in idx]
    return summarise([{"es": [r["efficacy"] for r in rows], "ps": [r["paraphrase_success"] for r in rows],
                       "ns": [r["neighborhood_success"] for r in rows],
                       "fluency": [env.pre_fluency[i] for i in idx], "fluency_pre": [env.pre_fluency[i] for i in idx]}])


def _diag(upd) -> dict[str, Any]:
    d = upd.diagnostics
    return {"n": d.n, "cond_G": d.cond_G, "cond_C": d.cond_C, "mu": d.mu, "mu_relative": d.mu_relative,
            "ridge_fallback": d.ridge_fallback, "residual": d.residual,
            "preservation_cost": d.preservation_cost, "seconds": d.seconds}


# ---------------------------------------------------------------------------
# 1. batch sweep
# ---------------------------------------------------------------------------


def _edit_chunks(env: Env, method: str, mu: float | None, b: int, n_point: int, full_cap: int,
                 fluency_cap: int, key_source: str = "average", preserve_prompts: float = 0.0) -> dict[str, Any]:
    """Edit ``n_point`` facts in independent chunks of ``b`` (each on the unedited model);
    ES on all, PS/NS on the first ``full_cap``, fluency on the first chunk's first ``fluency_cap``."""
    facts = list(range(n_point))
    full = set(facts[:full_cap])
    flu = set(facts[: min(fluency_cap, b)])  # first chunk only: one batched generation per point
    parts, diags, errors = [], [], []
    snap = WeightSnapshot(env.model)
    for s in range(0, n_point, b):
        chunk = facts[s : s + b]
        try:
            upd = solve_and_apply(snap, env.factors[env.layer], env.facts, chunk, method, mu,
                                  key_source=key_source, preserve_prompts=preserve_prompts,
                                  tokenizer=env.tokenizer, seed=env.config.seed)
        except PMSolveError as exc:  # e.g. contradictory equality constraints: reported, not scored
            errors.append({"facts": chunk, "error": f"{type(exc).__name__}: {exc}"})
            continue
        try:
            diags.append(_diag(upd))
            parts.append(score(env, chunk, full=[i for i in chunk if i in full],
                               with_fluency=[i for i in chunk if i in flu]))
        finally:
            snap.restore()
    return {**summarise(parts), "solves": diags, "errors": errors}


PP_SERIES = "emmet-pp"  # experiment 1's EMMET with prompt keys and prompt preservation


def _batch_sizes(cfg: Config, n: int) -> list[int]:
    """The configured batch sizes that fit in n facts, plus n itself when a larger one did not fit."""
    sizes = [b for b in cfg.batch_sizes if b <= n]
    return sizes + [n] if n < max(cfg.batch_sizes) and n not in sizes else sizes


def batch_sweep(env: Env) -> dict[str, Any]:
    cfg, n = env.config, len(env.records)
    # series label: (solver, μ, key source, prompt-preservation weight)
    series = {"emmet": ("emmet", None, "average", 0.0), "memit": ("memit", env.memit_mu, "average", 0.0)}
    if cfg.prompt_preservation > 0:
        series[PP_SERIES] = ("emmet", None, "prompt", cfg.prompt_preservation)
    points = []
    for b in _batch_sizes(cfg, n):
        n_point = min(n, max(b, cfg.min_facts_per_point))
        for label, (method, mu, key_source, alpha) in series.items():
            t0 = time.perf_counter()
            res = _edit_chunks(env, method, mu, b, n_point, cfg.eval_cap, cfg.fluency_prompts, key_source, alpha)
            res.update(method=label, solver=method, key_source=key_source, preserve_prompts=alpha,
                       batch_size=b, n_edited=n_point, mu_requested=mu,
                       seconds_total=time.perf_counter() - t0,
                       solve_seconds_per_batch=mean_or_none([d["seconds"] for d in res["solves"]]),
                       cond_G_max=max((d["cond_G"] for d in res["solves"]), default=None),
                       ridge_fallbacks=sum(d["ridge_fallback"] for d in res["solves"]))
            points.append(res)
            env.log(f"sweep {label} b={b}: ES {res['es']} PS {res['ps']} NS {res['ns']} cond_G {res['cond_G_max']} "
                    f"failed batches {len(res['errors'])}")
    return {"layer": env.layer, "points": points, "lambda": _lambda_sweep(env), "pre": pre_scores(env, range(n)),
            "keys_values_seconds_per_fact": env.facts.seconds_per_fact}


def _lambda_sweep(env: Env) -> list[dict[str, Any]]:
    """MEMIT's λ at one batch size: with C the mean second moment, diag G is of order d, so
    small λ makes MEMIT an equality solve (docs/design.md §2.5); ES on the batch, PS/NS on a quarter."""
    cfg = env.config
    b = min(len(env.records), 64)
    rows = []
    for mu in cfg.memit_lambdas:
        res = _edit_chunks(env, "memit", mu, b, b, max(1, b // 4), 0)
        rows.append({**{k: v for k, v in res.items() if k != "solves"}, "mu": mu, "batch_size": b,
                     "preservation_cost": res["solves"][0]["preservation_cost"],
                     "residual": res["solves"][0]["residual"], "cond_G": res["solves"][0]["cond_G"]})
        env.log(f"MEMIT λ={mu:g} b={b}: ES {rows[-1]['es']} residual {rows[-1]['residual']}")
    return rows


# ---------------------------------------------------------------------------
# 2. edit distribution disentangled
# ---------------------------------------------------------------------------


def distribution(env: Env) -> dict[str, Any]:
    """Each solver with a single layer (precomputed keys/values) and with MEMIT's spread
    (pmsolve.edit, which re-measures keys and residuals after each layer)."""
    from ..editing import edit

    idx = list(range(min(env.config.dist_facts, len(env.records))))
    rows = []
    spread_values: dict = {}  # v* at the last spread layer, shared by the three solvers
    for method, mu in (("rome", None), ("emmet", None), ("memit", env.memit_mu)):
        b = 1 if method == "rome" else len(idx)
        chunks = [idx[s : s + b] for s in range(0, len(idx), b)]
        for dist in ("single", "spread"):
            t0 = time.perf_counter()
            parts, diags = [], []
            for chunk in chunks:
                if dist == "single":
                    snap = WeightSnapshot(env.model)
                    upd = solve_and_apply(snap, env.factors[env.layer], env.facts, chunk, method, mu)
                    diags.append(_diag(upd))
                    restore = snap.restore
                else:
                    res = edit(env.model, env.tokenizer, env.requests(chunk), method=method, layers=env.spread,
                               distribution="memit", stats=env.factors, mu=mu, seed=env.config.seed,
                               model_id=env.model_id, value_cache=spread_values)
                    diags += [_diag(e.update) for e in res.edits]
                    restore = res.restore
                try:
                    parts.append(score(env, chunk, full=chunk))
                finally:
                    restore()
            row = {**summarise(parts), "method": method, "distribution": dist, "batch_size": b,
                   "layers": [env.layer] if dist == "single" else env.spread, "n_facts": len(idx),
                   "seconds": time.perf_counter() - t0, "cond_G_max": max(d["cond_G"] for d in diags),
                   "ridge_fallbacks": sum(d["ridge_fallback"] for d in diags)}
            rows.append(row)
            env.log(f"distribution {method}/{dist}: ES {row['es']} PS {row['ps']} NS {row['ns']}")
    return {"rows": rows, "pre": pre_scores(env, idx),
            "note": "single-layer rows reuse keys/values computed once on the unedited model; spread rows run "
                    "pmsolve.edit, with v* optimised once per fact at the last spread layer and shared by the "
                    "three solvers (value_cache)"}


# ---------------------------------------------------------------------------
# 3. stability
# ---------------------------------------------------------------------------


def _solve_only(env: Env, K: torch.Tensor, R: torch.Tensor, method: str, mu: float | None,
                ridge: bool) -> dict[str, Any]:
    """One solve with the default ridge fallback, or with none at all (μ as given, no
    condition limit); returns diagnostics and ‖Δ‖_F, or the error raised."""
    from ..editing.steps import solve_layer

    try:
        with contextlib.ExitStack() as stack:
            if not ridge:
                stack.enter_context(settings.ridge_schedule(()))
                stack.enter_context(settings.max_cond(math.inf))
            upd = solve_layer(env.factors[env.layer], K, R, method, mu)
    except (PMSolveError, torch.linalg.LinAlgError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    # ‖Δ‖_F = ‖U Bᵀ‖_F via the n × n Gram matrices (no d_out × d_in product).
    norm = float(torch.sqrt(torch.trace((upd.U.mT @ upd.U) @ (upd.B.mT @ upd.B)).clamp_min(0)))
    return {**_diag(upd), "delta_norm": norm}


def stability(env: Env) -> dict[str, Any]:
    """cond(G) and the ridge per batch size on real facts; then batches with a repeated fact
    (consistent duplicates: G singular) and near-duplicates, with and without the ridge."""
    cfg, n = env.config, len(env.records)
    rows = []
    for b in _batch_sizes(cfg, n):
        K, R = env.facts.select(range(b))
        for ridge in (True, False):
            rows.append({"case": "distinct facts", "batch_size": b, "ridge": ridge,
                         **_solve_only(env, K, R, "emmet", None, ridge)})
    b = _batch_sizes(cfg, n)[-1]
    K, R = env.facts.select(range(b))
    gen = torch.Generator().manual_seed(cfg.seed)
    for eps in (0.0, 1e-6, 1e-3):
        # The first 8 facts (at most half the batch) requested a second time, keys perturbed by eps.
        dup = list(range(min(8, max(1, b // 2))))
        noise = torch.randn(K.shape[0], len(dup), generator=gen, dtype=torch.float64)
        Kd = K[:, dup] + eps * noise * K[:, dup].norm(dim=0) / noise.norm(dim=0)
        K2, R2 = torch.cat([K, Kd], 1), torch.cat([R, R[:, dup]], 1)
        for ridge in (True, False):
            rows.append({"case": f"{len(dup)} facts repeated, keys perturbed by {eps:g} (relative)",
                         "batch_size": K2.shape[1], "ridge": ridge, **_solve_only(env, K2, R2, "emmet", None, ridge)})
    # Contradictory duplicates: the same keys asked for a different value.
    K3, R3 = torch.cat([K, K[:, :1]], 1), torch.cat([R, -R[:, :1]], 1)
    for method, mu in (("emmet", None), ("memit", env.memit_mu)):
        rows.append({"case": "one fact repeated with a contradictory value", "batch_size": K3.shape[1],
                     "ridge": True, "method": method, **_solve_only(env, K3, R3, method, mu, True)})
    subjects = [r.subject for r in env.records[:b]]
    return {"rows": rows, "repeated_subjects": len(subjects) - len(set(subjects)), "n": b,
            "ridge_schedule": list(settings.get("ridge_schedule")), "max_cond": settings.get("max_cond")}


# ---------------------------------------------------------------------------
# 4. sequential
# ---------------------------------------------------------------------------


def sequential(env: Env) -> dict[str, Any]:
    """EMMET batches into one model. Keys are exact (an edit of layer L's output projection
    does not change its own inputs) and the current outputs are exact too,
    h = h₀ + (W − W₀)k_bare; v* comes from the unedited model (RESULTS.md reports its drift)."""
    cfg = env.config
    n = min(cfg.seq_facts, len(env.records))
    batches = [list(range(s, min(s + cfg.seq_batch, n))) for s in range(0, n, cfg.seq_batch)]
    weight = adapter_for(env.model).weight(env.layer)
    w0 = weight.detach().to(torch.float64).clone()
    snap = WeightSnapshot(env.model)
    steps = []
    try:
        for j, chunk in enumerate(batches, 1):
            K, R = env.facts.select(chunk)
            # Earlier edits moved this batch's current outputs by ΔW k_bare (bare-prompt keys).
            R = R - _delta_w(env, weight, w0) @ env.facts.k_bare[chunk].T.to(torch.float64)
            upd = apply_solve(snap, env.layer, env.factors[env.layer], K, R, "emmet", None)
            if j in cfg.seq_checkpoints or j == len(batches):
                done = [i for c in batches[:j] for i in c]
                sample = done[: cfg.seq_eval_cap]
                s = summarise([score(env, done, full=sample, with_fluency=done[: cfg.fluency_prompts])])
                s_last = summarise([score(env, chunk)])
                steps.append({**s, "batches": j, "n_edited": len(done), "es_latest_batch": s_last["es"],
                              **{f"solve_{k}": v for k, v in _diag(upd).items()}})
                env.log(f"sequential after {j} batches ({len(done)} facts): ES {s['es']} NS {s['ns']}")
        drift = _v_drift(env, batches[-1][: cfg.drift_facts])
    finally:
        snap.restore()
    return {"batch_size": cfg.seq_batch, "steps": steps, "v_drift": drift, "pre": pre_scores(env, range(n))}


def _delta_w(env: Env, weight: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """W − W₀ in the out_in layout, fp64."""
    d = weight.detach().to(torch.float64) - w0
    return d if adapter_for(env.model).layout == "out_in" else d.mT


def _v_drift(env: Env, chunk: list[int]) -> dict[str, Any]:
    """Re-optimise v* for the last batch on the edited model (before it was applied would
    be the exact sequential algorithm): how far the cached v* is from it."""
    from ..editing.keys import context_templates
    from ..editing.requests import load_requests
    from ..editing.steps import compute_values

    ctx = context_templates(env.model, env.tokenizer, seed=env.config.seed)
    vr = compute_values(env.model, adapter_for(env.model), env.tokenizer, load_requests(env.requests(chunk)), ctx,
                        env.layer, env.value_config, env.config.seed)
    z_cached = env.facts.z[chunk]
    delta_cached = z_cached - env.facts.h[chunk]
    rel = ((vr.z.cpu() - z_cached).norm(dim=1) / delta_cached.norm(dim=1)).tolist()
    return {"n": len(chunk), "relative_change_mean": mean_or_none(rel), "relative_change_max": max(rel),
            "what": "‖z_fresh − z_cached‖ / ‖z_cached − h₀‖ for the last batch, z_fresh optimised on the model "
                    "with all batches applied"}


# ---------------------------------------------------------------------------
# all
# ---------------------------------------------------------------------------


def run_all(env: Env, which: Sequence[str] = ("sweep", "distribution", "stability", "sequential")) -> dict[str, Any]:
    """Run the named experiments; the result also describes the setup (config, layers, timings)."""
    funcs = {"sweep": batch_sweep, "distribution": distribution, "stability": stability, "sequential": sequential}
    out: dict[str, Any] = {}
    for name in which:
        t0 = time.perf_counter()
        out[name] = funcs[name](env)
        env.timings[name] = time.perf_counter() - t0
    return {"config": asdict(env.config), "model": env.model_id, "layer": env.layer, "spread": env.spread,
            "memit_mu": env.memit_mu, "n_facts": len(env.records), "corpus": env.corpus,
            "value_config": asdict(env.value_config), "torch_threads": torch.get_num_threads(),
            "timings": dict(env.timings),
            "backend": env.factors[env.layer].backend,
            "factors": {str(k): {"cond_C": f.cond, "jitter_relative": f.jitter_relative}
                        for k, f in env.factors.items()},
            "v_steps_mean": mean_or_none(env.facts.steps), "v_converged": sum(env.facts.converged), **out}


def previous_results(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Results of an earlier run with the same configuration (kept when a part is rerun)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old if old.get("config") == json.loads(json.dumps(config)) else {}  # tuples were stored as lists


def run_and_report(env: Env, docs: Path, which: Sequence[str], command: str) -> list[Path]:
    """Run the experiments ``which`` and write docs/results.json, RESULTS.md and the figures;
    results of the other experiments from an earlier run of the same configuration are kept.
    Results and report are rewritten after each experiment: a crash keeps the rest."""
    from .._io import write_json
    from . import report

    res = previous_results(docs / "results.json", asdict(env.config))
    old_timings = res.get("timings", {})
    files: list[Path] = []
    for name in which:
        res.update(run_all(env, [name]))
        res["timings"] = {**old_timings, **env.timings}
        write_json(docs / "results.json", res)
        files = report.write(res, docs, command)
    return files
