"""The editing layer on tiny random models: restore, equality, errors, batching, save/load."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch

import pmsolve
from editing_fixtures import ARCHS, LAYERS, REQUESTS, model, same_weights, snapshot, stats, tokenizer
from pmsolve.editing import ValueConfig, apply_updates, load_requests
from pmsolve.editing.distribution import CostBalanced, MemitSpread, SingleLayer, remaining_share
from pmsolve.editing.keys import context_templates
from pmsolve.editing.steps import measure_keys
from pmsolve.editing.values import optimize_values
from pmsolve.editing.presets import DEFAULT_PRESERVE_EDITS
from pmsolve.errors import CacheError, InputError
from pmsolve.models.adapters import adapter_for

FAST = ValueConfig(steps=4)  # random models never converge; a few steps exercise the optimiser


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(autouse=True)
def _quiet_reference_backend():
    # The solver's backends are tested elsewhere; the torch reference keeps these tests
    # independent of the native build.
    with warnings.catch_warnings(), pmsolve.settings.backend("torch"):
        warnings.simplefilter("ignore", pmsolve.NumericalWarning)
        yield


def _edit(m, tok, C, **kw):
    kw.setdefault("layers", [2])
    kw.setdefault("value_config", FAST)
    return pmsolve.edit(m, tok, kw.pop("requests", REQUESTS[:2]), stats=C, preset=None, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_then_restore_is_bit_exact(arch, tok):
    m = model(arch, len(tok))
    C = stats(m, tok)
    snap = snapshot(m)
    res = _edit(m, tok, C, layers=[1, 2], method="emmet")
    touched = {e.module for e in res.edits}
    assert len(touched) == 2
    assert not same_weights(m, snap)
    res.restore()
    assert same_weights(m, snap)


def test_user_statistics_are_left_intact_and_accumulators_factor_in_place(tok, monkeypatch):
    """A C the user passes is read, never overwritten; an accumulator's fresh mean() is factored
    in its own storage, with the same edit (bit for bit) as from the same C as a tensor."""
    import pmsolve.editing.steps as steps
    from pmsolve.stats import CovarianceAccumulator

    calls = []
    real = steps.factorize
    monkeypatch.setattr(steps, "factorize", lambda C, **kw: calls.append(kw.get("overwrite_c")) or real(C, **kw))
    m = model("llama", len(tok))
    C = stats(m, tok, layers=[2])
    before = C[2].clone()
    snap = snapshot(m)
    res = _edit(m, tok, C, method="emmet")
    assert torch.equal(C[2], before)
    W = {e.module: dict(m.named_parameters())[e.module + ".weight"].clone() for e in res.edits}
    res.restore()
    assert same_weights(m, snap)

    class Exact(CovarianceAccumulator):  # mean() returns the very same C, as a fresh tensor
        def mean(self):
            return before.clone()

    res = _edit(m, tok, {2: Exact(before.shape[0])}, method="emmet")
    assert calls == [False, True]
    for name, w in W.items():
        assert torch.equal(dict(m.named_parameters())[name + ".weight"], w)
    res.restore()


@pytest.mark.parametrize("arch", ARCHS)
def test_equality_edit_maps_keys_to_values(arch, tok):
    """Single-layer EMMET: the rewrite module now sends k* to W0 k* + R exactly (fp32 rounding)."""
    m = model(arch, len(tok))
    C = stats(m, tok)
    ad = adapter_for(m)
    ctx = context_templates(m, tok)
    reqs = load_requests(REQUESTS)
    K = measure_keys(m, ad, tok, reqs, ctx, [2]).average[2]
    with torch.no_grad():
        before = ad.rewrite(2)(K).double()
    res = _edit(m, tok, C, requests=REQUESTS, method="emmet")
    (e,) = res.edits
    with torch.no_grad():
        after = ad.rewrite(2)(K).double()
    R = e.update.U.T  # n × d_out: the residual the solve had to realise
    assert e.update.diagnostics.residual < 1e-9
    rel = float((after - before - R).norm() / R.norm())
    assert rel < 1e-4, rel  # fp32 weights: about 1e-6 expected
    assert abs(rel - e.residual_rounded) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype, tok):
    m = model("llama", len(tok))
    C = stats(m, tok)
    m = m.to(dtype)
    snap = snapshot(m)
    res = _edit(m, tok, C, method="emmet")
    (e,) = res.edits
    assert e.update.U.dtype == torch.float64
    # Rounding to 8-10 bit mantissas leaves a residual far above the fp64 solve's ...
    assert e.residual_rounded > 1e3 * e.update.diagnostics.residual
    # ... but the edit is still there.
    assert e.residual_rounded < 0.5
    res.restore()
    assert same_weights(m, snap)


@pytest.mark.parametrize("method,dist,layers", [
    ("emmet", "memit", [1, 2, 3]),
    ("memit", "memit", [1, 3]),
    ("memit", "single", [2]),
    ("emmet", "balanced", [0, 2]),
    ("memit", "balanced", [1, 2, 3]),
])
def test_any_method_with_any_distribution(method, dist, layers, tok):
    m = model("gpt2", len(tok))
    C = stats(m, tok)
    snap = snapshot(m)
    res = _edit(m, tok, C, method=method, distribution=dist, layers=layers)
    assert [e.layer for e in res.edits] == layers
    assert res.edits[-1].share == pytest.approx(1.0)
    if dist == "memit":
        assert [e.share for e in res.edits] == pytest.approx([1 / (len(layers) - i) for i in range(len(layers))])
    assert set(res.timings) == {"stats", "keys", "values", "solve", "apply"}
    res.restore()
    assert same_weights(m, snap)


def test_rome_one_fact(tok):
    m = model("gptj", len(tok))
    C = stats(m, tok)
    res = _edit(m, tok, C, method="rome", requests=REQUESTS[:2], batch_size=1)
    assert [e.batch for e in res.edits] == [0, 1]
    assert all(e.update.diagnostics.n == 1 for e in res.edits)


def test_distribution_weights():
    assert MemitSpread().weights([3, 4, 5]) == [1.0, 1.0, 1.0]
    assert [remaining_share([1, 1, 1], i) for i in range(3)] == pytest.approx([1 / 3, 1 / 2, 1])
    g = {3: 1.0, 4: 3.0}
    assert CostBalanced().weights([3, 4], g.__getitem__) == [1.0, 3.0]
    assert remaining_share([1.0, 3.0], 0) == pytest.approx(0.25)
    with pytest.raises(InputError):
        SingleLayer().check([1, 2])


def test_balanced_gives_sensitive_layers_more(tok):
    """The balanced split follows g_l = mean kᵀC⁻¹k: check the first share against it."""
    m = model("llama", len(tok))
    C = stats(m, tok)
    ad = adapter_for(m)
    ctx = context_templates(m, tok)
    reqs = load_requests(REQUESTS[:2])
    g = {}
    for layer in (1, 3):
        K = measure_keys(m, ad, tok, reqs, ctx, [layer]).average[layer].T.double()
        g[layer] = float((K * torch.linalg.solve(C[layer], K)).sum(0).mean())
    res = _edit(m, tok, C, method="emmet", distribution="balanced", layers=[1, 3])
    assert res.edits[0].share == pytest.approx(g[1] / (g[1] + g[3]), rel=1e-3)


def test_batched_values_equal_per_fact(tok):
    """One forward/backward for all facts gives each fact the δ it gets alone.

    Adam runs per fact, so the two computations differ only in floating-point reduction
    order (padding changes GEMM shapes): about 1e-7 relative per step in fp32. Adam divides
    by sqrt(v), which can amplify that for near-zero gradient components, so we allow 1e-3
    relative to ‖δ‖ after 6 steps - far below the size of δ itself.
    """
    m = model("llama", len(tok))
    ad = adapter_for(m)
    ctx = context_templates(m, tok)
    reqs = load_requests(REQUESTS)
    # fp32 whatever the CPU; all facts in one batch
    cfg = ValueConfig(steps=6, early_stop=False, autocast=None, width_groups=False)
    both = optimize_values(m, ad, tok, reqs, ctx, 2, cfg)
    assert both.forward_passes == cfg.steps + 1
    for i, r in enumerate(reqs):
        one = optimize_values(m, ad, tok, [r], ctx, 2, cfg)
        err = float((both.delta[i] - one.delta[0]).norm() / one.delta[0].norm())
        assert err < 1e-3, (i, err)
        assert torch.allclose(both.h[i], one.h[0], rtol=1e-5, atol=1e-5)


def test_values_in_groups_equal_values_all_at_once(tok):
    """max_batch splits a request into groups; each fact's δ is what it gets in one batch (same
    tolerance and reason as above), results come back in request order, passes add up."""
    m = model("llama", len(tok))
    ad = adapter_for(m)
    ctx = context_templates(m, tok)
    reqs = load_requests(REQUESTS)
    cfg = ValueConfig(steps=6, early_stop=False, autocast=None, width_groups=False)
    whole = optimize_values(m, ad, tok, reqs, ctx, 2, cfg)
    grouped = optimize_values(m, ad, tok, reqs, ctx, 2, replace(cfg, max_batch=2))
    assert grouped.forward_passes == 2 * whole.forward_passes  # groups of 2 and 1
    assert grouped.steps == whole.steps and len(grouped.nll) == len(reqs)
    for i in range(len(reqs)):
        err = float((grouped.delta[i] - whole.delta[i]).norm() / whole.delta[i].norm())
        assert err < 1e-3, (i, err)
        assert torch.allclose(grouped.h[i], whole.h[i], rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="max_batch"):
        optimize_values(m, ad, tok, reqs, ctx, 2, replace(cfg, max_batch=0))


def test_values_grouped_by_row_width(tok):
    """Facts whose rows differ in width go to separate groups (less padding); each fact's δ is
    what it gets in one batch (tolerance as above) and results come back in request order."""
    from pmsolve.editing.values import _width_groups

    m = model("llama", len(tok))
    ad = adapter_for(m)
    ctx = context_templates(m, tok)
    short = {"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}
    long = {"prompt": "{} is a city that many people say lies in the country of", "subject": "Lyon",
            "target_new": "Japan"}
    reqs = load_requests([short, long, dict(short, subject="Berlin"), dict(long, subject="Oslo")])
    cfg = ValueConfig(steps=4, early_stop=False, autocast=None)
    assert _width_groups(tok, reqs, ctx, cfg) == [[0, 2], [1, 3]]
    assert _width_groups(tok, reqs, ctx, replace(cfg, width_groups=False)) == [[0, 1, 2, 3]]
    grouped = optimize_values(m, ad, tok, reqs, ctx, 2, cfg)
    whole = optimize_values(m, ad, tok, reqs, ctx, 2, replace(cfg, width_groups=False))
    assert grouped.forward_passes == 2 * whole.forward_passes
    for i in range(len(reqs)):
        err = float((grouped.delta[i] - whole.delta[i]).norm() / whole.delta[i].norm())
        assert err < 1e-3, (i, err)
        assert torch.allclose(grouped.h[i], whole.h[i], rtol=1e-5, atol=1e-5)


def test_values_are_deterministic_and_clamped(tok):
    m = model("gpt_neox", len(tok))
    ad = adapter_for(m)
    ctx = context_templates(m, tok)
    reqs = load_requests(REQUESTS[:2])
    cfg = ValueConfig(steps=5, early_stop=False, clamp=0.1)
    a = optimize_values(m, ad, tok, reqs, ctx, 3, cfg)
    b = optimize_values(m, ad, tok, reqs, ctx, 3, cfg)
    assert torch.equal(a.delta, b.delta)
    assert bool((a.delta.norm(dim=1) <= 0.1 * a.h.norm(dim=1) * (1 + 1e-5)).all())
    assert context_templates(m, tok, seed=0) == ctx and ctx[0] == "{}" and len(ctx) == 6


@pytest.fixture()
def saved_edit(tmp_path, tok):
    """A gpt2 model (restored after an edit), its unedited and edited weights, the saved
    updates and the edit's result."""
    m = model("gpt2", len(tok))
    C = stats(m, tok)
    snap = snapshot(m)
    res = _edit(m, tok, C, method="emmet", layers=[1, 2], batch_size=1)
    edited = snapshot(m)
    path = tmp_path / "updates.safetensors"
    res.save_updates(path)
    res.restore()
    return m, snap, edited, path, res


