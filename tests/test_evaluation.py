"""Record loaders, metric identities on a tiny random model, and the unedited SmolLM2 baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pmsolve.errors import InputError
from pmsolve.evaluation import (
    EditRecord,
    Neighbor,
    RecordError,
    evaluate_records,
    generate_greedy,
    generate_sampled,
    harmonic_score,
    load_builtin_facts,
    load_records,
    ngram_entropy,
    score_targets,
    target_nll,
)

# --- loaders (made-up records) -------------------------------------------------------------

BUILTIN = {"id": 7, "relation": "pet_of", "prompt": "The pet of {} is a", "subject": "Ada Quill",
           "target_true": "cat", "target_new": "parrot",
           "paraphrase_prompts": ["Ada Quill owns a", "Ada Quill's pet is a"],
           "neighborhood_prompts": [{"prompt": "The pet of Bo Lark is a", "target": "dog"}],
           "generation_prompts": ["Ada Quill likes"]}
COUNTERFACT = {"case_id": 3,
               "requested_rewrite": {"prompt": "{} was made in", "subject": "The Zorb 9",
                                     "target_new": {"str": "Peru", "id": "x"},
                                     "target_true": {"str": "Chad", "id": "y"},
                                     "relation_id": "made_in"},
               "paraphrase_prompts": ["Factories of The Zorb 9 are in"],
               "neighborhood_prompts": ["The Zorb 8 was made in", "The Flim was made in"],
               "generation_prompts": ["The Zorb 9 is"]}
FLAT = {"prompt": "The mayor of Tinytown is", "subject": "Tinytown", "target_new": "Ola Ray",
        "ground_truth": "Ed Bell", "rephrase_prompt": "Tinytown's mayor is",
        "locality_prompt": ["The mayor of Bigville is"], "locality_ground_truth": ["Ann Cole"]}
ZSRE = {"subject": "Glimmer River", "src": "Which sea does Glimmer River flow into?",
        "alt": "Red Sea", "answers": ["Black Sea"], "rephrase": "Glimmer River empties into which sea?",
        "loc": "nq question: who wrote the song blue moon", "loc_ans": "Rodgers"}


def test_each_format_maps_to_one_record():
    b, c, f, z = load_records([BUILTIN, COUNTERFACT, FLAT, ZSRE])
    assert (b.prompt, b.subject, b.target_true, b.case_id) == ("The pet of {} is a", "Ada Quill", "cat", 7)
    assert b.neighborhood_prompts == [Neighbor("The pet of Bo Lark is a", "dog")]
    assert c.rewrite_prompt == "The Zorb 9 was made in"
    assert (c.target_new, c.target_true, c.relation) == ("Peru", "Chad", "made_in")
    # CounterFact neighbours share the true object.
    assert [n.target for n in c.neighborhood_prompts] == ["Chad", "Chad"]
    assert f.prompt == "The mayor of {} is" and f.paraphrase_prompts == ["Tinytown's mayor is"]
    assert f.neighborhood_prompts == [Neighbor("The mayor of Bigville is", "Ann Cole")]
    assert z.prompt == "Which sea does {} flow into?"
    assert (z.target_new, z.target_true) == ("Red Sea", "Black Sea")
    assert z.as_request() == {"prompt": "Which sea does {} flow into?", "subject": "Glimmer River",
                              "target_new": "Red Sea", "target_true": "Black Sea"}


@pytest.mark.parametrize("broken, reason", [
    ({**FLAT, "subject": "Nowhere"}, "does not occur"),
    ({**BUILTIN, "target_new": "  "}, "target_new"),
    ({**BUILTIN, "target_new": "cat"}, "equals target_true"),
    ({k: v for k, v in ZSRE.items() if k != "subject"}, "subject"),
    ({**COUNTERFACT, "requested_rewrite": "oops"}, "requested_rewrite"),
    ("not an object", "JSON object"),
])
def test_malformed_records_raise_with_index_or_are_skipped(broken, reason):
    data = [BUILTIN, FLAT, broken, ZSRE]
    with pytest.raises(RecordError, match=reason) as info:
        load_records(data)
    assert info.value.index == 2 and "record 2" in str(info.value)
    with pytest.warns(UserWarning, match="record 2"):
        kept = load_records(data, on_error="skip")
    assert [r.subject for r in kept] == ["Ada Quill", "Tinytown", "Glimmer River"]


def test_files_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([BUILTIN, COUNTERFACT]))
    assert len(load_records(tmp_path / "a.json")) == 2
    (tmp_path / "b.jsonl").write_text(json.dumps(FLAT) + "\n{broken\n" + json.dumps(ZSRE) + "\n")
    with pytest.raises(RecordError, match="line 2 is not valid JSON") as info:
        load_records(tmp_path / "b.jsonl")
    assert info.value.index == 1
    with pytest.warns(UserWarning):
        assert len(load_records(tmp_path / "b.jsonl", on_error="skip")) == 2
    with pytest.raises(InputError, match="unknown record format"):
        load_records([BUILTIN], fmt="csv")
    with pytest.raises(InputError, match="cannot read"):
        load_records(tmp_path / "missing.jsonl")


def test_builtin_facts_are_complete():
    facts = load_builtin_facts()
    assert len(facts) >= 100
    assert len({r.relation for r in facts}) >= 10
    for r in facts:
        assert r.prompt.count("{}") == 1 and r.target_true and r.target_new != r.target_true
        assert len(r.paraphrase_prompts) == 2 and len(r.generation_prompts) == 2
        assert len(r.neighborhood_prompts) == 5
    assert [r.subject for r in load_builtin_facts(limit=3)] == [r.subject for r in facts[:3]]
    # Round-robin order: a small prefix already mixes relations.
    assert len({r.relation for r in facts[:10]}) == 10
    capitals = load_builtin_facts(relations=["capital_of"])
    assert capitals and {r.relation for r in capitals} == {"capital_of"}


# --- metric identities on a tiny random model --------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pmsolve.models.loading import ensure_default_converted

    tok = AutoTokenizer.from_pretrained(ensure_default_converted())
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval(), tok


def _direct_nll(model, tok, prompt, target):
    """Unbatched, unpadded reference: one sequence, log-softmax read off by hand."""
    p = tok(prompt).input_ids
    t = tok(" " + target, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0], -1)
    return -sum(logp[len(p) - 1 + j, tid].item() for j, tid in enumerate(t)) / len(t)


PROMPTS = ["The capital of France is", "A", "Toyota is a car company from the country of",
           "x y", "The mother tongue of Danielle Darrieux is"]
TARGETS = ["Paris", "New York City", "Japan", "b", "French"]


def test_target_nll_matches_direct_computation(tiny):
    model, tok = tiny
    for bs in (1, 2, 5):  # padding and batch composition must not change scores
        got = target_nll(model, tok, PROMPTS, TARGETS, batch_size=bs)
        want = [_direct_nll(model, tok, p, t) for p, t in zip(PROMPTS, TARGETS)]
        assert got == pytest.approx(want, abs=1e-5)
    # A target given with its own leading space scores the same.
    assert target_nll(model, tok, ["A"], [" b"]) == pytest.approx(target_nll(model, tok, ["A"], ["b"]))


def test_evaluate_records_equals_direct_metrics(tiny):
    model, tok = tiny
    recs = [EditRecord(prompt="The capital of {} is", subject=s, target_new=new, target_true=true,
                       paraphrase_prompts=[f"{s}'s capital is", f"In {s}, the capital is"],
                       neighborhood_prompts=[Neighbor("The capital of Peru is", "Lima"),
                                             Neighbor("The capital of Chad is", "N'Djamena")])
            for s, true, new in [("France", "Paris", "Rome"), ("Spain", "Madrid", "Oslo"),
                                 ("Japan", "Tokyo", "Lima")]]
    report = evaluate_records(model, tok, recs, batch_size=4)

    def nll(p, t):
        return _direct_nll(model, tok, p, t)

    es = [float(nll(r.rewrite_prompt, r.target_new) < nll(r.rewrite_prompt, r.target_true)) for r in recs]
    ps = [sum(nll(p, r.target_new) < nll(p, r.target_true) for p in r.paraphrase_prompts) / 2 for r in recs]
    ns = [sum(nll(n.prompt, n.target) < nll(n.prompt, r.target_new) for n in r.neighborhood_prompts) / 2
          for r in recs]
    mag = [math.exp(-nll(r.rewrite_prompt, r.target_new)) - math.exp(-nll(r.rewrite_prompt, r.target_true))
           for r in recs]
    assert [x["efficacy"] for x in report.records] == es
    assert [x["paraphrase_success"] for x in report.records] == ps
    assert [x["neighborhood_success"] for x in report.records] == ns
    assert [x["efficacy_magnitude"] for x in report.records] == pytest.approx(mag, abs=1e-6)
    agg = report.aggregate
    assert agg["es"] == pytest.approx(sum(es) / 3) and agg["ns"] == pytest.approx(sum(ns) / 3)
    assert agg["score"] == harmonic_score(agg["es"], agg["ps"], agg["ns"])
    json.dumps(report.to_dict())  # serialisable as is


def test_records_without_true_target_still_get_neighbourhood_scores(tiny):
    model, tok = tiny
    rec = EditRecord(prompt="{} lives in", subject="Ada", target_new="Oslo",
                     neighborhood_prompts=[Neighbor("Bo lives in", "Rome")])
    report = evaluate_records(model, tok, [rec])
    (row,) = report.records
    assert row["efficacy"] is None and report.aggregate["es"] is None
    assert report.aggregate["score"] is None
    want = float(_direct_nll(model, tok, "Bo lives in", "Rome") < _direct_nll(model, tok, "Bo lives in", "Oslo"))
    assert row["neighborhood_success"] == want


def test_top1_accuracy_matches_argmax(tiny):
    model, tok = tiny
    (score,) = score_targets(model, tok, ["The capital of France is"], ["Paris"])
    p = tok("The capital of France is").input_ids
    t = tok(" Paris", add_special_tokens=False).input_ids
    with torch.no_grad():
        pred = model(torch.tensor([p + t])).logits[0].argmax(-1)
    want = sum(pred[len(p) - 1 + j].item() == tid for j, tid in enumerate(t)) / len(t)
    assert score.top1 == pytest.approx(want)


def test_harmonic_score():
    assert harmonic_score(1, 1, 1) == pytest.approx(100)
    assert harmonic_score(0.5, 1, 1) == pytest.approx(100 * 3 / 4)
    assert harmonic_score(0, 1, 1) == 0
    assert harmonic_score(None, 1, 1) is None


def test_ngram_entropy_of_known_sequences():
    # "a b c d a b c d": bigrams ab,bc,cd x2 and da x1; trigrams abc,bcd x2 and cda,dab x1.
    h2 = 3 * (2 / 7) * math.log2(7 / 2) + (1 / 7) * math.log2(7)
    h3 = 2 * (1 / 3) * math.log2(3) + 2 * (1 / 6) * math.log2(6)
    assert ngram_entropy("a b c d a b c d") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("la la la la la") == 0.0  # pure repetition: no information
    # Punctuation marks are words: 3 distinct bigrams, 2 distinct trigrams.
    assert ngram_entropy("one, two.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1) / 2)


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = ["The capital of France is", "Hi", "Toyota is a car company from the country of"]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=8, batch_size=3)
    single = [generate_greedy(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert all(b.startswith(p) for b, p in zip(batched, prompts))


def test_sampled_generation_is_seeded_per_prompt_and_top1_is_greedy(tiny):
    model, tok = tiny
    prompts = ["The capital of France is", "Hi", "Toyota is a car company from the country of"]
    state = torch.random.get_rng_state()
    a = generate_sampled(model, tok, prompts, max_new_tokens=12, top_k=5, seed=3, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert a == generate_sampled(model, tok, prompts, max_new_tokens=12, top_k=5, seed=3, batch_size=2)
    others = [generate_sampled(model, tok, prompts, max_new_tokens=12, top_k=5, seed=s, batch_size=2) for s in (4, 5)]
    assert any(o != a for o in others)  # the seed matters (three draws of 36 tokens from 5 each)
    # Each prompt's random numbers are its own: batching does not change its sample.
    assert [generate_sampled(model, tok, [p], max_new_tokens=12, top_k=5, seed=3)[0] for p in prompts] == a
    # Sampling from the single most likely token is greedy decoding.
    assert generate_sampled(model, tok, prompts, max_new_tokens=12, top_k=1) == generate_greedy(
        model, tok, prompts, max_new_tokens=12)
    assert all(t.startswith(p) for t, p in zip(a, prompts))
    with pytest.raises(InputError, match="top_k"):
        generate_sampled(model, tok, prompts, top_k=0)


def test_seeded_top_k_draws_from_the_softmax_of_the_top_k():
    """Gumbel-max identity: argmax(logit + Gumbel noise) over the top k is a draw from their softmax."""
    from pmsolve.evaluation.metrics import _SeededTopK

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    n = 4000
    picks = torch.tensor([int(_SeededTopK(3, [r])(None, logits).argmax()) for r in range(n)])
    p = torch.softmax(torch.tensor([3.0, 2.0, 1.0]), 0)
    for token, prob in zip((5, 0, 1), p.tolist()):
        freq = float((picks == token).double().mean())
        assert abs(freq - prob) <= 4 * math.sqrt(prob * (1 - prob) / n), (token, freq, prob)
    assert set(picks.tolist()) <= {5, 0, 1}  # never outside the top 3


# --- the real model -----------------------------------------------------------------------

def test_unedited_smollm_prefers_true_targets():
    from pmsolve.models import load_model

    model, tok = load_model()
    report = evaluate_records(model, tok, load_builtin_facts(limit=20))
    agg = report.aggregate
    assert agg["n_records"] == 20
    assert agg["es"] <= 0.05 and agg["ps"] <= 0.05
    assert agg["ns"] >= 0.95
