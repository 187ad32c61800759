"""pmsolve.Editor on tiny random models: AlphaEdit through the editing layer against the paper's
closed form, hard retention of earlier edits, undo, save/open across processes, resume after a
kill, and typed errors before any weight changes.

The solver-level algebra (null space, projected solve, retained keys) is tested densely in
test_alphaedit.py and test_retention.py; here the question is whether the editor feeds it the
right matrices: the projector from the statistics the user gave, every earlier batch's keys
(and only those), the updates landing in the weights, and a state that survives a process.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import pmsolve
import pmsolve.editing.editor as editor_module
from editing_fixtures import REQUESTS, model, same_weights, snapshot, stats, tokenizer
from pmsolve import Editor
from pmsolve.editing import ValueConfig
from pmsolve.editing.preservation import NullSpaceUpdate
from pmsolve.errors import CacheError, CapacityError, InputError

FAST = ValueConfig(steps=4)  # random models never converge; a few steps exercise the optimiser
F64 = torch.float64
MORE = [
    {"prompt": "{} is the capital of", "subject": "berlin", "target_new": "japan", "target_true": "germany"},
    {"prompt": "{} is in", "subject": "rome", "target_new": "germany", "target_true": "italy"},
]
FIVE = REQUESTS + MORE


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(autouse=True)
def _reference_backend():
    with warnings.catch_warnings(), pmsolve.settings.backend("torch"):
        warnings.simplefilter("ignore", pmsolve.NumericalWarning)
        yield


def _editor(m, tok, C, **kw):
    kw.setdefault("layers", [2])
    kw.setdefault("value_config", FAST)
    kw.setdefault("preserve_prompts", 0.0)
    return Editor(m, tok, stats=C, preset=None, **kw)


def _weights(m, ed):
    return {name: m.get_submodule(name).weight.detach().clone() for name in ed.originals}


# ---------------------------------------------------------------------------
# AlphaEdit through the editor
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("c_weight", [0.0, 30.0])
def test_alphaedit_batches_match_the_papers_closed_form(tok, monkeypatch, c_weight):
    """Each batch's update equals the dense fp64 Δ = R Kᵀ P (K Kᵀ P + (C_p + γC) P + α I)⁻¹ with P
    from an eigendecomposition of the user's C (eigenvalues below threshold × tr(C)/d), C_p the
    sum of K Kᵀ over the earlier batches and γ = c_weight (0: the paper), for three batches with a
    save/open between the second and the third. Tolerance: test_alphaedit.py bounds both routes'
    error by ~1e3·ε for systems of this condition; the keys here are O(1) and α = 1, so 1e-10
    relative leaves a wide margin."""
    m = model("gpt2", len(tok))
    C = stats(m, tok, [2])
    seen = []
    real = NullSpaceUpdate.solve

    def spy(self, K, R, method, mu, **kw):
        update = real(self, K, R, method, mu, **kw)
        seen.append((K.to(F64).clone(), R.to(F64).clone(), update.dense()))
        return update

    monkeypatch.setattr(NullSpaceUpdate, "solve", spy)
    ed = _editor(m, tok, C, method="alphaedit", state=None, null_space={"c_weight": c_weight})
    ed.edit(FIVE[:2], batch_size=2)
    ed.edit(FIVE[2:3])
    ed.save(tmp := _tmp_dir())
    again = Editor.open(tmp, m, tok, C)
    again.edit(FIVE[3:], batch_size=2)

    lam, V = torch.linalg.eigh(C[2].to(F64))
    U = V[:, lam < ed.null_space_settings.threshold * lam.sum() / lam.numel()]
    assert 0 < U.shape[1] < C[2].shape[0]
    P = U @ U.T
    alpha = ed.null_space_settings.alpha
    Cp = torch.zeros_like(P)
    assert len(seen) == 3
    for K, R, got in seen:
        A = K @ K.T @ P + (Cp + c_weight * C[2].to(F64)) @ P + alpha * torch.eye(P.shape[0], dtype=F64)
        want = torch.linalg.solve(A, R @ K.T @ P, left=False)  # X A = B, A not symmetric
        assert (got - want).norm() <= 1e-10 * want.norm()
        if c_weight:  # γ changes the update: the check above could not pass with γ ignored
            A0 = K @ K.T @ P + Cp @ P + alpha * torch.eye(P.shape[0], dtype=F64)
            assert (got - torch.linalg.solve(A0, R @ K.T @ P, left=False)).norm() >= 1e-3 * want.norm()
        assert (got @ (torch.eye(P.shape[0], dtype=F64) - P)).norm() <= 1e-10 * got.norm()  # in the null space
        Cp = Cp + K @ K.T
    summary = again.summary()["layer_states"]["2"]
    assert summary["earlier_keys"] == sum(K.shape[1] for K, _, _ in seen[:2]) + seen[2][0].shape[1]
    assert summary["r"] == U.shape[1]


def _tmp_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="pmsolve-editor-"))


def test_alphaedit_refuses_an_empty_null_space_before_any_weight_changes(tok):
    m = model("gpt2", len(tok))
    C = stats(m, tok, [2])
    snap = snapshot(m)
    with pytest.raises(CapacityError, match=r"null space|below the cut|d ="):
        _editor(m, tok, C, method="alphaedit", null_space={"threshold": 1e-30, "relative_to": "absolute"})
    assert same_weights(m, snap)


# ---------------------------------------------------------------------------
# hard retention
# ---------------------------------------------------------------------------


def test_hard_retention_keeps_earlier_outputs_and_soft_does_not(tok):
    """After a second batch, ΔW₂ Kᵢ = 0 at every earlier key under hard retention (relative to
    ‖ΔW₂‖‖K₁‖; the solver-level test measures ≤ 4e-13 at κ(C) = 1e10, this C is far better), while
    the same batches with soft retention and β = 0 move those outputs (the check can fail)."""
    def second_update_on_first_keys(retention):
        m = model("llama", len(tok))
        C = stats(m, tok, [1, 2])
        ed = _editor(m, tok, C, layers=[1, 2], method="emmet", retention=retention, preserve_edits=0.0)
        ed.edit(FIVE[:2], batch_size=2)
        first = {e.layer: e.keys for e in ed.batches[0].edits}
        if retention == "soft":  # β = 0 keeps no keys: measure them as hard retention would
            first = None
        ed.edit(FIVE[2:4], batch_size=2)
        return ed, first

    ed, first = second_update_on_first_keys("hard")
    for e in ed.batches[1].edits:
        D, K1 = e.update.dense(), first[e.layer].to(F64)
        assert (D @ K1).norm() <= 1e-10 * D.norm() * K1.norm()
    caps = {k: v["capacity"] for k, v in ed.summary()["layer_states"].items()}
    assert all(c == 128 - 4 for c in caps.values())  # d_in 128, two batches of two keys

    soft, _ = second_update_on_first_keys("soft")
    for e_soft, e_hard in zip(soft.batches[1].edits, ed.batches[1].edits):
        D, K1 = e_soft.update.dense(), first[e_hard.layer].to(F64)
        assert (D @ K1).norm() > 1e-3 * D.norm() * K1.norm()


def _narrow_llama(vocab):
    """One MLP of width 3: hard retention's capacity is three keys per layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=3, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_hard_retention_past_capacity_is_refused_before_any_weight_changes(tok):
    m = _narrow_llama(len(tok))
    C = stats(m, tok, [1])
    ed = _editor(m, tok, C, layers=[1], method="emmet", retention="hard")
    ed.edit(FIVE[:2], batch_size=2)
    snap = snapshot(m)
    with pytest.raises(CapacityError, match="past capacity") as info:
        ed.edit(FIVE[2:4], batch_size=2)  # 2 more keys, room for 1
    assert info.value.required == 2 and info.value.available == 1
    assert same_weights(m, snap) and ed.batches_done == 1
    ed.edit(FIVE[2:3])  # one key still fits
    assert ed.summary()["layer_states"]["1"]["capacity"] == 0