def test_save_and_reapply_updates(saved_edit, tok):
    m, snap, edited, path, res = saved_edit
    assert same_weights(m, snap)
    originals = apply_updates(m, path)
    assert same_weights(m, edited)  # same arithmetic in the same order: bit-identical
    assert set(originals) == {e.module for e in res.edits}
    other = model("llama", len(tok))
    other_snap = snapshot(other)
    with pytest.raises(InputError):
        apply_updates(other, path)
    assert same_weights(other, other_snap)
    report = res.report()
    json.dumps(report)
    assert report["n_requests"] == 2 and len(report["edits"]) == 4


def test_updates_refuse_a_second_application_and_other_weights(saved_edit):
    m, snap, edited, path, _ = saved_edit
    apply_updates(m, path)
    with pytest.raises(InputError, match="already carries these updates"):
        apply_updates(m, path)
    assert same_weights(m, edited)  # refused before any change
    other = model("gpt2", m.config.vocab_size, seed=1)  # same architecture, other weights
    other_snap = snapshot(other)
    with pytest.raises(InputError, match="not the ones these updates were computed on"):
        apply_updates(other, path)
    assert same_weights(other, other_snap)
    originals = apply_updates(other, path, check=False)  # the user insists
    assert not same_weights(other, other_snap)
    for name, w0 in originals.items():
        assert torch.equal(w0, other_snap[name + ".weight"])


