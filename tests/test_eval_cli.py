"""`pmsolve eval` on a tiny random Llama (SmolLM2's tokenizer) with made-up records:
outputs, malformed records, baseline cache, partial results after a crash and resume."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import pmsolve
from pmsolve.cli import main
from pmsolve.evaluation import pipeline


def _rec(subject, true, new, neighbour, n_true):
    return {"prompt": "The favourite colour of {} is", "subject": subject, "target_true": true, "target_new": new,
            "paraphrase_prompts": [f"{subject} likes the colour"],
            "neighborhood_prompts": [{"prompt": f"The favourite colour of {neighbour} is", "target": n_true}],
            "generation_prompts": [f"{subject} is"]}


RECORDS = [
    _rec("Ada Quill", "red", "blue", "Bo Lark", "green"),
    _rec("Cy Moss", "green", "red", "Ada Quill", "red"),
    {**_rec("Dee Fern", "blue", "green", "Cy Moss", "green"), "prompt": "The favourite colour of Eve Pine is"},
    _rec("Fay Reed", "black", "white", "Dee Fern", "blue"),
    {**_rec("Gus Oak", "white", "black", "Fay Reed", "black"), "target_new": ""},
    _rec("Hal Ivy", "pink", "grey", "Gus Oak", "white"),
]
BAD = {2: "does not occur", 4: "target_new"}
TEXT = "The sky is blue and the grass is green. Ada likes red; Cy likes blue. " * 40


@pytest.fixture(autouse=True)
def _torch_backend():
    with warnings.catch_warnings(), pmsolve.settings.backend("torch"):
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pmsolve.models.loading import ensure_default_converted

    root = tmp_path_factory.mktemp("evalcli")
    tok = AutoTokenizer.from_pretrained(ensure_default_converted())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    (root / "corpus.txt").write_text(TEXT)
    return root


def _args(files, out, *extra):
    return ["eval", "--model", str(files / "model"), "--data", str(files / "data.jsonl"), "--layers", "1",
            "--batch-size", "2", "--stats-tokens", "500", "--corpus", str(files / "corpus.txt"),
            "--max-new-tokens", "4", "--cache-dir", str(files / "cache"), "--out", str(out), *extra]


def _lines(out):
    return [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]


def test_malformed_records_reported_with_index_and_rejected(files, tmp_path, capsys):
    assert main(_args(files, tmp_path / "r")) == 2  # --on-error raise is the default
    errors = json.loads((tmp_path / "r" / "errors.json").read_text())["malformed"]
    assert {e["index"]: e["error"] for e in errors}.keys() == BAD.keys()
    for e in errors:
        assert BAD[e["index"]] in e["error"]
    assert "record 2" in capsys.readouterr().err
    assert not (tmp_path / "r" / "records.jsonl").exists()  # rejected before any model work


def test_run_skip_malformed_then_baseline_cache_hit(files, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(_args(files, out, "--on-error", "skip")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["n_records"] == 4 and summary["n_malformed"] == 2
    lines = _lines(out)
    assert [ln["index"] for ln in lines] == [0, 1, 3, 5]
    assert [ln["batch"] for ln in lines] == [0, 0, 1, 1]
    for ln in lines:
        for when in ("pre", "post"):
            assert ln[when]["efficacy"] in (0.0, 1.0) and ln[when]["fluency"] >= 0
    es = [ln["post"]["efficacy"] for ln in lines]
    assert summary["post"]["efficacy"] == pytest.approx(sum(es) / 4)
    first = [ln["edit"] for ln in lines if ln["edit"]]
    assert len(first) == 2 and all(e["layers"][0]["layer"] == 1 for e in first)
    assert "baseline: computed" in capsys.readouterr().err
    (cached,) = (files / "cache" / "eval-baselines").glob("*.json")
    stamp = cached.stat().st_mtime_ns
    assert main(_args(files, tmp_path / "b", "--on-error", "skip", "--limit", "3")) == 0
    assert "baseline: cache hit" not in capsys.readouterr().err  # other records: another key
    assert main(_args(files, tmp_path / "c", "--on-error", "skip")) == 0
    assert "baseline: cache hit" in capsys.readouterr().err
    assert cached.stat().st_mtime_ns == stamp
    again = _lines(tmp_path / "c")
    assert [ln["pre"] for ln in again] == [ln["pre"] for ln in lines]
    # The statistics that run collected, given back with --stats: the same edits, the same scores.
    assert main(_args(files, tmp_path / "d", "--on-error", "skip", "--stats", str(files / "cache" / "stats"))) == 0
    assert [ln["post"] for ln in _lines(tmp_path / "d")] == [ln["post"] for ln in lines]


def test_crash_keeps_partial_results_and_rerun_resumes(files, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    real = pipeline.edit_and_score
    calls = []

    def dies_on_second_batch(model, tok, batch, factors, settings):
        calls.append([i for i, _ in batch])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a killed long run looks like from inside
        return real(model, tok, batch, factors, settings)

    monkeypatch.setattr(pipeline, "edit_and_score", dies_on_second_batch)
    assert main(_args(files, out, "--on-error", "skip")) == 130  # Ctrl-C: status 130, no traceback
    assert [ln["index"] for ln in _lines(out)] == [0, 1]
    partial = json.loads((out / "summary.json").read_text())
    assert partial["complete"] is False and partial["n_records"] == 2

    calls.clear()
    monkeypatch.setattr(pipeline, "edit_and_score", lambda *a: (calls.append(1), real(*a))[1])
    assert main(_args(files, out, "--on-error", "skip")) == 0
    assert len(calls) == 1  # only the unfinished batch ran
    assert [ln["index"] for ln in _lines(out)] == [0, 1, 3, 5]
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_rerun_with_another_prompt_protocol_does_not_resume(files, tmp_path, monkeypatch):
    out = tmp_path / "proto"
    real = pipeline.edit_and_score
    calls = []
    monkeypatch.setattr(pipeline, "edit_and_score", lambda *a: (calls.append(1), real(*a))[1])
    assert main(_args(files, out, "--on-error", "skip")) == 0
    first = len(calls)
    assert main(_args(files, out, "--on-error", "skip")) == 0
    assert len(calls) == first  # same settings: everything resumed, nothing re-edited
    assert main(_args(files, out, "--on-error", "skip", "--document-start", "none")) == 0
    assert len(calls) == 2 * first  # prompts tokenized differently: a new run, not a resume
    assert json.loads((out / "run.json").read_text())["document_start"] is None


def test_failing_batch_skipped_and_reported(files, tmp_path, monkeypatch):
    real = pipeline.edit_and_score

    def conflict_in_first(model, tok, batch, factors, settings):
        if batch[0][0] == 0:
            raise pmsolve.ConflictingConstraintsError("made-up conflict", columns=[[0, 1]])
        return real(model, tok, batch, factors, settings)

    monkeypatch.setattr(pipeline, "edit_and_score", conflict_in_first)
    out = tmp_path / "f"
    assert main(_args(files, out, "--on-error", "skip")) == 1
    failed = json.loads((out / "errors.json").read_text())["failed_batches"]
    assert failed == [{"batch": 0, "indices": [0, 1], "error": "made-up conflict"}]
    assert [ln["index"] for ln in _lines(out)] == [3, 5]
    assert json.loads((out / "summary.json").read_text())["n_failed_records"] == 2


def test_profile_model_mode_fields(files, tmp_path):
    """`pmsolve profile --model` measures every stage on a real (tiny) model."""
    reqs = tmp_path / "reqs.json"
    reqs.write_text(json.dumps([{k: r[k] for k in ("prompt", "subject", "target_new", "target_true")}
                                for r in (RECORDS[0], RECORDS[1])]))
    out = tmp_path / "prof.json"
    assert main(["profile", "--model", str(files / "model"), "--layers", "0,1", "--requests", str(reqs),
                 "--tokens", "300", "--corpus", str(files / "corpus.txt"), "--json", str(out)]) == 0
    prof = json.loads(out.read_text())
    assert prof["mode"] == "model" and prof["dims"]["n"] == 2 and prof["dims"]["layers"] == [0, 1]
    stages = {s["name"]: s for s in prof["stages"]}
    assert list(stages) == ["statistics", "factorisation", "keys", "values", "solve", "apply"]
    assert all(s["seconds"] > 0 and s["peak_bytes"] >= 0 for s in stages.values())
    for layer in ("0", "1"):
        c = prof["conditioning"][layer]
        assert c["cond_C"] >= 1 and c["cond_G"] >= 1 and c["residual"] < 1e-6


def test_bad_batch_settings_rejected_before_work(files, tmp_path, capsys):
    assert main(_args(files, tmp_path / "x", "--method", "rome")) == 2  # ROME edits one fact per solve
    for option, value in (("--batch-size", "0"), ("--fluency-top-k", "-1")):  # refused by argparse: exit 2
        with pytest.raises(SystemExit) as exc:
            main(_args(files, tmp_path / "y", option, value))
        assert exc.value.code == 2 and f"argument {option}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_info_reports_backends_and_the_v_star_precision(capsys, tmp_path, monkeypatch):
    import json

    from pmsolve.cli import main
    from pmsolve.models.precision import bf16_cpu_feature, fast_bf16

    monkeypatch.setenv("PMSOLVE_CACHE", str(tmp_path))
    (tmp_path / "stats" / "m").mkdir(parents=True)
    (tmp_path / "stats" / "m" / "x.safetensors").write_bytes(b"0" * 2**20)
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache"] == {"path": str(tmp_path), "MiB": {"stats": 1.0}}
    assert "torch" in info["backends"]
    assert (info["cuda_backend"] == "available") == ("cuda" in info["backends"])
    assert info["cuda_backend"] == "available" or "backend 'cuda' unavailable" in info["cuda_backend"]
    feature = bf16_cpu_feature()
    assert fast_bf16(torch.device("cpu")) == (feature is not None)
    assert info["v_star_precision_cpu"] == (f"bf16 autocast ({feature})" if feature else "model dtype")
    assert info["stats_forward_cpu"] == info["v_star_precision_cpu"]
    assert info["cpu_solve"].startswith("native from 4 keys, torch below")  # tests/conftest.py pins 4
    if "cpu" in info["backends"]:  # the native module loaded, so OpenBLAS got our thread timeout (or the user's)
        assert info["openblas_thread_timeout"] is not None
        from pmsolve._native import native

        assert info["stats_bf16_kernel"] == native().bf16_gram_kernel()
        assert info["stats_bf16_kernel"] in ("amx", "avx512_bf16", "fp32")
        assert info["stats_f32_kernel"] == ("avx512" if native().f32_gram() else "ssyrk")
        mkl, avx512 = native().mkl_potrf(), native().f64_gemm()
        route = "MKL dpotrf from " if mkl else "recursive on pmsolve's AVX-512" if avx512 else "recursive on OpenBLAS"
        assert info["cpu_cholesky"].startswith(route)
        own = f"; on pmsolve's AVX-512 fp64 kernel from {native().F64_GEMM_SOLVE_MIN_KEYS} keys"
        assert info["cpu_solve"].endswith(own) == avx512
        assert info["openblas_env"]["OPENBLAS_CORETYPE"] == os.environ.get("OPENBLAS_CORETYPE")


@pytest.mark.parametrize(
    "forced, config, avx512, warned",
    [
        ("Haswell", "OpenBLAS 0.3.34 DYNAMIC_ARCH Haswell core=Haswell", True, True),  # AVX2 kernels, AVX-512 CPU
        ("Haswell", "OpenBLAS 0.3.34 DYNAMIC_ARCH Haswell core=Haswell", False, False),  # the CPU has no more
        ("SkylakeX", "OpenBLAS 0.3.34 DYNAMIC_ARCH SkylakeX core=SkylakeX", True, False),  # forced, but AVX-512
        (None, "OpenBLAS 0.3.34 DYNAMIC_ARCH Haswell core=Haswell", True, False),  # OpenBLAS's own choice
    ],
)
def test_info_warns_when_openblas_is_held_below_the_cpu(monkeypatch, forced, config, avx512, warned):
    from pmsolve.commands import info

    if forced is None:
        monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_CORETYPE", forced)
    monkeypatch.setattr(info, "_cpu_has_avx512", lambda: avx512)
    note = info._openblas_core_note(config)
    assert (note is not None) == warned
    if warned:
        assert f"OPENBLAS_CORETYPE={forced}" in note and "unset it" in note


def test_aggregate_means_score_and_fluency_change():
    """pipeline.aggregate against a hand computation: means skip missing values, Score is the
    harmonic mean ×100, the fluency change is relative to the pre-edit mean."""
    def line(pre_es, post_es, post_ns, flu_pre, flu_post):
        return {"pre": {"efficacy": pre_es, "paraphrase_success": 0.5, "neighborhood_success": 1.0,
                        "fluency": flu_pre},
                "post": {"efficacy": post_es, "paraphrase_success": 0.5, "neighborhood_success": post_ns,
                         "fluency": flu_post}}

    agg = pipeline.aggregate([line(0.0, 1.0, 1.0, 4.0, 3.0), line(0.0, 1.0, None, 6.0, 6.0)])
    assert agg["n_records"] == 2
    post = agg["post"]
    assert post["efficacy"] == 1.0 and post["neighborhood_success"] == 1.0  # None left out, not counted as 0
    assert post["score"] == pytest.approx(100 * 3 / (1 / 1.0 + 1 / 0.5 + 1 / 1.0))
    assert agg["pre"]["score"] == 0.0  # an efficacy of 0 makes the harmonic mean 0
    assert agg["fluency_change_relative"] == pytest.approx((4.5 - 5.0) / 5.0)


@pytest.mark.parametrize("bad, what", [({"batch_size": 0}, "batch_size"), ({"method": "rome", "batch_size": 2}, "ROME"),
                                       ({"on_error": "ignore"}, "on_error"), ({"fluency_top_k": 0}, "fluency_top_k")])
def test_eval_settings_are_checked(bad, what):
    with pytest.raises(pmsolve.InputError, match=what):
        pipeline.EvalSettings(layers=[1], **bad).check()


def test_pipeline_from_python_edits_scores_and_restores(files, tmp_path):
    """The library pipeline without the command line: statistics as a {layer: C} dict, results
    in the folder, the model unchanged afterwards, records with an index each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmsolve.stats import collect_stats

    model = AutoModelForCausalLM.from_pretrained(files / "model")
    tok = AutoTokenizer.from_pretrained(files / "model")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    indexed, malformed = pipeline.load_indexed(files / "data.jsonl")
    assert [i for i, _ in indexed] == [0, 1, 3, 5] and [m["index"] for m in malformed] == [2, 4]
    C = collect_stats(model, tok, [1], str(files / "corpus.txt"), max_tokens=500, progress=False).stats[1].mean()
    settings = pipeline.EvalSettings(layers=[1], batch_size=2, max_new_tokens=4, edit_options={"preset": None})
    summary = pipeline.evaluate_edits(model, tok, indexed, {1: C}, settings, tmp_path / "run", malformed=malformed,
                                      cache_dir=tmp_path / "cache", progress=False, log=lambda msg: None)
    assert summary["complete"] and summary["n_records"] == 4 and summary["n_malformed"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    lines = _lines(tmp_path / "run")
    assert [ln["index"] for ln in lines] == [0, 1, 3, 5]
    assert summary["post"]["efficacy"] == pytest.approx(sum(ln["post"]["efficacy"] for ln in lines) / 4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