# ---------------------------------------------------------------------------
# undo, save / open, resume
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["alphaedit", "emmet"])
def test_undo_is_bit_exact_and_editing_after_it_continues_as_if_never_done(tok, method):
    m = model("gpt2", len(tok))
    C = stats(m, tok, [1, 2])
    kw = dict(layers=[1, 2], method=method, preserve_edits=None if method == "alphaedit" else 0.5)
    unedited = snapshot(m)
    ed = _editor(m, tok, C, **kw)
    ed.edit(FIVE[:3], batch_size=1)
    after_one = ed.batches[0].after
    ed.undo(2)
    assert ed.batches_done == 1 and ed.batches[-1].after == after_one
    fresh_model = model("gpt2", len(tok))
    fresh = _editor(fresh_model, tok, C, **kw)
    fresh.edit(FIVE[:1])
    assert same_weights(m, snapshot(fresh_model))  # bit for bit: one batch, never more
    ed.edit(FIVE[3:5], batch_size=1)
    fresh.edit(FIVE[3:5], batch_size=1)  # the states were rebuilt from batch 0's keys alone
    assert same_weights(m, snapshot(fresh_model))
    ed.restore()
    assert same_weights(m, unedited) and ed.batches_done == 0
    with pytest.raises(InputError, match="undo takes 0 to 0"):
        ed.undo(1)