def test_damaged_updates_files_are_refused_with_a_clear_error(saved_edit, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    m, snap, _, path, _ = saved_edit
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CacheError, match="cannot read updates file"):
        apply_updates(m, truncated)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["1.B"][3, 0] = float("nan")
    poisoned = tmp_path / "nan.safetensors"
    save_file(tensors, str(poisoned), metadata=meta)
    with pytest.raises(CacheError, match=r"entry 1 \(.*\) has NaN/Inf in B"):
        apply_updates(m, poisoned)
    not_ours = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(not_ours))
    with pytest.raises(CacheError, match="not a pmsolve updates file"):
        apply_updates(m, not_ours)
    with pytest.raises(CacheError):
        apply_updates(m, tmp_path / "missing.safetensors")
    assert same_weights(m, snap)


def test_format_1_updates_still_apply_with_a_warning(saved_edit, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    m, _, edited, path, _ = saved_edit
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads(fh.metadata()["pmsolve"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    header["format"] = "pmsolve.updates/1"
    del header["weights"]
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={"pmsolve": json.dumps(header)})
    with pytest.warns(UserWarning, match="records no weight fingerprints"):
        apply_updates(m, old)
    assert same_weights(m, edited)


BAD_REQUESTS = [
    ([{"prompt": "The capital is", "subject": "France", "target_new": "Rome"}], "request 0.*'\\{\\}'"),
    ([REQUESTS[0], {"prompt": "{} is in", "subject": "", "target_new": "Rome"}], "request 1.*subject is empty"),
    ([REQUESTS[0], {"prompt": "{} is in", "subject": "X", "target_new": " "}], "request 1.*target_new is empty"),
    ([{"prompt": "{} is in", "subject": "X"}], "request 0.*'target_new' is missing"),
    ([REQUESTS[0], {**REQUESTS[0], "target_new": "German"}], "requests 0 and 1 conflict"),
    ([], "no edit requests"),
]


@pytest.mark.parametrize("reqs,match", BAD_REQUESTS)
def test_bad_requests_change_nothing(reqs, match, tok):
    m = model("llama", len(tok))
    C = stats(m, tok)
    snap = snapshot(m)
    with pytest.raises(InputError, match=match):
        _edit(m, tok, C, requests=reqs)
    assert same_weights(m, snap)


def test_bad_settings_change_nothing(tok):
    m = model("gpt2", len(tok))
    C = stats(m, tok)
    other = stats(model("llama", len(tok)), tok)
    snap = snapshot(m)
    cases = [
        (dict(layers=[LAYERS]), InputError, "out of range"),
        (dict(layers=[1, 2], distribution="single"), InputError, "exactly one layer"),
        (dict(distribution="zigzag"), InputError, "unknown distribution"),
        (dict(method="rome"), InputError, "one fact"),
        (dict(method="ridge"), InputError, "method"),
        (dict(batch_size=0), InputError, "batch_size"),
        (dict(stats=other), CacheError, "another model"),
        (dict(stats={1: C[1]}), InputError, "no statistics for layer 2"),
        (dict(stats=None), InputError, "no statistics"),
        (dict(value_config={"clamp": 0.2, "clmap": 1.0}), InputError, "unknown settings \\['clmap'\\]"),
        (dict(value_config=[("clamp", 0.2)]), InputError, "ValueConfig or a mapping"),
    ]
    for kw, exc, match in cases:
        stats_ = kw.pop("stats", C)
        with pytest.raises(exc, match=match):
            _edit(m, tok, stats_, **kw)
        assert same_weights(m, snap), kw


class _Acc:
    """Stands in for a statistics object that carries metadata."""

    def __init__(self, C, **meta):
        self._C, self.meta = C, meta

    def mean(self):
        return self._C


def test_statistics_metadata_checked(tok):
    m = model("llama", len(tok))
    C = stats(m, tok)
    snap = snapshot(m)
    with pytest.raises(CacheError, match="layer 1"):
        _edit(m, tok, {2: _Acc(C[2], layer=1)})
    with pytest.raises(CacheError, match="model"):
        _edit(m, tok, {2: _Acc(C[2], layer=2, model="someone-else")}, model_id="tiny")
    assert same_weights(m, snap)
    res = _edit(m, tok, {2: _Acc(C[2], layer=2, model="tiny")}, model_id="tiny")
    assert len(res.edits) == 1


def test_failure_midway_restores(tok, monkeypatch):
    """An error after the first layer was applied leaves no weight changed."""
    m = model("llama", len(tok))
    C = stats(m, tok)
    snap = snapshot(m)
    import pmsolve.editing.preservation as steps  # where each layer's solve is called

    real = steps.solve
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(steps, "solve", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        _edit(m, tok, C, layers=[1, 2])
    assert len(calls) == 2
    assert same_weights(m, snap)


def test_requests_from_files(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in REQUESTS) + "\n")
    assert [r.subject for r in load_requests(p)] == [r["subject"] for r in REQUESTS]
    q = tmp_path / "r.json"
    q.write_text(json.dumps({"requested_rewrite": {**REQUESTS[0], "target_new": {"str": "English"}}}))
    (r,) = load_requests(q)
    assert r.target_new == "English" and r.target_true == "French"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(REQUESTS[0]) + "\n{oops\n")
    with pytest.raises(InputError, match="bad.jsonl:2"):
        load_requests(bad)


def test_presets_load_and_match(tok):
    from pmsolve.editing import list_presets, load_preset, preset_for

    names = list_presets()
    assert {"gpt2-xl", "gpt-j", "llama", "smollm2-135m-instruct"} <= set(names)
    for name in names:
        p = load_preset(name)
        assert p.notes and all(s.layers for s in p.methods.values())
    m = _deep("llama", len(tok))
    assert preset_for(m, "SmolLM2-135M-Instruct-Q4_1").name == "smollm2-135m-instruct"
    assert preset_for(m).name == "llama"  # by model_type
    assert preset_for(_deep("gptj", len(tok))).name == "gpt-j"
    # a preset whose layers the model lacks is another size of the family: no preset, not wrong layers
    assert preset_for(model("llama", len(tok)), "SmolLM2-135M-Instruct-Q4_1") is None  # 4 layers, preset uses 4
    from types import SimpleNamespace

    from transformers import GPT2Config

    assert preset_for(SimpleNamespace(config=GPT2Config(n_embd=1600, n_layer=48)), "x").name == "gpt2-xl"
    for name, width, depth in (("gpt2", 768, 12), ("gpt2-medium", 1024, 24), ("gpt2-large", 1280, 36)):
        assert preset_for(SimpleNamespace(config=GPT2Config(n_embd=width, n_layer=depth)), name) is None
    with pytest.raises(InputError, match="no preset"):
        load_preset("nonexistent")


def _deep(arch: str, vocab: int):
    """A tiny model of 10 layers: deep enough for the built-in presets' layers."""
    from transformers import GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

    if arch == "gptj":
        return GPTJForCausalLM(GPTJConfig(n_embd=32, n_layer=10, n_head=4, rotary_dim=4, vocab_size=vocab,
                                          n_positions=64))
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=64))


