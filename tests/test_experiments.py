"""The edit steps (pmsolve.editing.steps) against independent references on tiny random models,
the experiments' per-fact cache over them, `pmsolve profile` and `pmsolve experiments --quick`."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest
import torch
from editing_fixtures import REQUESTS, model, stats, tokenizer

import pmsolve
from pmsolve.editing import steps
from pmsolve.editing.keys import subject_prompt_ids
from pmsolve.editing.requests import load_requests
from pmsolve.editing.values import ValueConfig
from pmsolve.experiments.precompute import fact_tensors, solve_and_apply
from pmsolve.models.adapters import adapter_for

FAST = ValueConfig(steps=4)
LAYER = 2


@pytest.fixture(autouse=True)
def _torch_backend():
    with warnings.catch_warnings(), pmsolve.settings.backend("torch"):
        warnings.simplefilter("ignore", pmsolve.NumericalWarning)
        yield


@pytest.fixture(scope="module")
def tiny():
    tok = tokenizer()
    m = model("llama", len(tok))
    return m, tok, stats(m, tok, [LAYER])[LAYER]


@torch.no_grad()
def _reference_keys(m, tok, reqs, templates, layer):
    """One prompt at a time, unpadded, with plain forward hooks: per request the rewrite-module
    input at the subject's last token averaged over the templates and in the bare prompt, the
    layer's output there (bare prompt), and the inputs at every token after the subject (all
    templates, all requests)."""
    ad = adapter_for(m)
    avg, bare, out, after = [], [], [], []
    for r in reqs:
        per_template = []
        for t, tmpl in enumerate(templates):
            ids, idx = subject_prompt_ids(tok, tmpl.replace("{}", r.prompt, 1), r.subject)
            seen = {}
            hooks = [ad.rewrite(layer).register_forward_hook(lambda mod, i, o: seen.update(k=i[0][0].double())),
                     ad.layer(layer).register_forward_hook(
                         lambda mod, i, o: seen.update(h=(o[0] if isinstance(o, tuple) else o)[0].double()))]
            try:
                m(torch.tensor([ids]))
            finally:
                for h in hooks:
                    h.remove()
            per_template.append(seen["k"][idx])
            after.append(seen["k"][idx + 1:])
            if t == 0:
                bare.append(seen["k"][idx])
                out.append(seen["h"][idx])
        avg.append(torch.stack(per_template).mean(0))
    return torch.stack(avg), torch.stack(bare), torch.stack(out), torch.cat(after)


def _closed_form(C, K, R, mu):
    """Δ = R (KᵀC⁻¹K + μI)⁻¹ (C⁻¹K)ᵀ in fp64, from C itself (no factor, no backend)."""
    CiK = torch.linalg.solve(C, K)
    G = K.T @ CiK + mu * torch.eye(K.shape[1], dtype=torch.float64)
    return R @ torch.linalg.solve(G, CiK.T)


@pytest.mark.parametrize("method, mu", [("emmet", None), ("memit", 50.0)])
@pytest.mark.parametrize("source, alpha", [("average", 0.0), ("prompt", 10.0), ("both", 0.0)])
def test_edit_update_is_the_closed_form_on_reference_keys(tiny, method, mu, source, alpha):
    """pmsolve.edit on one layer: its update equals the closed form on keys and outputs measured
    independently (one unpadded prompt at a time, plain hooks) and the v* the values step
    gives; the preservation matrix is C + δI (+ α·PᵀP/m with the prompt tokens P); and the
    experiments' per-fact cache hands the solver the same K and R."""
    m, tok, C = tiny
    reqs = load_requests(REQUESTS)
    ad = adapter_for(m)
    w0 = ad.weight(LAYER).detach().clone()
    res = pmsolve.edit(m, tok, reqs, method=method, layers=[LAYER], stats={LAYER: C}, preset=None,
                       value_config=FAST, seed=3, mu=mu, key_source=source, preserve_prompts=alpha)
    (e,) = res.edits
    w1 = ad.weight(LAYER).detach().clone()
    res.restore()
    assert torch.equal(ad.weight(LAYER), w0)
    d = e.update.diagnostics

    avg, bare, h, P = _reference_keys(m, tok, reqs, res.context_templates, LAYER)
    z = steps.compute_values(m, ad, tok, reqs, res.context_templates, LAYER, FAST, 3).z.double()
    keys = {"average": [avg], "prompt": [bare], "both": [avg, bare]}[source]
    K = torch.cat(keys).T
    R = torch.cat([z - h] * len(keys)).T
    C_used = C.double() + d.jitter * torch.eye(C.shape[0], dtype=torch.float64)
    if alpha:
        C_used += alpha * P.T @ P / P.shape[0]
    want = _closed_form(C_used, K, R, d.mu)
    got = e.update.dense()
    # K and h come from fp32 forwards (batched and padded in the steps, one by one here): they
    # agree to ~1e-6 relative, which the solve amplifies by at most about cond(G).
    tol = 1e-6 * max(d.cond_G, 1.0)
    assert float((got - want).norm() / want.norm()) < tol
    # the weight changed by exactly that update, up to fp32 rounding of the weight
    assert float((w1.double() - w0.double() - got).norm()) <= 1e-6 * float(w1.double().norm())

    facts = fact_tensors(m, tok, reqs, LAYER, fingerprint="tiny", value_config=FAST, seed=3)
    K_cache, R_cache = facts.select(range(len(reqs)), source)
    torch.testing.assert_close(K_cache, K, rtol=1e-5, atol=1e-5 * float(K.abs().max()))
    torch.testing.assert_close(R_cache, R, rtol=1e-4, atol=1e-5 * float(R.abs().max()))


