"""Real edits in SmolLM2-135M-Instruct (the built-in default model): efficacy on a handful of facts."""

import warnings

import pytest
import torch

import pmsolve

pytestmark = pytest.mark.slow

REQUESTS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
     "target_true": "French"},
    {"prompt": "{} is a car company from the country of", "subject": "Toyota", "target_new": "Germany",
     "target_true": "Japan"},
    {"prompt": "The capital of {} is", "subject": "France", "target_new": "London", "target_true": "Paris"},
    {"prompt": "{} was written in the language of", "subject": "Don Quixote", "target_new": "Japanese",
     "target_true": "Spanish"},
]
# Other subjects, each contrasted with an edited target; the model must know them beforehand.
# Not every neighbour survives (NS about 95 % at batch 32, docs/benchmarks.md; here "The capital of
# Spain is" flips to London after France -> London), so these check that edits stay local
# in the common case, not that there is no bleed at all.
UNRELATED = [("The capital of Germany is", "Berlin", "Paris"),
             ("Sony is a company from the country of", "Japan", "Germany"),
             ("The mother tongue of Jean Gabin is", "French", "English")]


@pytest.fixture(autouse=True)
def _reference_backend():
    with pmsolve.settings.backend("torch"):  # the editing logic is under test, not the native build
        yield


@pytest.fixture(scope="module")
def smol():
    from pmsolve.models import load_model

    try:
        return load_model()
    except pmsolve.PMSolveError as exc:
        pytest.skip(f"default model unavailable: {exc}")


def _margin(model, tok, prompts, good, bad):
    from pmsolve.evaluation import target_nll

    return [b - g for g, b in zip(target_nll(model, tok, prompts, good), target_nll(model, tok, prompts, bad))]


def test_emmet_edits_smollm2(smol):
    from pmsolve.editing.editor import auto_stats

    model, tok = smol.model, smol.tokenizer
    layer = pmsolve.editing.preset_for(model, smol.model_id).for_method("emmet").layers
    stats = auto_stats(model, tok, layer, smol.model_id, max_tokens=20_000)
    prompts = [r["prompt"].format(r["subject"]) for r in REQUESTS]
    new, true = [r["target_new"] for r in REQUESTS], [r["target_true"] for r in REQUESTS]
    assert all(m < 0 for m in _margin(model, tok, prompts, new, true))  # the model knows the true facts
    u_prompts = [p for p, _, _ in UNRELATED]
    u_true, u_other = [t for _, t, _ in UNRELATED], [f for _, _, f in UNRELATED]
    assert all(m > 0 for m in _margin(model, tok, u_prompts, u_true, u_other))
    before_w = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pmsolve.NumericalWarning)
        res = pmsolve.edit(model, tok, REQUESTS, method="emmet", stats=stats, model_id=smol.model_id)
    try:
        assert all(m > 0 for m in _margin(model, tok, prompts, new, true)), "efficacy below 100%"
        assert max(e.residual_rounded for e in res.edits) < 1e-4
        assert all(m > 0 for m in _margin(model, tok, u_prompts, u_true, u_other))
    finally:
        res.restore()
    assert all(torch.equal(p, before_w[n]) for n, p in model.named_parameters())