def test_a_saved_edited_model_keeps_its_preset(tok, tmp_path):
    """An edited model saved to a folder named anything is matched, when edited again, to the
    preset of the model it came from (config.pmsolve_base), not to its architecture's default."""
    from transformers import AutoModelForCausalLM

    from pmsolve.editing.presets import mark_edited, preset_for

    m = _deep("llama", len(tok))
    mark_edited(m, "SmolLM2-135M-Instruct-Q4_1")
    mark_edited(m, "edited-again")  # the first base is kept
    m.save_pretrained(tmp_path / "model")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert again.config.pmsolve_base == "SmolLM2-135M-Instruct-Q4_1"
    assert preset_for(again, "model").name == "smollm2-135m-instruct"


def test_start_key_constrains_the_bare_prompt_too(tok):
    """Facts whose prompt starts with the subject get a second column: the bare prompt's key,
    sent to the same residual as the template average (EMMET: both exactly)."""
    from pmsolve.editing.keys import capture, key_prompts, pad_id

    m = model("llama", len(tok))
    C = stats(m, tok)
    ad = adapter_for(m)
    reqs = load_requests(REQUESTS)
    starts = [i for i, r in enumerate(reqs) if r.prompt.startswith("{}")]
    assert starts == [1, 2]
    off = _edit(m, tok, C, requests=REQUESTS, method="emmet", start_key=False)
    assert off.edits[0].update.diagnostics.n == 3
    off.restore()
    ctx = context_templates(m, tok)
    kp = key_prompts(tok, reqs, ctx)
    bare_rows = [r for r, t in enumerate(kp.template) if t == 0]
    cap = capture(m, ad, [kp.rows[r] for r in bare_rows], [kp.lookup[r] for r in bare_rows], pad_id(tok),
                  key_layers=[2])
    k_bare = cap.keys[2][starts]
    with torch.no_grad():
        before = ad.rewrite(2)(k_bare).double()
    res = _edit(m, tok, C, requests=REQUESTS, method="emmet", start_key=True)
    (e,) = res.edits
    assert e.update.diagnostics.n == 5
    R = e.update.U.T  # columns: 3 averaged keys, then the 2 bare keys
    assert torch.equal(R[3:], R[starts])  # same residual as the fact's averaged key
    with torch.no_grad():
        after = ad.rewrite(2)(k_bare).double()
    rel = float((after - before - R[3:]).norm() / R[3:].norm())
    assert rel < 1e-4, rel  # fp32 weights, as in test_equality_edit_maps_keys_to_values
    res.restore()
    # ROME keeps one fact per solve; with a start key it is the n = 2 equality solve.
    rome = _edit(m, tok, C, requests=REQUESTS[1:2], method="rome", start_key=True)
    assert rome.edits[0].update.diagnostics.n == 2 and rome.edits[0].update.diagnostics.method == "emmet"


