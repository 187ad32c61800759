"""The sequential editing benchmark (pmsolve.experiments.sequential, `pmsolve eval --sequential`)
on a tiny random Llama with SmolLM2's tokenizer and made-up flat CounterFact records: record
selection, checkpoint rows, resume after a kill without redoing finished work, bad input."""

from __future__ import annotations

import json
import statistics
import warnings

import pytest
import torch

import pmsolve
import pmsolve.editing
from pmsolve.cli import main
from pmsolve.errors import CacheError, InputError
from pmsolve.experiments import sequential as seq

NAMES = ["Ada Quill", "Bo Lark", "Cy Moss", "Dee Fern", "Eve Pine", "Fay Reed", "Gus Oak", "Hal Ivy",
         "Ian Ash", "Jo Elm", "Kit Bay", "Lu Fir", "Mo Yew", "Ned Rye"]
COLOURS = ["red", "green", "blue", "black", "white", "pink", "grey"]
TEXT = "The sky is blue and the grass is green. Ada likes red; Cy likes blue. Bo wears black shoes.\n\n" * 60


def _flat(i: int, name: str) -> dict:
    true, new = COLOURS[i % 7], COLOURS[(i + 3) % 7]
    return {"case_id": i, "prompt": f"The favourite colour of {name} is", "subject": name, "target_new": new,
            "ground_truth": true, "rephrase_prompt": f"{name} likes the colour",
            "locality_prompt": f"The favourite colour of {NAMES[(i + 1) % len(NAMES)]} is",
            "locality_ground_truth": COLOURS[(i + 1) % 7]}


FLAT = [_flat(i, n) for i, n in enumerate(NAMES)]
# left out by the selection: no rephrase; a subject seen before; target_new == ground truth
FLAT += [{**_flat(20, "Oz Bean"), "rephrase_prompt": ""}, {**_flat(21, "Ada Quill"), "case_id": 21},
         {**_flat(22, "Pam Nut"), "target_new": "red", "ground_truth": "red"}]

CFG = seq.SequentialConfig(edits=6, batch_size=2, checkpoints=(4,), eval_sample=3, fluency_sample=2,
                           max_new_tokens=4, ppl_tokens=64, ppl_seq_len=16, ppl_skip_tokens=50, stats_tokens=500)
OPTS = {"layers": [1], "preset": None, "value_config": {"steps": 2}}