def test_a_call_result_restores_its_own_batches_only_while_they_are_last(tok):
    m = model("gpt2", len(tok))
    C = stats(m, tok, [2])
    ed = _editor(m, tok, C, method="emmet", preserve_edits=0.5)
    first = ed.edit(FIVE[:1])
    snap = snapshot(m)
    second = ed.edit(FIVE[1:3], batch_size=1)
    second.restore()
    assert same_weights(m, snap) and ed.batches_done == 1
    ed.edit(FIVE[3:4])
    with pytest.raises(InputError, match="no longer the editor's last"):
        first.restore()


def test_saved_editor_reopens_on_the_unedited_or_the_edited_model(tok, tmp_path):
    C_model = model("gpt2", len(tok))
    C = stats(C_model, tok, [1, 2])
    kw = dict(layers=[1, 2], method="alphaedit")
    m = model("gpt2", len(tok))
    ed = _editor(m, tok, C, state=tmp_path / "ed", **kw)
    ed.edit(FIVE[:3], batch_size=1)
    edited = snapshot(m)

    fresh = model("gpt2", len(tok))  # a new process: the unedited model, batches re-applied
    back = Editor.open(tmp_path / "ed", fresh, tok, C)
    assert back.batches_done == 3 and same_weights(fresh, edited)
    assert [r.subject for r in back.requests] == [r["subject"] for r in FIVE[:3]]
    back.edit(FIVE[3:5], batch_size=1)
    ed.edit(FIVE[3:5], batch_size=1)  # the original editor, never saved and reopened
    assert same_weights(fresh, snapshot(m))

    same = Editor.open(tmp_path / "ed", fresh, tok, C)  # the model as the editor left it
    assert same.batches_done == 5 and same_weights(fresh, snapshot(m))
    same.undo(5)
    assert same_weights(fresh, snapshot(model("gpt2", len(tok))))
    assert Editor.open(tmp_path / "ed", model("gpt2", len(tok)), tok, C).batches_done == 0  # saved as it is now