def test_values_under_bf16_autocast(tok):
    """autocast="bf16" with eager attention (the CPU defaults where AMX exists) optimises the
    same δ as fp32 with the model's own attention, up to bf16 rounding of the forward/backward:
    h (and so z = h + δ) is still computed in the model's dtype, and the first Adam steps,
    which move each coordinate by about lr·sign(g), agree except where g is tiny."""
    m = model("llama", len(tok))
    ad = adapter_for(m)
    ctx = context_templates(m, tok)
    reqs = load_requests(REQUESTS)
    ref = optimize_values(m, ad, tok, reqs, ctx, 2, ValueConfig(steps=4, early_stop=False, autocast=None,
                                                                 attention=None))
    impl = m.config._attn_implementation
    amp = optimize_values(m, ad, tok, reqs, ctx, 2, ValueConfig(steps=4, early_stop=False, autocast="bf16",
                                                                 attention="eager"))
    assert m.config._attn_implementation == impl  # switched for the optimisation only
    assert amp.z.dtype == ref.z.dtype == torch.float32 and bool(torch.isfinite(amp.z).all())
    assert torch.equal(amp.h, ref.h)
    cos = torch.nn.functional.cosine_similarity(amp.delta, ref.delta, dim=1)
    assert bool((cos > 0.99).all()), cos  # measured: 1.0000 for all three facts
    with pytest.raises(InputError, match="autocast"):
        optimize_values(m, ad, tok, reqs, ctx, 2, ValueConfig(steps=1, autocast="fp8"))
    assert m.config._attn_implementation == impl  # restored after an error too