@pytest.fixture(autouse=True)
def _torch_backend():
    with warnings.catch_warnings(), pmsolve.settings.backend("torch"):
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoTokenizer

    from pmsolve.models.loading import ensure_default_converted

    root = tmp_path_factory.mktemp("seq")
    tok = AutoTokenizer.from_pretrained(ensure_default_converted())
    (root / "cf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FLAT))
    (root / "corpus.txt").write_text(TEXT)
    return root, tok


def _model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _stats(model, tok, root):
    from pmsolve.stats import collect_stats

    return {1: collect_stats(model, tok, [1], str(root / "corpus.txt"), max_tokens=500, progress=False).stats[1].mean()}


def _run(files, run_dir, model, methods=("memit", "emmet"), cfg=CFG, **kw):
    root, tok = files
    records = seq.select_records(root / "cf.jsonl", cfg)
    return seq.run(model, tok, records, cfg, run_dir, methods=methods, stats=_stats(model, tok, root),
                   method_options={m: OPTS for m in methods}, corpus=str(root / "corpus.txt"), log=lambda m: None,
                   **kw)


def test_selection_is_seeded_filtered_and_a_prefix_of_longer_runs(files):
    root, _ = files
    recs = seq.select_records(root / "cf.jsonl", CFG)
    assert len(recs) == 6 and len({r.case_id for r in recs}) == 6
    assert all(r.case_id < 14 for r in recs)  # the three bad records are never chosen
    assert [r.case_id for r in recs] == [r.case_id for r in seq.select_records(root / "cf.jsonl", CFG)]
    longer = seq.select_records(root / "cf.jsonl", CFG.__class__(**{**CFG.__dict__, "edits": 12}))
    assert [r.case_id for r in longer[:6]] == [r.case_id for r in recs]
    other = seq.select_records(root / "cf.jsonl", CFG.__class__(**{**CFG.__dict__, "seed": 1}))
    assert [r.case_id for r in other] != [r.case_id for r in recs]


def test_run_scores_checkpoints_and_restores_the_model(files, tmp_path):
    root, tok = files
    model = _model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = _run(files, tmp_path / "run", model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    rows = out["rows"]
    assert [(r["method"], r["edits"]) for r in rows] == [("unedited", 4), ("unedited", 6), ("memit", 4),
                                                         ("memit", 6), ("emmet", 4), ("emmet", 6)]
    for r in rows:
        assert r["n_es"] == (3 if r["method"] == "unedited" else r["edits"])  # unedited: on the subsample
        assert r["n_ps_ns"] == 3 and r["n_fluency"] == 2
        assert r["ppl"] > 1 and r["ppl_tokens"] == 64
    edited = [r for r in rows if r["method"] != "unedited"]
    assert all(r["unedited_ppl"] == rows[0]["ppl"] for r in edited)  # one unedited reference
    # the unedited NS beside each row is the unedited model on the same prompts
    assert [r["unedited_ns"] for r in edited if r["edits"] == 6] == [rows[1]["ns"]] * 2
    assert all(0 <= r["es"] <= 100 and 0 <= r["ns"] <= 100 for r in edited)
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == json.loads(json.dumps(rows))
    batches = json.loads((tmp_path / "run" / "memit" / "batches.json").read_text())
    assert [b["batch"] for b in batches] == [0, 1, 2]
    assert {"keys", "values", "solve", "apply"} <= set(batches[0]["timings"])
    times = out["solver_times"]["emmet"]
    assert times["first_batch"] == 0 and times["last_batch"] == 2 and times["solve_last"] >= 0
    assert seq.collapse_point([{"edits": 4, "es": 90.0}, {"edits": 8, "es": 70.0}]) == 8


def test_killed_run_resumes_after_the_last_batch_and_keeps_finished_checkpoints(files, tmp_path, monkeypatch):
    root, tok = files
    reference = _run(files, tmp_path / "ref", _model(tok), methods=("emmet",))
    calls = {"edit": 0, "score": 0}
    real_edit, real_score = seq.StatelessEditor.edit, seq.score_checkpoint

    def dies_on_batch_three(self, requests):
        calls["edit"] += 1
        if calls["edit"] == 3:
            raise KeyboardInterrupt  # a kill during batch 3
        return real_edit(self, requests)

    def counted(*a, **k):
        calls["score"] += 1
        return real_score(*a, **k)

    monkeypatch.setattr(seq.StatelessEditor, "edit", dies_on_batch_three)
    monkeypatch.setattr(seq, "score_checkpoint", counted)
    model = _model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        _run(files, tmp_path / "run", model, methods=("emmet",))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # put back even so
    assert calls == {"edit": 3, "score": 1}  # checkpoint 4 was scored before the kill
    assert len(json.loads((tmp_path / "run" / "emmet" / "batches.json").read_text())) == 2
    monkeypatch.setattr(seq.StatelessEditor, "edit", real_edit)
    calls.update(edit=0, score=0)
    real_edit2 = seq.StatelessEditor.edit

    def counting(self, requests):
        calls["edit"] += 1
        return real_edit2(self, requests)

    monkeypatch.setattr(seq.StatelessEditor, "edit", counting)
    out = _run(files, tmp_path / "run", _model(tok), methods=("emmet",))
    assert calls == {"edit": 1, "score": 1}  # batch 3 only, checkpoint 6 only
    strip = lambda rows: [{k: v for k, v in r.items() if k != "eval_seconds"} for r in rows]  # noqa: E731
    assert strip(out["rows"]) == strip(reference["rows"])  # as if never interrupted
    # a run with every checkpoint done and every batch edited does nothing again
    calls.update(edit=0, score=0)
    _run(files, tmp_path / "run", _model(tok), methods=("emmet",))
    assert calls == {"edit": 0, "score": 0}


def test_longer_run_continues_a_shorter_one(files, tmp_path, monkeypatch):
    root, tok = files
    short = seq.SequentialConfig(**{**CFG.__dict__, "edits": 2, "checkpoints": ()})
    _run(files, tmp_path / "run", _model(tok), methods=("memit",), cfg=short)
    calls = []
    real = seq.StatelessEditor.edit
    monkeypatch.setattr(seq.StatelessEditor, "edit", lambda self, r: calls.append(1) or real(self, r))
    out = _run(files, tmp_path / "run", _model(tok), methods=("memit",))
    assert len(calls) == 2 and [r["edits"] for r in out["rows"] if r["method"] == "memit"] == [2, 4, 6]


def test_state_of_another_run_is_refused(files, tmp_path):
    root, tok = files
    _run(files, tmp_path / "run", _model(tok), methods=("memit",),
         cfg=seq.SequentialConfig(**{**CFG.__dict__, "edits": 2, "checkpoints": ()}))
    other = seq.SequentialConfig(**{**CFG.__dict__, "edits": 2, "checkpoints": (), "eval_sample": 5})
    with pytest.raises(CacheError, match="another run"):
        _run(files, tmp_path / "run", _model(tok), methods=("memit",), cfg=other)


def test_bad_input(files, tmp_path):
    root, tok = files
    with pytest.raises(seq.DataUnavailable, match="not found"):
        seq.select_records(tmp_path / "missing.jsonl", CFG)
    with pytest.raises(InputError, match="usable records"):
        seq.select_records(root / "cf.jsonl", seq.SequentialConfig(**{**CFG.__dict__, "edits": 16}))
    for bad in ({"edits": 7}, {"checkpoints": (3,)}, {"checkpoints": (8,)}, {"batch_size": 0}):
        with pytest.raises(InputError):
            seq.SequentialConfig(**{**CFG.__dict__, **bad}).check()
    recs = seq.select_records(root / "cf.jsonl", CFG)
    with pytest.raises(InputError, match="unknown method"):
        seq.run(_model(tok), tok, recs, CFG, tmp_path / "r", methods=("rome",), stats={})


def test_persistent_methods_run_on_the_editor_and_resume_after_a_kill(files, tmp_path, monkeypatch):
    """AlphaEdit, hard retention and β run on pmsolve.Editor, which saves itself after every batch:
    a kill during batch 3 loses no finished batch, and the resumed run scores as an unbroken one."""
    root, tok = files
    methods = ("alphaedit", "hard", "memit+beta")
    reference = _run(files, tmp_path / "ref", _model(tok), methods=methods)
    edited = [r for r in reference["rows"] if r["method"] != "unedited"]
    assert sorted((r["method"], r["edits"]) for r in edited) == sorted((m, e) for m in methods for e in (4, 6))
    assert all(0 <= r["es"] <= 100 and r["ppl"] > 1 for r in edited)
    folders = sorted((tmp_path / "ref").glob("*/editor"))
    assert len(folders) == 3 and all(len(list(f.glob("batch-*.safetensors"))) == 3 for f in folders)

    real, calls = seq.PersistentEditor.edit, {"n": 0}

    def dies_on_batch_three(self, requests):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, requests)

    monkeypatch.setattr(seq.PersistentEditor, "edit", dies_on_batch_three)
    model = _model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        _run(files, tmp_path / "run", model, methods=("alphaedit",))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(list((tmp_path / "run" / "alphaedit" / "editor").glob("batch-*.safetensors"))) == 2
    monkeypatch.setattr(seq.PersistentEditor, "edit", real)
    out = _run(files, tmp_path / "run", _model(tok), methods=("alphaedit",))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "eval_seconds"} for r in rows]  # noqa: E731
    assert strip(out["rows"]) == strip([r for r in reference["rows"] if r["method"] in ("unedited", "alphaedit")])


