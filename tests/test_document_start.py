"""The document-start token: what the tokenizer prepends, how caches tell protocols apart, and
(on SmolLM2) the effect it exists for."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from pmsolve.errors import InputError
from pmsolve.models import document_start, set_document_start
from pmsolve.models.document_start import document_start_tag, with_document_start

WORDS = ["Paris", "is", "the", "capital", "of", "France"]


def word_tokenizer(specials=("<|endoftext|>",), bos=None, adds_bos=False) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **{s: i + 1 for i, s in enumerate(specials)}}
    vocab.update({w: len(vocab) + i for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token=bos,
                                   additional_special_tokens=[s for s in specials if s != bos])


def ids(tok, text="Paris is the capital of", special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_auto_prefers_the_document_separator():
    tok = word_tokenizer(specials=("<s>", "<|endoftext|>"), bos="<s>")
    assert document_start(tok) is None
    assert set_document_start(tok) == "<|endoftext|>"
    assert ids(tok) == [2] + ids(tok, special=False)
    assert ids(tok, special=False) == [3, 4, 5, 6, 7]  # continuations (targets) stay bare
    assert tok.decode(ids(tok), skip_special_tokens=True) == "Paris is the capital of"
    assert document_start(tok) == "<|endoftext|>" and document_start_tag(tok) == "ds2"


def test_auto_falls_back_to_bos_then_to_nothing():
    tok = word_tokenizer(specials=("<s>",), bos="<s>")
    assert set_document_start(tok) == "<s>" and ids(tok)[0] == 1
    bare = word_tokenizer(specials=())
    before = ids(bare)
    assert set_document_start(bare) is None and ids(bare) == before and document_start_tag(bare) == ""


def test_auto_keeps_a_start_the_tokenizer_already_adds():
    tok = word_tokenizer(specials=("<s>", "<|endoftext|>"), bos="<s>", adds_bos=True)
    assert document_start(tok) == "<s>"
    assert set_document_start(tok) == "<s>" and ids(tok)[0] == 1
    # An explicit token replaces it (not added twice).
    assert set_document_start(tok, "<|endoftext|>") == "<|endoftext|>"
    assert ids(tok) == [2] + ids(tok, special=False)


def test_none_leaves_the_tokenizer_alone():
    tok = word_tokenizer()
    before = ids(tok)
    assert set_document_start(tok, None) is None and ids(tok) == before


def test_bad_tokens_and_tokenizers_are_refused():
    with pytest.raises(InputError, match="not a token"):
        set_document_start(word_tokenizer(), "<bos>")

    class NotFast:
        bos_token = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

        def get_vocab(self):
            return {"<|endoftext|>": 0}

    assert document_start(NotFast()) is None
    with pytest.raises(InputError, match="fast"):
        set_document_start(NotFast(), "<|endoftext|>")


def test_with_document_start_leaves_the_callers_tokenizer_alone():
    tok = word_tokenizer(specials=("<s>", "<|endoftext|>"), bos="<s>")
    before = ids(tok)
    own, start = with_document_start(tok)
    assert start == "<|endoftext|>" and own is not tok
    assert ids(own) == [2] + before and ids(tok) == before and document_start(tok) is None
    assert with_document_start(tok, None) == (tok, None)
    assert with_document_start(own) == (own, "<|endoftext|>")  # already starts that way: no copy
    other, start = with_document_start(own, "<s>")  # an explicit token replaces the start, on a copy
    assert start == "<s>" and ids(other)[0] == 1 and ids(own)[0] == 2


def test_with_document_start_on_a_tokenizer_that_cannot_take_one():
    class NotFast:
        bos_token = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

        def get_vocab(self):
            return {"<|endoftext|>": 0}

    slow = NotFast()
    with pytest.warns(UserWarning, match="without a document-start token"):
        assert with_document_start(slow) == (slow, None)
    with pytest.raises(InputError, match="fast"):
        with_document_start(slow, "<|endoftext|>")


def test_statistics_cache_keeps_protocols_apart(tmp_path):
    import editing_fixtures as fx

    from pmsolve.stats import collect_stats

    tok = fx.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    m = fx.model("gpt2", len(tok))
    corpus = tmp_path / "c.txt"
    corpus.write_text(fx.CORPUS)
    kw = dict(max_tokens=200, seq_len=64, cache_dir=tmp_path / "cache", model_id="tiny", progress=False)
    plain = collect_stats(m, tok, [1], str(corpus), **kw)
    set_document_start(tok)
    started = collect_stats(m, tok, [1], str(corpus), **kw)
    assert not started.from_cache  # not the file written for the other protocol
    assert plain.paths[1] != started.paths[1] and ".ds" in started.paths[1].name
    assert not torch.equal(plain.stats[1].mean(), started.stats[1].mean())
    assert collect_stats(m, tok, [1], str(corpus), **kw).from_cache


@pytest.mark.slow
def test_smollm2_subject_first_keys_match_keys_in_context():
    """Why the default exists: at position 0 a subject's key is unlike the same subject's key after
    context; with <|endoftext|> first, the bare-prompt key moves towards the in-context keys."""
    from pmsolve.editing.keys import capture, context_templates, pad_id, subject_prompt_ids
    from pmsolve.models import load_model
    from pmsolve.models.adapters import adapter_for

    lm = load_model(document_start=None)
    model, tok = lm.model, lm.tokenizer
    adapter, layer = adapter_for(model), 2
    prefixes = context_templates(model, tok)[1:]
    facts = [("{} is a car company from the country of", "Toyota"), ("{} is the capital of", "Paris"),
             ("{} was written by", "Hamlet"), ("{} plays the", "Yo-Yo Ma")]

    def similarity() -> float:
        sims = []
        for prompt, subject in facts:
            rows, lookup = zip(*(subject_prompt_ids(tok, t.replace("{}", prompt, 1), subject)
                                 for t in ["{}", *prefixes]))
            keys = capture(model, adapter, rows, lookup, pad_id(tok), key_layers=[layer]).keys[layer]
            sims.append(torch.nn.functional.cosine_similarity(keys[0], keys[1:].mean(0), dim=0).item())
        return sum(sims) / len(sims)

    shipped = similarity()
    set_document_start(tok)
    started = similarity()
    assert started > shipped + 0.1, (shipped, started)