def test_auto_precision_follows_the_hardware():
    from pmsolve.editing.values import _autocast
    from pmsolve.models.precision import fast_bf16

    cpu = torch.device("cpu")
    amp, low = _autocast("auto", cpu)
    with amp():
        got = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    assert got == low == (torch.bfloat16 if fast_bf16(cpu) else None)
    amp, low = _autocast(None, cpu)
    with amp():
        assert not torch.is_autocast_enabled("cpu")
    assert low is None


@pytest.mark.parametrize("arch", ARCHS)
def test_values_skip_lower_layers_matches_running_them(tok, arch):
    """Serving layers 0..L-1 from their one-off output gives the δ of running them every step
    (fp32, so only summation-order rounding differs), on every architecture, with the prefix
    cache and without; afterwards every layer has its own forward again."""
    from pmsolve.editing.keys import pad_id
    from pmsolve.editing.values import _build_rows, _LowerLayers

    m = model(arch, len(tok))
    ad = adapter_for(m)
    ctx = context_templates(m, tok)
    reqs = load_requests(REQUESTS)
    rows = _build_rows(tok, reqs, ctx, "{} is a")
    lower = _LowerLayers(m, ad, rows, [0] * len(rows.ids), 2, pad_id(tok), torch.device("cpu"), None)
    assert lower.usable  # the layers' output format is understood: the skip really happens
    for prefix_cache in (True, False):
        cfg = ValueConfig(steps=5, early_stop=False, autocast=None, attention=None, prefix_cache=prefix_cache)
        ref = optimize_values(m, ad, tok, reqs, ctx, 2, replace(cfg, skip_lower_layers=False))
        got = optimize_values(m, ad, tok, reqs, ctx, 2, cfg)
        rel = (got.delta - ref.delta).norm(dim=1) / ref.delta.norm(dim=1)
        assert bool((rel < 1e-4).all()), rel  # Adam's sign-like first steps amplify rounding: allow 1e-4
        assert got.history == pytest.approx(ref.history, rel=1e-5)
    assert all("forward" not in ad.layer(i).__dict__ for i in range(LAYERS))


def test_values_with_several_kl_prompts(tok):
    """One KL row per essence prompt; a one-prompt list is the single prompt exactly, and the
    mean over prompts keeps kl_factor's scale; lists become tuples (hashable, JSON presets);
    kl_positions="all" measures KL after the subject too."""
    from pmsolve.editing.values import _build_rows

    m = model("llama", len(tok))
    ad = adapter_for(m)
    ctx = context_templates(m, tok)
    reqs = load_requests(REQUESTS)
    two = ["{} is a", "{} has"]
    rows = _build_rows(tok, reqs, ctx, two)
    assert sum(t is None for t in rows.target) == 2 * len(reqs)
    cfg = ValueConfig(steps=3, early_stop=False, autocast=None, attention=None)
    one = optimize_values(m, ad, tok, reqs, ctx, 2, cfg)
    same = optimize_values(m, ad, tok, reqs, ctx, 2, replace(cfg, kl_prompt=["{} is a"]))
    assert torch.equal(one.delta, same.delta) and one.history == same.history
    both = optimize_values(m, ad, tok, reqs, ctx, 2, replace(cfg, kl_prompt=two))
    assert both.history[0] == pytest.approx(one.history[0])  # δ = 0: every KL term is 0
    assert not torch.equal(both.delta, one.delta)  # the second prompt's KL does act on δ
    assert replace(cfg, kl_prompt=two).kl_prompt == tuple(two) and hash(replace(cfg, kl_prompt=two))
    # KL at every position after the subject too: zero at δ = 0, and it acts on δ
    every = optimize_values(m, ad, tok, reqs, ctx, 2, replace(cfg, kl_positions="all"))
    assert every.history[0] == pytest.approx(one.history[0])
    assert not torch.equal(every.delta, one.delta)
    for bad in ("is a", [], ["{} is a", 3]):
        with pytest.raises(InputError, match="kl_prompt"):
            ValueConfig(kl_prompt=bad)
    with pytest.raises(InputError, match="kl_positions"):
        ValueConfig(kl_positions="last")