def test_alphaedit_gamma_is_alphaedit_with_its_default_c_weight(files, tmp_path):
    """The named method is the same Editor run as alphaedit given c_weight = 3000 by hand: same
    weights after every batch, same scores; and γ changes the edit (it is not ignored)."""
    from pmsolve._io import read_safetensors

    root, tok = files
    records = seq.select_records(root / "cf.jsonl", CFG)

    def run(folder, method, options):
        model = _model(tok)
        seq.run(model, tok, records, CFG, tmp_path / folder, methods=(method,), stats=_stats(model, tok, root),
                method_options={method: options}, corpus=str(root / "corpus.txt"), log=lambda m: None)
        state = tmp_path / folder / method.replace("+", "_") / "state.safetensors"
        rows = [{k: v for k, v in r.items() if k not in ("method", "eval_seconds")}
                for r in seq._read_lines(state.parent / "checkpoints.jsonl")]
        return read_safetensors(state, "state")[0], rows

    named, named_rows = run("named", "alphaedit+gamma", OPTS)
    by_hand, by_hand_rows = run("by_hand", "alphaedit", {**OPTS, "null_space": {"c_weight": 3000.0}})
    paper, _ = run("paper", "alphaedit", OPTS)
    assert named.keys() == by_hand.keys() and all(torch.equal(named[k], by_hand[k]) for k in named)
    assert named_rows == by_hand_rows
    assert any(not torch.allclose(named[k], paper[k]) for k in named)


