"""`pmsolve edit` end to end on a tiny model saved to disk."""

import json
from dataclasses import asdict

import pytest
import torch

import pmsolve
from editing_fixtures import REQUESTS, model, tokenizer
from pmsolve import cli
from pmsolve.editing import apply_updates


@pytest.fixture(autouse=True)
def _reference_backend():
    with pmsolve.settings.backend("torch"):  # independent of the native build
        yield


@pytest.fixture()
def tiny_folder(tmp_path):
    tok = tokenizer()
    m = model("llama", len(tok))
    folder = tmp_path / "tiny"
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _two_requests(tmp_path, monkeypatch):
    """A fresh pmsolve cache and a JSONL file with the first two requests."""
    monkeypatch.setenv("PMSOLVE_CACHE", str(tmp_path / "cache"))
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in REQUESTS[:2]))
    return reqs


def test_edit_command_writes_model_updates_and_report(tiny_folder, tmp_path, monkeypatch, capsys):
    reqs = _two_requests(tmp_path, monkeypatch)
    out = tmp_path / "out"
    rc = cli.main(["edit", "--model", str(tiny_folder), "--requests", str(reqs), "--layers", "1-2",
                   "--method", "memit", "--mu", "100", "--batch-size", "1", "--stats-tokens", "3000",
                   "--preset", "llama", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "memit" and report["layers"] == [1, 2] and len(report["edits"]) == 4
    assert "facts/s" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(out / "model")
    assert edited.config.pmsolve_base == "tiny"  # what it was edited from, for the next edit's preset
    original = AutoModelForCausalLM.from_pretrained(tiny_folder)
    apply_updates(original, out / "updates.safetensors")
    for (n, a), (_, b) in zip(edited.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), n


def test_apply_command_puts_saved_updates_into_the_unedited_model(tiny_folder, tmp_path, monkeypatch, capsys):
    reqs = _two_requests(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert cli.main(["edit", "--model", str(tiny_folder), "--requests", str(reqs), "--layers", "2",
                     "--method", "emmet", "--stats-tokens", "3000", "--preset", "llama", "--out", str(out)]) == 0
    capsys.readouterr()
    applied = tmp_path / "applied"
    updates = str(out / "updates.safetensors")
    assert cli.main(["apply", "--updates", updates, "--model", str(tiny_folder), "--out", str(applied)]) == 0
    printed = capsys.readouterr().out
    assert "1 updates (emmet) to 1 modules" in printed and REQUESTS[0]["subject"] in printed
    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for n, w in AutoModelForCausalLM.from_pretrained(applied).state_dict().items():
        assert torch.equal(w, edited[n]), n
    # The edited model already carries them: refused, nothing written.
    again = tmp_path / "again"
    assert cli.main(["apply", "--updates", updates, "--model", str(applied), "--out", str(again)]) == 2
    assert "already carries these updates" in capsys.readouterr().err
    assert not again.exists()
    assert cli.main(["apply", "--updates", str(tmp_path / "nope.safetensors"), "--out", str(again)]) == 2
    assert "cannot read updates file" in capsys.readouterr().err
    stamp = {p.name: p.stat().st_mtime_ns for p in tiny_folder.iterdir()}
    assert cli.main(["apply", "--updates", updates, "--model", str(tiny_folder), "--out", str(tiny_folder)]) == 2
    assert "would be overwritten" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in tiny_folder.iterdir()} == stamp
    # An edit made in bf16 is applied to the model loaded in bf16 unless told otherwise.
    assert cli.main(["edit", "--model", str(tiny_folder), "--requests", str(reqs), "--layers", "2", "--dtype",
                     "bfloat16", "--stats-tokens", "3000", "--preset", "llama", "--no-save-model",
                     "--out", str(tmp_path / "bf16")]) == 0
    bf16_updates = str(tmp_path / "bf16" / "updates.safetensors")
    assert cli.main(["apply", "--updates", bf16_updates, "--model", str(tiny_folder),
                     "--out", str(tmp_path / "applied-bf16")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "applied-bf16").dtype == torch.bfloat16
    capsys.readouterr()
    assert cli.main(["apply", "--updates", bf16_updates, "--model", str(tiny_folder), "--dtype", "float32",
                     "--out", str(tmp_path / "applied-fp32")]) == 2
    assert "not the ones these updates were computed on" in capsys.readouterr().err


def test_edit_command_uses_precomputed_statistics(tiny_folder, tmp_path, monkeypatch, capsys):
    """`pmsolve stats` then `pmsolve edit --stats DIR` edits exactly as collecting them in `edit`."""
    from pmsolve.editing import load_updates

    reqs = _two_requests(tmp_path, monkeypatch)
    stats_dir = tmp_path / "stats"
    assert cli.main(["stats", "--model", str(tiny_folder), "--layers", "2", "--max-tokens", "3000",
                     "--out", str(stats_dir), "--quiet"]) == 0
    common = ["edit", "--model", str(tiny_folder), "--requests", str(reqs), "--layers", "2", "--method", "emmet",
              "--preset", "llama", "--no-save-model"]
    capsys.readouterr()
    assert cli.main(common + ["--stats", str(stats_dir), "--out", str(tmp_path / "a")]) == 0
    assert f"from {stats_dir}" in capsys.readouterr().err
    assert cli.main(common + ["--stats-tokens", "3000", "--out", str(tmp_path / "b")]) == 0
    (a,), _ = load_updates(tmp_path / "a" / "updates.safetensors")
    (b,), _ = load_updates(tmp_path / "b" / "updates.safetensors")
    assert torch.equal(a["U"], b["U"]) and torch.equal(a["B"], b["B"])
    assert cli.main(common + ["--stats", str(tmp_path / "a"), "--out", str(tmp_path / "c")]) == 2
    assert "expected one file named model.layers.2.mlp.down_proj" in capsys.readouterr().err

    # the library takes the same folder as a path: the same update as the command's
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny_folder)
    res = pmsolve.edit(m, AutoTokenizer.from_pretrained(tiny_folder), str(reqs), method="emmet", layers=[2],
                       stats=str(stats_dir), preset="llama")
    assert torch.equal(res.edits[0].update.U.to(a["U"].dtype), a["U"])
    assert torch.equal(res.edits[0].update.B.to(a["B"].dtype), a["B"])


def test_interrupted_edit_command_resumes(tiny_folder, tmp_path, monkeypatch, capsys):
    """Killed during its second batch, `pmsolve edit` leaves a checkpoint in --out; the same
    command again does the second batch only and writes what an uninterrupted run writes."""
    import pmsolve.editing.editor as editor
    from pmsolve.editing import load_updates

    reqs = _two_requests(tmp_path, monkeypatch)
    common = ["edit", "--model", str(tiny_folder), "--requests", str(reqs), "--layers", "2", "--method", "emmet",
              "--batch-size", "1", "--stats-tokens", "3000", "--preset", "llama", "--no-save-model"]
    assert cli.main(common + ["--out", str(tmp_path / "whole")]) == 0
    real, calls = editor._edit_batch, []

    def dies_in_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(editor, "_edit_batch", dies_in_the_second_batch)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(common + ["--out", str(out)]) == 130  # as a shell reports Ctrl-C
    err = capsys.readouterr().err
    assert "run the same command again" in err and "pmsolve edit: interrupted" in err
    assert [p.name for p in (out / "edit-checkpoint").iterdir()] == ["batch-000000.safetensors"]
    assert not (out / "updates.safetensors").exists()
    monkeypatch.setattr(editor, "_edit_batch", real)
    assert cli.main(common + ["--out", str(out)]) == 0
    assert "(1 from an interrupted run's checkpoint)" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["resumed_requests"] == 1
    assert not (out / "edit-checkpoint").exists()
    got, _ = load_updates(out / "updates.safetensors")
    want, _ = load_updates(tmp_path / "whole" / "updates.safetensors")
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert torch.equal(g["U"], w["U"]) and torch.equal(g["B"], w["B"])


@pytest.mark.parametrize("argv, option", [
    (["stats", "--layers", "2", "--max-tokens", "0", "--out", "x"], "--max-tokens"),
    (["stats", "--layers", "two", "--out", "x"], "--layers"),
    (["edit", "--requests", "r.json", "--out", "x", "--batch-size", "-1"], "--batch-size"),
    (["edit", "--requests", "r.json", "--out", "x", "--preserve-edits", "-1"], "--preserve-edits"),
    (["edit", "--requests", "r.json", "--out", "x", "--preserve-edits", "inf"], "--preserve-edits"),
    (["eval", "--out", "x", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["profile", "--d-in", "-5"], "--d-in"),
    (["demo", "--facts", "0"], "--facts"),
    (["experiments", "--facts", "1.5"], "--facts"),
])
def test_bad_numbers_are_refused_before_any_model_loads(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and ("positive integer" in err or "≥ 0" in err or "layers must" in err)


def test_apply_command_composes_sequential_edits_in_their_order(tiny_folder, tmp_path, monkeypatch, capsys):
    """Edit 1 on the model, edit 2 on edit 1's result: both files applied to the unedited model,
    in that order, give edit 2's model; the other order is refused, nothing written."""
    reqs = _two_requests(tmp_path, monkeypatch)
    first, second = tmp_path / "r1.jsonl", tmp_path / "r2.jsonl"
    lines = reqs.read_text().splitlines()
    first.write_text(lines[0])
    second.write_text(lines[1])
    common = ["--layers", "2", "--method", "emmet", "--stats-tokens", "3000", "--preset", "llama"]
    assert cli.main(["edit", "--model", str(tiny_folder), "--requests", str(first), "--out", str(tmp_path / "e1"),
                     *common]) == 0
    assert cli.main(["edit", "--model", str(tmp_path / "e1" / "model"), "--requests", str(second),
                     "--out", str(tmp_path / "e2"), *common]) == 0
    u1, u2 = str(tmp_path / "e1" / "updates.safetensors"), str(tmp_path / "e2" / "updates.safetensors")
    capsys.readouterr()
    assert cli.main(["apply", "--updates", u1, u2, "--model", str(tiny_folder), "--out", str(tmp_path / "both")]) == 0
    assert "2 facts" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    want = AutoModelForCausalLM.from_pretrained(tmp_path / "e2" / "model").state_dict()
    for n, w in AutoModelForCausalLM.from_pretrained(tmp_path / "both").state_dict().items():
        assert torch.equal(w, want[n]), n
    assert cli.main(["apply", "--updates", u2, u1, "--model", str(tiny_folder), "--out", str(tmp_path / "bad")]) == 2
    assert "not the ones these updates were computed on" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_edit_command_reports_bad_requests(tiny_folder, tmp_path, capsys):
    reqs = tmp_path / "bad.json"
    reqs.write_text(json.dumps([{"prompt": "no slot", "subject": "X", "target_new": "Y"}]))
    rc = cli.main(["edit", "--model", str(tiny_folder), "--requests", str(reqs), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "request 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_edit_command_key_options(tiny_folder, tmp_path, monkeypatch):
    reqs = _two_requests(tmp_path, monkeypatch)
    out = tmp_path / "out"
    rc = cli.main(["edit", "--model", str(tiny_folder), "--requests", str(reqs), "--layers", "2",
                   "--distribution", "single", "--method", "emmet", "--stats-tokens", "3000", "--preset", "llama",
                   "--key-source", "both", "--preserve-prompts", "2", "--values", '{"clamp": 0.3}',
                   "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["key_source"] == "both" and report["preserve_prompts"] == 2.0
    # --values overrides the preset's v* settings one by one; the others stay the preset's
    from pmsolve.editing import load_preset

    assert report["value_config"] == {**asdict(load_preset("llama").values), "clamp": 0.3}
    (e,) = report["edits"]
    assert e["solve_n"] == 4  # two columns per fact


def test_edit_state_appends_across_runs_and_undo_takes_batches_back(tiny_folder, tmp_path, monkeypatch, capsys):
    """`pmsolve edit --state DIR`: each run reloads the unedited model from disk, reopens the editor
    (its batches re-applied), appends; --undo K gives back exactly the earlier run's model."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PMSOLVE_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "r1.jsonl", tmp_path / "r2.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in REQUESTS[:2]))
    second.write_text(json.dumps(REQUESTS[2]))
    state = tmp_path / "state"
    common = ["--model", str(tiny_folder), "--layers", "1-2", "--stats-tokens", "3000", "--preset", "llama",
              "--state", str(state)]
    assert cli.main(["edit", *common, "--method", "alphaedit", "--requests", str(first), "--batch-size", "1",
                     "--out", str(tmp_path / "o1")]) == 0
    r1 = json.loads((tmp_path / "o1" / "report.json").read_text())
    assert r1["method"] == "alphaedit" and r1["state"]["batches"] == 2
    assert r1["state"]["layer_states"]["1"]["earlier_keys"] == 2  # one key per request
    assert cli.main(["edit", *common, "--requests", str(second), "--out", str(tmp_path / "o2")]) == 0
    out = capsys.readouterr()
    assert "reopened the editor" in out.err and "alphaedit (retention soft)" in out.out
    r2 = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert r2["method"] == "alphaedit" and r2["state"]["batches"] == 3 and r2["state"]["requests"] == 3
    assert len(r2["edits"]) == 2  # this run's batch at two layers; the report is of this run

    assert cli.main(["edit", *common, "--undo", "1", "--out", str(tmp_path / "o3")]) == 0
    o1 = AutoModelForCausalLM.from_pretrained(tmp_path / "o1" / "model").state_dict()
    o2 = AutoModelForCausalLM.from_pretrained(tmp_path / "o2" / "model").state_dict()
    o3 = AutoModelForCausalLM.from_pretrained(tmp_path / "o3" / "model").state_dict()
    assert any(not torch.equal(o2[n], o1[n]) for n in o1)
    assert all(torch.equal(o3[n], o1[n]) for n in o1)
    capsys.readouterr()

    assert cli.main(["edit", *common, "--method", "memit", "--requests", str(second), "--out", str(tmp_path / "x")]) == 2
    assert "settings are fixed: drop --method memit" in capsys.readouterr().err
    assert cli.main(["edit", *common, "--mu", "3", "--requests", str(second), "--out", str(tmp_path / "x")]) == 2
    assert "drop --mu" in capsys.readouterr().err
    assert cli.main(["edit", "--model", str(tiny_folder), "--undo", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--undo takes batches back from a persistent editor" in capsys.readouterr().err
    assert cli.main(["edit", "--model", str(tiny_folder), "--out", str(tmp_path / "x")]) == 2
    assert "--requests is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