def test_reopening_refuses_other_models_statistics_and_edited_weights(tok, tmp_path):
    m = model("gpt2", len(tok))
    C = stats(m, tok, [1, 2])
    ed = _editor(m, tok, C, layers=[1, 2], method="emmet", preserve_edits=0.5, state=tmp_path / "ed")
    ed.edit(FIVE[:2], batch_size=1)
    with pytest.raises(InputError, match="already holds an editor"):
        _editor(model("gpt2", len(tok)), tok, C, layers=[1, 2], state=tmp_path / "ed")

    other_arch = model("llama", len(tok))
    with pytest.raises(CacheError, match="another model"):
        Editor.open(tmp_path / "ed", other_arch, tok, stats(other_arch, tok, [1, 2]))
    other_stats = {layer: c * 2 for layer, c in C.items()}
    with pytest.raises(CacheError, match="other statistics"):
        Editor.open(tmp_path / "ed", model("gpt2", len(tok)), tok, other_stats)
    other_seed = model("gpt2", len(tok), seed=1)
    snap = snapshot(other_seed)
    with pytest.raises(CacheError, match="neither the unedited"):
        Editor.open(tmp_path / "ed", other_seed, tok, C)
    assert same_weights(other_seed, snap)
    with pytest.raises(CacheError, match="holds no saved editor"):
        Editor.open(tmp_path / "nothing", model("gpt2", len(tok)), tok, C)


def test_a_killed_edit_keeps_its_finished_batches_and_the_same_call_goes_on(tok, tmp_path, monkeypatch):
    C = stats(model("gpt2", len(tok)), tok, [2])
    kw = dict(method="alphaedit")
    straight = model("gpt2", len(tok))
    _editor(straight, tok, C, **kw).edit(FIVE[:4], batch_size=1)

    real, calls = editor_module._edit_batch, {"n": 0}

    def dies_on_the_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(editor_module, "_edit_batch", dies_on_the_third)
    m = model("gpt2", len(tok))
    ed = _editor(m, tok, C, state=tmp_path / "ed", **kw)
    with pytest.raises(KeyboardInterrupt):
        ed.edit(FIVE[:4], batch_size=1)
    assert ed.batches_done == 2
    monkeypatch.setattr(editor_module, "_edit_batch", real)

    fresh = model("gpt2", len(tok))  # the next process
    back = Editor.open(tmp_path / "ed", fresh, tok, C)
    assert back.batches_done == 2
    res = back.edit(FIVE[:4], batch_size=1)  # the same call: batches 3 and 4 only
    assert back.batches_done == 4 and res.report()["resumed_requests"] == 2
    assert same_weights(fresh, snapshot(straight))


# ---------------------------------------------------------------------------
# settings that cannot work
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(retention="firm"), "retention"),
    (dict(method="alphaedit", retention="hard"), "hard"),
    (dict(retention="hard", preserve_prompts=0.5), "preserve_prompts"),
    (dict(method="alphaedit", null_space={"threshold": -1}), "threshold"),
    (dict(method="alphaedit", null_space={"cut": 1}), "cut"),
])
def test_bad_settings_are_typed_errors_before_any_weight_changes(tok, kw, match):
    m = model("gpt2", len(tok))
    C = stats(m, tok, [2])
    snap = snapshot(m)
    with pytest.raises(InputError, match=match):
        _editor(m, tok, C, **kw)
    assert same_weights(m, snap)


def test_statistics_of_the_wrong_width_are_refused(tok):
    m = model("gpt2", len(tok))
    with pytest.raises(CacheError, match="64-dimensional but .* takes 256-dimensional keys"):
        _editor(m, tok, {2: torch.eye(64, dtype=F64)}, method="alphaedit")


def test_edit_function_takes_alphaedit_and_hard_retention(tok):
    """pmsolve.edit is an Editor for one call: same weights as the Editor, restore exact."""
    m1, m2 = model("gpt2", len(tok)), model("gpt2", len(tok))
    C = stats(m1, tok, [1, 2])
    snap = snapshot(m1)
    for method, retention in (("alphaedit", "soft"), ("emmet", "hard")):
        res = pmsolve.edit(m1, tok, FIVE[:4], method=method, retention=retention, layers=[1, 2], stats=C, preset=None,
                           value_config=FAST, batch_size=2, preserve_prompts=0.0)
        assert res.report()["retention"] == retention
        ed = _editor(m2, tok, C, layers=[1, 2], method=method, retention=retention)
        ed.edit(FIVE[:4], batch_size=2)
        assert same_weights(m1, snapshot(m2))
        res.restore()
        ed.restore()
        assert same_weights(m1, snap)