def test_method_settings_merge_over_the_defaults():
    assert seq.method_settings("alphaedit+gamma", {}) == {"null_space": {"c_weight": 3000.0}}
    assert seq.method_settings("alphaedit+gamma", {"null_space": {"threshold": 0.01}, "layers": [2]}) == {
        "null_space": {"c_weight": 3000.0, "threshold": 0.01}, "layers": [2]}
    assert seq.method_settings("alphaedit+gamma", {"null_space": {"c_weight": 10.0}})["null_space"] == {"c_weight": 10.0}
    assert seq.method_settings("memit", {"layers": [1]}) == {"layers": [1]}
    seq.method_settings("alphaedit+gamma", {"null_space": {"c_weight": 1.0}})
    assert seq.METHOD_DEFAULTS["alphaedit+gamma"]["null_space"] == {"c_weight": 3000.0}  # not mutated


def test_command_skips_without_the_data_file_and_refuses_bad_options(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(seq, "default_data_path", lambda: tmp_path / "nowhere" / seq.DATA_FILE)
    assert main(["eval", "--sequential"]) == 0
    assert "skipped" in capsys.readouterr().err
    assert main(["eval", "--sequential", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "--sequential", "--edits", "250"]) == 2  # not a multiple of the batch size
    assert "multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--sequential", "--methods", "memit,rome"])
    assert main(["eval", "--sequential", "--null-space", '{"c_weight": 300}']) == 2  # no alphaedit in the run
    assert "add alphaedit or alphaedit+gamma to --methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--sequential", "--methods", "alphaedit", "--null-space", "[300]"])  # not an object
    assert main(["eval"]) == 2  # plain eval still needs --out


def test_editor_methods_resume_from_the_editors_own_folder(files, tmp_path, monkeypatch):
    """Methods with state across batches run on pmsolve.Editor: a longer run reopens the Editor on
    the unedited model (it re-applies its batches) and edits only the batches it lacks, scoring as
    an unbroken run does."""
    from pmsolve.editing import Editor

    root, tok = files
    cfg = seq.SequentialConfig(**{**CFG.__dict__, "edits": 4, "checkpoints": (2,)})
    ref = _run(files, tmp_path / "ref", _model(tok), methods=("hard",), cfg=cfg)
    calls: list[str] = []
    real_edit, real_open = seq.PersistentEditor.edit, Editor.open.__func__
    monkeypatch.setattr(seq.PersistentEditor, "edit", lambda self, r: calls.append("edit") or real_edit(self, r))
    monkeypatch.setattr(Editor, "open", classmethod(lambda cls, *a, **k: calls.append("open") or real_open(cls, *a, **k)))
    short = seq.SequentialConfig(**{**CFG.__dict__, "edits": 2, "checkpoints": ()})
    _run(files, tmp_path / "run", _model(tok), methods=("hard",), cfg=short)
    assert calls == ["edit"]
    out = _run(files, tmp_path / "run", _model(tok), methods=("hard",), cfg=cfg)
    assert calls == ["edit", "open", "edit"]  # reopened, one more batch
    keys = ("edits", "es", "ps", "ns", "unedited_ns", "n_es", "n_ps_ns", "ppl")
    pick = lambda rows: [{k: r[k] for k in keys} for r in rows if r["method"] == "hard"]  # noqa: E731
    assert pick(out["rows"]) == pick(ref["rows"]) and len(pick(ref["rows"])) == 2
    assert [b["batch"] for b in json.loads((tmp_path / "run" / "hard" / "batches.json").read_text())] == [0, 1]