def test_fact_tensors_cached_and_independent_of_batching(tiny, tmp_path):
    m, tok, _ = tiny
    reqs = load_requests(REQUESTS)
    all3 = fact_tensors(m, tok, reqs, LAYER, fingerprint="tiny", value_config=FAST, cache_dir=tmp_path, chunk=2)
    assert all3.seconds_values > 0
    (path,) = tmp_path.glob("facts*-tiny-L2-*.pt")
    again = fact_tensors(m, tok, reqs[::-1], LAYER, fingerprint="tiny", value_config=FAST, cache_dir=tmp_path)
    assert again.seconds_values == 0 and again.seconds_keys == 0  # all from the cache ...
    assert again.seconds_per_fact == pytest.approx(all3.seconds_per_fact)  # ... which remembers their cost
    assert torch.equal(again.z, all3.z.flip(0))
    alone = fact_tensors(m, tok, reqs[2:], LAYER, fingerprint="tiny", value_config=FAST)
    # v* of a fact does not depend on the other facts of its batch
    assert torch.allclose(alone.z[0], all3.z[2], atol=1e-4, rtol=1e-4)
    assert torch.allclose(alone.k[0], all3.k[2], atol=1e-5, rtol=1e-5)
    path.write_bytes(b"truncated")  # a damaged cache is recomputed, not trusted
    fixed = fact_tensors(m, tok, reqs, LAYER, fingerprint="tiny", value_config=FAST, cache_dir=tmp_path)
    assert fixed.seconds_values > 0 and torch.allclose(fixed.z, all3.z, atol=1e-5)


def test_sequential_residual_matches_remeasured_output(tiny):
    """R − (W − W0)K_bare, used by the sequential experiment, equals z minus the edited model's output."""
    from pmsolve.editing.keys import context_templates

    m, tok, C = tiny
    reqs = load_requests(REQUESTS)
    facts = fact_tensors(m, tok, reqs, LAYER, fingerprint="tiny", value_config=FAST)
    ad = adapter_for(m)
    w0 = ad.weight(LAYER).detach().to(torch.float64).clone()
    snap = steps.WeightSnapshot(m)
    try:
        solve_and_apply(snap, pmsolve.factorize(C), facts, [0, 1], "emmet", None)
        assert list(snap) == [ad.rewrite_name(LAYER)]
        _, R = facts.select([2])
        predicted = R - (ad.weight(LAYER).detach().to(torch.float64) - w0) @ facts.k_bare[2:].T.to(torch.float64)
        ctx = context_templates(m, tok, seed=0)
        h_now = steps.measure_keys(m, ad, tok, reqs[2:], ctx, [LAYER], output_layer=LAYER).outputs
        measured = (facts.z[2:] - h_now.cpu()).T.to(torch.float64)
        assert torch.allclose(predicted, measured, atol=1e-4 * float(measured.norm()))
    finally:
        snap.restore()
    assert torch.equal(ad.weight(LAYER).detach().to(torch.float64), w0)


