"""docs/RESULTS.md and docs/figures/*.png from the runner's results (a dict, also saved as JSON)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

FIGURES = ("sweep_scores.png", "sweep_solver.png", "distribution.png", "stability.png", "sequential.png")


def _f(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, folder: Path, name: str) -> None:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)


def plot_all(res: dict[str, Any], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name, fn in (("sweep", _plot_sweep), ("distribution", _plot_distribution), ("stability", _plot_stability),
                     ("sequential", _plot_sequential)):
        if name in res:
            made += fn(res[name], folder)
    return made


def _series(sw: dict[str, Any]):
    """(label, line style, points, their batch sizes) of each series of the sweep that has points."""
    for method, style in SERIES_STYLES:
        pts = [p for p in sw["points"] if p["method"] == method]
        if pts:
            yield method, style, pts, [p["batch_size"] for p in pts]


def _plot_sweep(sw: dict[str, Any], folder: Path) -> list[str]:
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(18, 3.6))
    for method, style, pts, b in _series(sw):
        for ax, key, title in zip(axes, ("es", "ps", "ns", "score", "fluency_change"),
                                  ("efficacy (ES)", "paraphrase (PS)", "neighbourhood (NS)", "Score",
                                   "fluency change vs unedited")):
            ys = [p[key] for p in pts]
            ax.plot(b, [100 * y if y is not None and key != "score" else y for y in ys], style, label=method)
            ax.set_xscale("log", base=2)
            ax.set_title(title)
            ax.set_xlabel("batch size")
    axes[0].legend()
    for ax in axes[:3]:
        ax.set_ylim(-2, 102)
        ax.set_ylabel("%")
    axes[4].axhspan(-2, 2, color="0.9")
    fig.suptitle("EMMET vs MEMIT, single layer (facts per point in RESULTS.md)")
    _save(plt, fig, folder, "sweep_scores.png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, style, pts, b in _series(sw):
        axes[0].plot(b, [p["cond_G_max"] for p in pts], style, label=method)
        axes[1].plot(b, [p["solve_seconds_per_batch"] for p in pts], style, label=method)
    axes[0].set_title("cond(G + μI), largest over batches")
    axes[1].set_title("solve seconds per batch")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.legend()
    _save(plt, fig, folder, "sweep_solver.png")
    return ["sweep_scores.png", "sweep_solver.png"]


def _plot_distribution(dist: dict[str, Any], folder: Path) -> list[str]:
    plt = _plt()
    rows = dist["rows"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    labels = [f"{r['method']}\n{r['distribution']}" for r in rows]
    width = 0.2
    for k, (key, name) in enumerate((("es", "ES"), ("ps", "PS"), ("ns", "NS"), ("score", "Score"))):
        vals = [(100 * r[key] if key != "score" else r[key]) if r[key] is not None else 0 for r in rows]
        ax.bar([i + (k - 1.5) * width for i in range(len(rows))], vals, width, label=name)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylim(0, 105)
    ax.legend(ncol=4, loc="lower right")
    ax.set_title(f"solver × edit distribution ({rows[0]['n_facts']} facts each)")
    _save(plt, fig, folder, "distribution.png")
    return ["distribution.png"]


def _plot_stability(st: dict[str, Any], folder: Path) -> list[str]:
    plt = _plt()
    rows = [r for r in st["rows"] if r["case"] == "distinct facts" and r["ridge"] and "cond_G" in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot([r["batch_size"] for r in rows], [r["cond_G"] for r in rows], "o-")
    axes[0].set_title("cond(KᵀC⁻¹K) vs batch size (EMMET)")
    axes[1].plot([r["batch_size"] for r in rows], [max(r["mu_relative"], 1e-18) for r in rows], "o-")
    axes[1].set_title("ridge μ used / mean diag G (1e-18 = none)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
    _save(plt, fig, folder, "stability.png")
    return ["stability.png"]


def _plot_sequential(sq: dict[str, Any], folder: Path) -> list[str]:
    plt = _plt()
    steps = sq["steps"]
    n = [s["n_edited"] for s in steps]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, name in (("es", "ES (all edits so far)"), ("ps", "PS"), ("ns", "NS"), ("es_latest_batch", "ES latest batch")):
        axes[0].plot(n, [100 * s[key] if s[key] is not None else None for s in steps], "o-", label=name)
    axes[0].set_ylim(-2, 102)
    axes[0].set_ylabel("%")
    axes[0].legend()
    axes[1].plot(n, [100 * s["fluency_change"] if s["fluency_change"] is not None else None for s in steps], "o-")
    axes[1].axhspan(-2, 2, color="0.9")
    axes[1].set_title("fluency change vs unedited (%)")
    for ax in axes:
        ax.set_xlabel("facts edited so far")
    fig.suptitle(f"sequential EMMET batches of {sq['batch_size']}")
    _save(plt, fig, folder, "sequential.png")
    return ["sequential.png"]


# ---------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------


# Experiment 1's series and their plot styles (emmet-pp: runner.PP_SERIES).
SERIES_STYLES = (("emmet", "o-"), ("memit", "s--"), ("emmet-pp", "^-."))


def markdown(res: dict[str, Any], command: str) -> str:
    out = [
        "# Results: the unified PM solver on a real model",
        "",
        f"Regenerate with `{command}` (everything below, including the figures, comes from that run; "
        "seeded: the same command gives the same facts, keys, values and edits).",
        "",
        f"- model: `{res['model']}`; single edit layer {res['layer']}, MEMIT spread layers "
        f"{res['spread']} (the presets' unless the command names them), MEMIT λ = {_f(res['memit_mu'], 'g')} "
        "(preset)",
        f"- facts: {res['n_facts']} sampled with seed {res['config']['seed']} from the built-in set "
        "(facts the unedited model gets right, `pmsolve/data/facts.jsonl`)",
        f"- statistics: {res['corpus']}; "
        "factor conditioning per layer: " + ", ".join(
            f"L{k} cond(C) {_f(v['cond_C'], '.2g')} (jitter {_f(v['jitter_relative'], '.0e')})"
            for k, v in res["factors"].items()),
        f"- v*: mean {_f(res['v_steps_mean'], '.1f')} optimisation steps per fact; {res['v_converged']}/"
        f"{res['n_facts']} met the early-stop rule before the step limit; settings (the preset's): "
        + ", ".join(f"{k} {v}" for k, v in res["value_config"].items()),
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {res['torch_threads']}, solver "
        f"backend `{res['backend']}`; "
        "wall times of the last invocation per stage (s; cached setup stages take ~0): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items()),
        "- ES/PS/NS: share of prompts where the new target beats the old one (rewrite prompt, paraphrases) or "
        "the neighbour keeps its answer; Score = harmonic mean × 100; fluency = weighted bi/trigram entropy of "
        f"{res['config']['max_new_tokens']}-token {_decoding(res['config'])}, change relative to the unedited "
        "model on the same prompts. All in %.",
        "",
    ]
    for name, fn in (("sweep", _md_sweep), ("distribution", _md_distribution), ("stability", _md_stability),
                     ("sequential", _md_sequential)):
        if name in res:
            out += fn(res[name], res)
    return "\n".join(out) + "\n"


def _decoding(config: dict[str, Any]) -> str:
    """How the fluency generations were decoded (results that name no top k were greedy)."""
    k = config.get("fluency_top_k")
    return "greedy generations" if k is None else (
        f"generations sampled from the top {k} tokens (as the reference metric; each prompt draws the same "
        "random numbers before and after the edit)")


def _with_se(p: dict[str, Any]) -> str:
    """The fluency change in %, with its standard error when there is one."""
    se = p.get("fluency_change_se")
    return _pct(p["fluency_change"]) + ("" if se is None or p["fluency_change"] is None else f" ± {_pct(se)}")


def _md_sweep(sw: dict[str, Any], res: dict[str, Any]) -> list[str]:
    pre = sw["pre"]
    rows = [[p["method"], str(p["batch_size"]), str(p["n_edited"]), f"{p['n_es']}/{p['n_full']}/{p['n_fluency']}",
             _pct(p["es"]), _pct(p["ps"]), _pct(p["ns"]), _f(p["score"], ".1f"), _with_se(p),
             _f(p["cond_G_max"], ".2e"), str(p["ridge_fallbacks"]), _f(p["solve_seconds_per_batch"], ".3f")]
            for p in sw["points"]]
    lines = [
        "## 1. EMMET vs MEMIT across batch sizes",
        "",
        f"Single layer {sw['layer']}. Every batch is edited into the unedited model and scored, then restored; "
        "batches smaller than the minimum are repeated over consecutive facts. *facts* = edited facts; "
        "*n* = facts behind ES / PS+NS / fluency (full scoring is capped per point to bound CPU time; the "
        "capped facts are the first ones of the seeded sample). Keys and values were computed once per fact "
        f"({_f(sw['keys_values_seconds_per_fact'], '.1f')} s per fact when computed) and reused by every solve. "
        f"Unedited: ES {_pct(pre['es'])}, PS {_pct(pre['ps'])}, NS {_pct(pre['ns'])}.",
        "",
        "*emmet* and *memit* use the template-averaged keys of the reference implementations; *emmet-pp* "
        "is EMMET on each rewrite prompt's own key with the batch's own prompt tokens (every token after the "
        "subject, in every context template) added to the preservation term at weight α = "
        f"{_f(res['config'].get('prompt_preservation'), 'g')} (`pmsolve.edit(key_source=\"prompt\", "
        "preserve_prompts=α)`): the factor of C + α·mean(kkᵀ) is formed per batch (a low-rank extension of C's "
        "factor, or a refactor when the prompt tokens outnumber d/4).",
        "",
        _table(["method", "batch", "facts", "n", "ES", "PS", "NS", "Score", "fluency Δ % (± SE)", "cond(G+μI)",
                "ridge fallbacks", "solve s/batch"], rows),
        "",
        "![sweep scores](figures/sweep_scores.png)",
        "![solver](figures/sweep_solver.png)",
        "",
    ]
    failed = [(p["method"], p["batch_size"], e) for p in sw["points"] for e in p.get("errors", [])]
    if failed:
        lines += ["Batches that could not be edited (not scored):", ""]
        lines += [f"- {m} batch {b}, facts {e['facts'][0]}–{e['facts'][-1]}: {e['error'][:200]}" for m, b, e in failed]
        lines.append("")
    lam = sw.get("lambda") or []
    if lam:
        lines += [
            f"MEMIT's λ at batch {lam[0]['batch_size']} (ES on all {lam[0]['n_es']} facts, PS/NS on "
            f"{lam[0]['n_full']}): residual = ‖ΔK − R‖/‖R‖, i.e. how far MEMIT is from an equality solve.",
            "",
            _table(["λ", "ES", "PS", "NS", "Score", "residual", "tr(ΔCΔᵀ)", "cond(G+λI)"],
                   [[_f(r["mu"], "g"), _pct(r["es"]), _pct(r["ps"]), _pct(r["ns"]), _f(r["score"], ".1f"),
                     _f(r["residual"], ".1e"), _f(r["preservation_cost"], ".3g"), _f(r["cond_G"], ".2e")]
                    for r in lam]),
            "",
        ]
    lines += _targets(sw, res["n_facts"])
    return lines


def _targets(sw: dict[str, Any], n_facts: int) -> list[str]:
    def point(method: str, b: int) -> dict[str, Any] | None:
        return next((p for p in sw["points"] if p["method"] == method and p["batch_size"] == b), None)

    out = ["Targets:", ""]
    for method in ("emmet", "emmet-pp"):
        p = point(method, 256)
        if p is None:
            out.append(f"- {method} at batch 256: not run (this run sampled {n_facts} facts; see `--facts`).")
            continue
        ok = p["es"] is not None and p["es"] >= 0.9
        out.append(f"- {method} at batch 256: ES {_pct(p['es'])} % over {p['n_es']} facts (target ≥ 90 %: "
                   f"{'met' if ok else 'missed'}); ridge: {p['ridge_fallbacks']} fallback(s), "
                   f"μ/mean diag G = {_f(p['solves'][0]['mu_relative'], '.1e')}, cond(G+μI) "
                   f"{_f(p['cond_G_max'], '.2e')}.")
    for method in ("emmet", "memit", "emmet-pp"):
        p = point(method, 64)
        if p is None or p["fluency_change"] is None:
            out.append(f"- {method} fluency at batch 64: not measured.")
            continue
        ok = abs(p["fluency_change"]) <= 0.02
        se = p.get("fluency_change_se")
        out.append(f"- {method} fluency at batch 64: {_pct(p['fluency_change'])} % "
                   f"(standard error {_pct(se)} points) vs unedited over {p['n_fluency']} generations "
                   f"(target within ±2 %: {'met' if ok else 'missed'}).")
    return out + [""]


def _md_distribution(dist: dict[str, Any], res: dict[str, Any]) -> list[str]:
    rows = [[r["method"], r["distribution"], ",".join(map(str, r["layers"])), str(r["batch_size"]),
             str(r["n_facts"]), _pct(r["es"]), _pct(r["ps"]), _pct(r["ns"]), _f(r["score"], ".1f"),
             _f(r["cond_G_max"], ".2e"), _f(r["seconds"], ".0f")] for r in dist["rows"]]
    return [
        "## 2. Edit distribution disentangled",
        "",
        "Each solver combined with a single layer and with MEMIT's spread (keys and residual re-measured "
        "after each layer, residual/(layers left) per layer). ROME edits one fact per solve. "
        f"{dist['note']}. Unedited on these facts: ES {_pct(dist['pre']['es'])}, NS {_pct(dist['pre']['ns'])}.",
        "",
        _table(["solver", "distribution", "layers", "batch", "facts", "ES", "PS", "NS", "Score", "cond(G+μI)",
                "seconds"], rows),
        "",
        "![distribution](figures/distribution.png)",
        "",
    ]


def _md_stability(st: dict[str, Any], res: dict[str, Any]) -> list[str]:
    rows = []
    for r in st["rows"]:
        rows.append([r["case"], r.get("method", "emmet"), str(r["batch_size"]), "default" if r["ridge"] else "none",
                     _f(r.get("cond_G"), ".2e"), _f(r.get("mu_relative"), ".1e"), _f(r.get("residual"), ".1e"),
                     _f(r.get("delta_norm"), ".3g"), _f(r.get("preservation_cost"), ".3g"),
                     r.get("error", "")])
    return [
        "## 3. Stability: conditioning of G = KᵀC⁻¹K and the ridge",
        "",
        "Solves only (no evaluation), on the same precomputed keys and residuals. *ridge default*: μ = 0, raised "
        f"along the schedule (relative to mean diag G) {st['ridge_schedule']} until the Cholesky factor of G + μI "
        f"succeeds with condition estimate ≤ {st['max_cond']:.0e}; *none*: μ = 0 with no schedule and no "
        "condition limit. Residual = ‖ΔK − R‖/‖R‖ (0 = every equality holds); ‖Δ‖_F and tr(ΔCΔᵀ) show what an "
        f"unregularised solve does to the weights. Repeated subjects among the first {st['n']} facts: "
        f"{st['repeated_subjects']}.",
        "",
        _table(["case", "solver", "n", "ridge", "cond(G+μI)", "μ / mean diag G", "residual", "‖Δ‖_F",
                "tr(ΔCΔᵀ)", "error"], rows),
        "",
        "![stability](figures/stability.png)",
        "",
    ]


def _md_sequential(sq: dict[str, Any], res: dict[str, Any]) -> list[str]:
    rows = [[str(s["batches"]), str(s["n_edited"]), f"{s['n_es']}/{s['n_full']}/{s['n_fluency']}", _pct(s["es"]),
             _pct(s["es_latest_batch"]), _pct(s["ps"]), _pct(s["ns"]), _f(s["score"], ".1f"),
             _pct(s["fluency_change"]), _f(s["solve_cond_G"], ".2e"), _f(s["solve_mu_relative"], ".1e")]
            for s in sq["steps"]]
    d = sq["v_drift"]
    return [
        "## 4. Sequential batches",
        "",
        f"EMMET, batches of {sq['batch_size']} edited one after another into the same model (single layer); "
        "after selected batches every fact edited so far is re-scored (ES on all of them; PS/NS on the first "
        "ones, *n* as in §1). Keys are exact (an edit of a layer's output projection does not change that "
        "projection's inputs) and each batch's residual is measured on the edited weights; v* comes from the "
        f"unedited model. Its drift, measured by re-optimising v* for the last batch ({d['n']} facts) on the "
        f"final model: mean {_pct(d['relative_change_mean'])} %, max {_pct(d['relative_change_max'])} % of ‖v* − h‖.",
        "",
        _table(["batches", "facts edited", "n", "ES all", "ES latest batch", "PS", "NS", "Score", "fluency Δ %",
                "cond(G+μI) of the batch", "μ / mean diag G"], rows),
        "",
        "![sequential](figures/sequential.png)",
        "",
    ]


def write(res: dict[str, Any], docs: Path, command: str) -> list[Path]:
    figures = plot_all(res, docs / "figures")
    md = docs / "RESULTS.md"
    md.write_text(markdown(res, command))
    return [md] + [docs / "figures" / f for f in figures]