def test_perplexity_of_padded_batches_matches_one_window_at_a_time():
    import math

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    windows = [torch.randint(0, 500, (n,)).tolist() for n in (20, 37, 50, 9, 64)]
    nll = count = 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(m(torch.tensor([w])).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(-1, torch.tensor(w[1:]).unsqueeze(-1)).sum())
            count += len(w) - 1
    assert seq.perplexity(m, windows, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_report_tables():
    rows = [{"method": "unedited", "edits": 100, "es": 1.0, "n_es": 100, "ps": 2.0, "ns": 67.0, "n_ps_ns": 100,
             "fluency": 5.0, "ppl": 34.4},
            {"method": "memit", "edits": 100, "es": 100.0, "n_es": 100, "ps": 89.0, "ns": 68.0, "unedited_ns": 67.0,
             "n_ps_ns": 100, "fluency": 4.9, "unedited_fluency": 5.0, "fluency_change_pct": -2.3,
             "fluency_change_se_pct": 1.1, "ppl": 35.07, "unedited_ppl": 34.4,
             "es_by_quarter": [100.0, 100.0, 100.0, 100.0], "es_newest_batch": 100.0}]
    batch = {"batch": 0, "edits_after": 100, "seconds": 93.1, "without_values": 9.7,
             "timings": {"keys": 9.1, "values": 83.4, "solve": 0.1, "apply": 0.5}}
    text = seq.report(rows, seq.solver_times({"memit": [batch, {**batch, "batch": 1, "edits_after": 200}]}))
    assert "| memit | 100 (100) | 100 / 100 / 100 / 100; 100 | 89 | 68 (67) | 100 | 4.9 (5) | -2.3 ± 1.1 | 35.07 (34.4) |" in text
    assert "| unedited | 1 (100) | – | 2 | 67 |" in text  # rows without the split (and the reference)
    assert "| memit | 100 | none up to 100 |" in text and "| memit | 2 (200) | 93.1 | 83.4 |" in text


def test_es_by_age_splits_the_edits_in_edit_order():
    # 10 edits, batches of 3: quarters 0-1, 2-4, 5-6, 7-9 (i·n // 4 bounds); newest batch 7-9
    es = [1, 1, 1, 0, 1, 0, 0, 1, 1, 0]
    got = seq.es_by_age(es, batch_size=3)
    assert got["es_by_quarter"] == [100.0, pytest.approx(66.67), 0.0, pytest.approx(66.67)]
    assert got["es_newest_batch"] == pytest.approx(66.67)
    sizes = (2, 3, 2, 3)
    assert sum(q * n for q, n in zip(got["es_by_quarter"], sizes)) / 10 == pytest.approx(100 * statistics.fmean(es), abs=0.01)


def test_curve_plots_every_method_with_the_unedited_reference(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"method": m, "edits": c, "es": es, "ps": 50.0, "ns": 60.0, "ppl": ppl}
            for m, pts in (("unedited", [(100, 30.0, 34.4), (200, 31.0, 34.4)]),
                           ("memit", [(100, 100.0, 35.1), (200, 98.5, 35.8)]),
                           ("alphaedit", [(100, 100.0, 35.3), (200, None, 36.4)]))  # a missing score is skipped
            for c, es, ppl in pts]
    path = seq.plot_curve(rows, tmp_path / "curve.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