def test_no_product_module_imports_the_command_line():
    """The library (everything but pmsolve/cli.py and pmsolve/commands/) does not import the CLI."""
    root = Path(pmsolve.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "commands" or rel.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against the module's package
                    pkg = ["pmsolve", *rel.parts[:-1]][: len(rel.parts) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            offenders += [f"{rel}: {n}" for n in names
                          if n in ("pmsolve.cli", "pmsolve.commands") or n.startswith("pmsolve.commands.")]
    assert offenders == []


def test_profile_dims_json(tmp_path, capsys):
    from pmsolve.cli import main

    out = tmp_path / "p.json"
    assert main(["profile", "--d-in", "512", "--d-out", "256", "--n", "32", "--layers", "3", "--tokens", "10000000",
                 "--max-d", "128", "--backend", "torch", "--json", str(out)]) == 0
    prof = json.loads(out.read_text())
    assert prof["mode"] == "dims" and prof["measured_dims"]["d_in"] == 128
    stages = {s["name"]: s for s in prof["stages"]}
    assert set(stages) == {"statistics", "factorisation", "keys", "values", "solve", "apply"}
    for name in ("statistics", "factorisation", "solve", "apply"):
        s = stages[name]
        assert s["seconds"] > 0 and s["peak_bytes"] >= 0 and s["flops"] > 0
        assert s["extrapolated_seconds"] > 0
    # analytic bytes at the requested size: C and L in fp64 for the factorisation
    assert stages["factorisation"]["extrapolated_bytes"] == 2 * 8 * 512 * 512
    assert stages["statistics"]["flops"] == prof["measured_dims"]["tokens"] * 128 * 129
    assert prof["conditioning"]["cond_C"] > 1 and prof["conditioning"]["residual"] < 1e-8
    assert "EXTRAPOLATION" in " ".join(prof["notes"])
    assert "EXTRAPOLATION" in capsys.readouterr().out  # the table and notes were printed too


def test_peak_memory_sees_a_large_allocation():
    from pmsolve.profiling import peak_memory

    with peak_memory() as peak:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert 60 * 2**20 <= peak.bytes <= 200 * 2**20
    with peak_memory() as small:
        torch.ones(16)
    assert small.bytes < 16 * 2**20


def test_edit_value_cache_reuses_v_star(tiny, monkeypatch):
    """pmsolve.edit(value_cache=...) optimises each fact's v* once and gives the same edit."""
    m, tok, C = tiny
    calls = []
    real = steps.optimize_values
    monkeypatch.setattr(steps, "optimize_values", lambda *a, **k: (calls.append(len(a[3])), real(*a, **k))[1])
    kw = dict(layers=[1, LAYER], distribution="memit", stats={1: stats(m, tok, [1])[1], LAYER: C}, preset=None,
              value_config=FAST)
    plain = pmsolve.edit(m, tok, REQUESTS, method="emmet", **kw)
    w_plain = adapter_for(m).weight(LAYER).detach().clone()
    plain.restore()
    cache: dict = {}
    first = pmsolve.edit(m, tok, REQUESTS, method="emmet", value_cache=cache, **kw)
    w_cached = adapter_for(m).weight(LAYER).detach().clone()
    first.restore()
    for r in REQUESTS:  # ROME, one fact per solve: every v* comes from the cache
        pmsolve.edit(m, tok, [r], method="rome", value_cache=cache, **kw).restore()
    assert calls == [3, 3]
    assert torch.equal(w_cached, w_plain)


def test_quick_experiments_write_results_and_figures(tmp_path):
    """`pmsolve experiments --quick` end to end on a tiny 9-layer Llama (the llama preset's layers)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pmsolve.cli import main
    from pmsolve.models.loading import ensure_default_converted

    tok = AutoTokenizer.from_pretrained(ensure_default_converted())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=9,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    colours = ["red", "blue", "green", "black", "white", "pink", "grey", "brown", "gold", "teal"]
    names = ["Ada", "Bo", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo"]
    recs = [{"prompt": "The colour of {} is", "subject": f"{n} Quill", "target_true": colours[i],
             "target_new": colours[(i + 3) % 10], "paraphrase_prompts": [f"{n} Quill's colour is"],
             "neighborhood_prompts": [{"prompt": f"The colour of {names[i - 1]} Quill is",
                                       "target": colours[i - 1]}],
             "generation_prompts": [f"{n} Quill is"]} for i, n in enumerate(names)]
    (tmp_path / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    (tmp_path / "corpus.txt").write_text("Ada Quill likes red. Bo Quill likes blue and green. " * 200)
    docs = tmp_path / "docs"
    args = ["experiments", "--quick", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "facts.jsonl"),
            "--docs", str(docs), "--cache-dir", str(tmp_path / "cache"), "--corpus", str(tmp_path / "corpus.txt")]
    assert main(args) == 0
    res = json.loads((docs / "results.json").read_text())
    assert res["n_facts"] == 8 and res["layer"] == 5 and res["spread"] == [4, 5, 6, 7, 8]
    sweep = res["sweep"]["points"]
    assert res["config"]["fluency_top_k"] == 5 and "sampled from the top 5 tokens" in (docs / "RESULTS.md").read_text()
    assert [(p["method"], p["batch_size"]) for p in sweep] == [
        (m, b) for b in (1, 4, 8) for m in ("emmet", "memit", "emmet-pp")]
    pp = [p for p in sweep if p["method"] == "emmet-pp"]
    assert all(p["solver"] == "emmet" and p["key_source"] == "prompt" and p["preserve_prompts"] > 0 for p in pp)
    for p in sweep:
        assert p["n_edited"] == max(4, p["batch_size"]) and p["n_es"] == p["n_edited"]
        assert 0 <= p["es"] <= 1 and p["cond_G_max"] >= 1
    assert {(r["method"], r["distribution"]) for r in res["distribution"]["rows"]} == {
        (m, d) for m in ("rome", "emmet", "memit") for d in ("single", "spread")}
    stab = res["stability"]["rows"]
    exact_dup = [r for r in stab if "perturbed by 0 " in r["case"]]
    (bare,) = [r for r in exact_dup if not r["ridge"]]
    assert "error" in bare or bare["cond_G"] > 1e12  # singular G without a ridge: fails or is garbage ...
    (rescued,) = [r for r in exact_dup if r["ridge"]]
    assert rescued["ridge_fallback"] and rescued["cond_G"] <= res["stability"]["max_cond"]  # ... the ridge fixes it
    contradictory = {r["method"]: r for r in stab if "contradictory" in r["case"]}
    assert "ConflictingConstraintsError" in contradictory["emmet"]["error"] and "error" not in contradictory["memit"]
    assert [s["n_edited"] for s in res["sequential"]["steps"]] == [4, 8]
    md = (docs / "RESULTS.md").read_text()
    for fig in ("sweep_scores", "sweep_solver", "distribution", "stability", "sequential"):
        assert (docs / "figures" / f"{fig}.png").stat().st_size > 1000
        assert f"figures/{fig}.png" in md
    # a second run reuses the cached keys/values and baseline and reproduces the numbers (seeded)
    assert main(args + ["--only", "sweep"]) == 0
    again = json.loads((docs / "results.json").read_text())
    assert again["timings"]["keys_values"] < res["timings"]["keys_values"]
    assert [p["es"] for p in again["sweep"]["points"]] == [p["es"] for p in sweep]
    assert [p["fluency_change"] for p in again["sweep"]["points"]] == [p["fluency_change"] for p in sweep]
    assert "sequential" in again  # kept from the first run


def test_fluency_change_standard_error():
    from pmsolve.evaluation import paired_relative_se
    from pmsolve.experiments.runner import summarise

    pre, post = [2.0, 2.0, 2.0, 2.0], [2.2, 1.8, 2.2, 1.8]
    # diffs ±0.2: sample sd 0.2309, / sqrt(4) / mean pre 2 = 0.0577
    assert paired_relative_se(pre, post) == pytest.approx(0.2 * (4 / 3) ** 0.5 / 2 / 2)
    assert paired_relative_se([2.0], [2.1]) is None
    s = summarise([{"es": [1.0], "ps": [], "ns": [], "fluency": post, "fluency_pre": pre}])
    assert s["fluency_change"] == pytest.approx(0.0) and s["fluency_change_se"] > 0
