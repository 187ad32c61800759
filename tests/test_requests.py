"""Edit requests in pmsolve's template form and in EasyEdit's full-prompt form: one validator
(pmsolve.editing.requests) for pmsolve.edit, the evaluation loaders and the commands."""

from __future__ import annotations

import json

import pytest

from pmsolve import cli
from pmsolve.editing.requests import EditRequest, load_requests, subject_template, validate
from pmsolve.errors import InputError
from pmsolve.evaluation.records import RecordError, load_records

TEMPLATE = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
            "target_new": "English", "target_true": "French"}
EASYEDIT = {"prompts": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
            "ground_truth": "French", "target_new": "English"}
WANT = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")


@pytest.mark.parametrize("rec", [
    TEMPLATE,
    EASYEDIT,
    {**EASYEDIT, "prompts": [EASYEDIT["prompts"]]},  # EasyEdit's prompts as a list of one
    {"prompt": EASYEDIT["prompts"], "subject": "Danielle Darrieux", "ground_truth": "French",
     "target_new": {"str": "English"}},  # the flat CounterFact file's keys
    {"requested_rewrite": {**TEMPLATE, "target_new": {"str": "English"}, "target_true": {"str": "French"}}},
])
def test_both_forms_give_the_same_request(rec):
    (r,) = validate([rec])
    assert r == WANT
    assert r.text == "The mother tongue of Danielle Darrieux is"


def test_easyedit_parallel_lists_are_one_request_per_position(tmp_path):
    batch = {"prompts": ["The mother tongue of Danielle Darrieux is", "Toyota is a car company from"],
             "subject": ["Danielle Darrieux", "Toyota"], "ground_truth": ["French", "Japan"],
             "target_new": ["English", "Italy"]}
    reqs = validate(batch)
    assert reqs == [WANT, EditRequest("{} is a car company from", "Toyota", "Italy", "Japan")]
    f = tmp_path / "batch.json"
    f.write_text(json.dumps(batch))
    assert load_requests(f) == reqs
    with pytest.raises(InputError, match="one length"):
        validate({**batch, "target_new": ["English"]})


def test_the_subject_is_located_where_it_occurs():
    assert subject_template("What is the twin city of Lyon? It is", "Lyon") == "What is the twin city of {}? It is"
    assert subject_template("Lyon, a city in", "Lyon") == "{}, a city in"
    # Braces of the prompt's own stay as they are: the text is rebuilt by replacement, not format.
    (r,) = validate([{"prompt": "In {braces} Paris is the capital of", "subject": "Paris", "target_new": "Italy"}])
    assert r.prompt == "In {braces} {} is the capital of"
    assert r.text == "In {braces} Paris is the capital of"


@pytest.mark.parametrize("prompt, subject, match", [
    ("The mother tongue of Michel Rocard is", "Danielle Darrieux", "does not occur"),
    ("Paris is in France, and Paris is", "Paris", "occurs 2 times.*ambiguous"),
    ("The baaa is", "aa", "occurs 2 times.*ambiguous"),  # overlapping occurrences count
    ("{} and {} are", "X", "'{}' 2 times"),
])
def test_missing_or_ambiguous_subjects_are_refused_naming_the_request(prompt, subject, match):
    good = {**EASYEDIT}
    bad = {"prompt": prompt, "subject": subject, "target_new": "Y"}
    with pytest.raises(InputError, match=f"request 1: .*{match}"):
        validate([good, bad])


@pytest.mark.parametrize("rec, match", [
    ({**EASYEDIT, "prompts": ["a Danielle Darrieux", "b Danielle Darrieux"]}, "holds 2 prompts"),
    ({**EASYEDIT, "target_true": "German"}, "'target_true' .* and 'ground_truth' .* differ"),
    ({k: v for k, v in EASYEDIT.items() if k != "prompts"}, "'prompt' \\(or 'prompts'\\) is missing"),
    ({**EASYEDIT, "ground_truth": "English"}, "target_new equals target_true"),
])
def test_malformed_easyedit_requests(rec, match):
    with pytest.raises(InputError, match=f"request 0: .*{match}"):
        validate([rec])


def test_the_evaluation_loader_applies_the_same_rule():
    """A flat CounterFact record is accepted by the loader exactly when its request is by the editor,
    and refused with the editor's reason."""
    flat = {"prompt": "Paris is in France, and Paris is", "subject": "Paris", "target_new": "Rome",
            "ground_truth": "Paris", "rephrase_prompt": "x", "locality_prompt": "y", "locality_ground_truth": "z"}
    with pytest.raises(InputError) as from_editor:
        validate([flat])
    with pytest.raises(RecordError, match="record 0: .*ambiguous") as from_loader:
        load_records([flat], fmt="flat")
    assert str(from_editor.value).removeprefix("request 0: ") == str(from_loader.value).removeprefix("record 0: ")
    ok = {**flat, "prompt": "The twin city of Lyon is", "subject": "Lyon", "ground_truth": "Beirut"}
    (rec,) = load_records([ok], fmt="flat")
    assert rec.prompt == "The twin city of {} is" and rec.rewrite_prompt == ok["prompt"]
    assert validate([rec]) == validate([ok])


def test_the_edit_command_refuses_an_ambiguous_request_before_loading_a_model(tmp_path, capsys):
    reqs = tmp_path / "easyedit.json"
    reqs.write_text(json.dumps([EASYEDIT, {**EASYEDIT, "prompts": "Danielle Darrieux met Danielle Darrieux"}]))
    rc = cli.main(["edit", "--model", str(tmp_path / "no-such-model"), "--requests", str(reqs),
                   "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "request 1" in err and "ambiguous" in err
    assert not (tmp_path / "o").exists()