def test_matmul_weights_swap_is_exact_and_restores_the_model(tok):
    """bf16 copies of the linear weights give bit-identical autocast outputs, and the original
    Parameters (and the tied embedding/LM head) come back, also after an error."""
    from pmsolve.editing.values import _matmul_weights_in

    m = model("llama", len(tok))
    before = {name: p for name, p in m.named_parameters()}
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m(ids).logits
        with _matmul_weights_in(m, torch.bfloat16):
            assert m.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
            assert m.model.embed_tokens.weight.dtype == torch.float32
            got = m(ids).logits
    assert torch.equal(ref, got)
    with pytest.raises(RuntimeError, match="boom"), _matmul_weights_in(m, torch.bfloat16):
        raise RuntimeError("boom")
    assert all(p is before[name] for name, p in m.named_parameters())
    assert m.lm_head.weight is m.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_eager_attention_equals_eager(tok, dtype):
    """The grouped form (no key/value head copies) against transformers' eager attention on a
    grouped-query model, with left padding: fp32 to rounding, bf16 within bf16 rounding."""
    from pmsolve.editing.values import _attention

    m = model("llama", len(tok)).to(dtype)
    assert m.config.num_key_value_heads < m.config.num_attention_heads
    ids = torch.randint(2, len(tok), (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = {}
    for impl in ("eager", "auto"):
        with _attention(m, impl, torch.device("cpu")), torch.no_grad():
            out[impl] = m(input_ids=ids, attention_mask=mask).logits.float()
            if impl == "auto":
                assert m.config._attn_implementation == "pmsolve_grouped_eager"
    assert m.config._attn_implementation != "pmsolve_grouped_eager"  # restored
    rel = ((out["auto"] - out["eager"]).norm() / out["eager"].norm()).item()
    assert rel < (1e-6 if dtype == torch.float32 else 1e-2), rel


def test_prompt_keys_are_the_tokens_after_the_subject(tok):
    from pmsolve.editing.keys import capture, key_prompts, pad_id, prompt_keys

    m = model("llama", len(tok))
    ad = adapter_for(m)
    kp = key_prompts(tok, load_requests(REQUESTS), context_templates(m, tok))
    P = prompt_keys(m, ad, kp.rows, kp.lookup, pad_id(tok), 2)
    assert P.shape == (sum(len(r) - last - 1 for r, last in zip(kp.rows, kp.lookup)), ad.d_in)
    # The first of them is row 0's token right after the subject: the same as capturing there.
    cap = capture(m, ad, kp.rows[:1], [kp.lookup[0] + 1], pad_id(tok), key_layers=[2])
    torch.testing.assert_close(P[0], cap.keys[2][0], rtol=1e-5, atol=1e-6)


def test_prompt_preservation_factor_is_the_augmented_matrix():
    from pmsolve.editing.preservation import with_prompt_preservation

    g = torch.Generator().manual_seed(3)
    A = torch.randn(200, 64, generator=g, dtype=torch.float64)
    C = A.T @ A / 200
    P = torch.randn(7, 64, generator=g, dtype=torch.float64)
    f = with_prompt_preservation(pmsolve.factorize(C, backend="torch"), P, 2.5)
    assert f.lowrank is not None and f.lowrank.rank == 7  # extended, not refactored
    want = C + 2.5 * P.T @ P / 7
    K = torch.randn(64, 5, generator=g, dtype=torch.float64)
    ref = torch.linalg.solve(want, K)
    assert float((f.solve(K) - ref).norm() / ref.norm()) < 1e-12  # well conditioned: fp64 rounding
    assert with_prompt_preservation(f, P[:0], 2.5) is f


@pytest.mark.parametrize("source,cols", [("average", 3), ("prompt", 3), ("both", 6)])
def test_key_source_and_prompt_preservation(tok, source, cols):
    """key_source picks the constrained columns (equality holds on them); preserve_prompts
    moves the batch's own relation tokens less (the regularisation path: ‖ΔW Pᵀ‖ cannot
    grow with α) without giving up the equality."""
    from pmsolve.editing.keys import capture, key_prompts, pad_id, prompt_keys

    m = model("llama", len(tok))
    C = stats(m, tok)
    ad = adapter_for(m)
    kp = key_prompts(tok, load_requests(REQUESTS), context_templates(m, tok))
    bare = [i for i, t in enumerate(kp.template) if t == 0]
    own = capture(m, ad, kp.rows, kp.lookup, pad_id(tok), key_layers=[2]).keys[2][bare].double()
    P = prompt_keys(m, ad, kp.rows, kp.lookup, pad_id(tok), 2).double()
    moved = {}
    for alpha in (0.0, 100.0):
        w0 = ad.weight(2).detach().double().clone()
        res = _edit(m, tok, C, requests=REQUESTS, method="emmet", key_source=source, preserve_prompts=alpha)
        dW = ad.weight(2).detach().double() - w0
        res.restore()
        (e,) = res.edits
        assert e.update.diagnostics.n == cols
        if source != "average":  # the own-key columns come last
            U = e.update.U[:, -3:]
            assert float((dW @ own.T - U).norm() / U.norm()) < 1e-4  # fp32 weights
        moved[alpha] = float((dW @ P.T).norm() / (dW @ own.T).norm())
    assert moved[100.0] < 0.5 * moved[0.0], moved


def test_key_options_are_checked_before_any_change(tok):
    m = model("llama", len(tok))
    C = stats(m, tok)
    snap = snapshot(m)
    with pytest.raises(InputError, match="key_source"):
        _edit(m, tok, C, key_source="bogus")
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(InputError, match="preserve_prompts"):
            _edit(m, tok, C, preserve_prompts=bad)
        with pytest.raises(InputError, match="preserve_edits"):
            _edit(m, tok, C, preserve_edits=bad)
    assert same_weights(m, snap)


def test_preserve_edits_keeps_later_batches_off_earlier_keys(tok):
    """With preserve_edits = β, batch 2's solve minimises tr(ΔCΔᵀ) + β‖ΔK₁‖² under its own
    equality constraints (K₁: batch 1's keys), so the change it makes at batch 1's keys cannot
    grow with β (the penalty method's monotonicity; one layer, so batch 2's keys and values do
    not depend on β) and vanishes as β grows, while its own constraints still hold. Not given,
    β is DEFAULT_PRESERVE_EDITS, bit for bit."""
    m = model("llama", len(tok))
    C = stats(m, tok)
    kw = dict(requests=REQUESTS[:4], batch_size=2, layers=[2])
    default = _edit(m, tok, C, **kw)
    default_w = snapshot(m)
    default.restore()
    assert default.report()["preserve_edits"] == DEFAULT_PRESERVE_EDITS > 0
    second = {}
    for beta in (0.0, DEFAULT_PRESERVE_EDITS, 1.0, 1e4):
        res = _edit(m, tok, C, preserve_edits=beta, **kw)
        res.restore()
        assert res.report()["preserve_edits"] == beta
        first, second[beta] = (e for e in res.edits)
        assert second[beta].update.diagnostics.residual < 1e-8
        if beta == 0:
            assert first.keys is None  # kept only when they are needed
        else:
            K1 = first.keys
    res = _edit(m, tok, C, preserve_edits=DEFAULT_PRESERVE_EDITS, **kw)
    assert same_weights(m, default_w)
    res.restore()
    moved = {beta: float((e.update.dense() @ K1).norm()) for beta, e in second.items()}
    assert moved[0.0] >= moved[DEFAULT_PRESERVE_EDITS] * (1 - 1e-9) >= moved[1.0] * (1 - 1e-9) \
        >= moved[1e4] * (1 - 1e-9), moved
    assert moved[1e4] < 1e-2 * moved[0.0], moved


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("preserve_edits", [0.0, None, 1.0])
def test_interrupted_edit_resumes_from_its_checkpoint_bit_for_bit(tmp_path, tok, preserve_edits):
    """Killed before its third batch, an edit with a checkpoint restores the model; run again,
    it re-applies the two saved batches, does the third, and ends where an uninterrupted run
    ends, weight for weight. Another edit's checkpoint is not used. With preserve_edits the
    third batch's factor is extended by the saved batches' keys, which the checkpoint holds."""
    reqs = REQUESTS[:3]
    m = model("gpt2", len(tok))
    C = stats(m, tok)
    snap = snapshot(m)
    kw = dict(method="emmet", layers=[1, 2], batch_size=1, requests=reqs, preserve_edits=preserve_edits)
    whole = _edit(m, tok, C, **kw)
    want, want_values = snapshot(m), whole.values
    whole.restore()

    ck = tmp_path / "edit.ckpt"

    def stop_at_third(stage, done, total):
        if stage == "batch" and done == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _edit(m, tok, C, checkpoint=ck, progress=stop_at_third, **kw)
    assert same_weights(m, snap) and len(list(ck.glob("batch-*.safetensors"))) == 2
    events = []
    resumed = _edit(m, tok, C, checkpoint=ck, progress=lambda *a: events.append(a), **kw)
    assert ("resumed", 2, 3) in events and [e for e in events if e[0] == "batch"] == [("batch", 2, 3)]
    assert same_weights(m, want)
    assert resumed.values == want_values and len(resumed.edits) == len(whole.edits) == 6
    assert resumed.context_templates == whole.context_templates
    assert resumed.fingerprints == whole.fingerprints  # "before" is the unedited model's
    assert resumed.resumed_requests == 2 and resumed.report()["resumed_requests"] == 2
    resumed.restore()
    assert same_weights(m, snap)
    with pytest.warns(UserWarning, match="checkpoint of another edit"):
        other = _edit(m, tok, C, checkpoint=ck, **{**kw, "method": "memit"})
    assert {e.update.diagnostics.method for e in other.edits} == {"memit"}
    first = ck / "batch-000000.safetensors"
    first.write_bytes(first.read_bytes()[:100])
    other.restore()
    with pytest.raises(CacheError, match="delete it to start over"):
        _edit(m, tok, C, checkpoint=ck, **{**kw, "method": "memit"})
    assert same_weights(m, snap)
