"""Start every encoded text with a document-start token, as the model saw text in pretraining.

Tokenizers of GPT-2, Pythia, Qwen2 and SmolLM2 add no BOS: a prompt's first word then sits at
position 0, the attention-sink position, whose hidden states are unlike those of the same word
anywhere else. A fact whose prompt *starts* with the subject ("Paris is the capital of") then
gets a key at the subject that differs from the key of the same subject after any context, and
an edit computed from context-averaged keys reaches it only partly. Measured on SmolLM2-135M
(docs/history.md, "Editing quality"): with <|endoftext|> prepended, EMMET at batch 32 went from
ES 87.5 / PS 71.9 to ES 100 / PS 90.6 on the same facts.

Pretraining corpora of these models are documents joined by <|endoftext|>, so that token is
the natural start; the tokenizer's BOS is the fallback. The token is installed as the fast
tokenizer's post-processor, so ``tokenizer(text)`` (add_special_tokens=True) prepends it and
``add_special_tokens=False`` does not (target continuations stay bare). Decoding with
``skip_special_tokens=True`` drops it.
"""

from __future__ import annotations

import copy
import warnings

from ..errors import InputError

#: The separator between documents in GPT-2/NeoX/Qwen2/SmolLM2 pretraining data.
_SEPARATOR = "<|endoftext|>"
_PROBE = "Paris is"


def document_start(tokenizer) -> str | None:
    """The token ``tokenizer(text)`` puts before the text, or None when it adds none."""
    try:
        with_special = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
        bare = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    except (TypeError, KeyError):  # not a Hugging Face tokenizer: it adds nothing we can see
        return None
    extra = len(with_special) - len(bare)
    if extra <= 0 or with_special[extra:] != bare:
        return None
    return tokenizer.convert_ids_to_tokens(with_special[0])


def set_document_start(tokenizer, token: str | None = "auto") -> str | None:
    """Make ``tokenizer(text)`` start with ``token``; returns the token now in effect.

    ``"auto"``: keep what the tokenizer already prepends (Llama's BOS); otherwise use
    <|endoftext|> if the vocabulary has it, else the tokenizer's BOS, else nothing.
    ``None``: leave the tokenizer as it is (the reference implementations' protocol for
    GPT-2-style models). Any other string: that token, replacing the tokenizer's own start.
    The tokenizer is changed in place (and saved that way by ``save_pretrained``).
    """
    if token is None:
        return document_start(tokenizer)
    if token == "auto":
        current = document_start(tokenizer)
        if current is not None:
            return current
        token = _SEPARATOR if _token_id(tokenizer, _SEPARATOR) is not None else tokenizer.bos_token
        if token is None:
            return None
    token_id = _token_id(tokenizer, token)
    if token_id is None:
        raise InputError(f"document start {token!r} is not a token of this tokenizer")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"a document start needs a fast (tokenizers-backed) tokenizer; "
                         f"{type(tokenizer).__name__} is not one: pass document_start=None")
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A $B", special_tokens=[(token, token_id)])
    if document_start(tokenizer) != token:  # a tokenizer that ignores its post-processor
        raise InputError(f"{type(tokenizer).__name__} did not take the document start {token!r}")
    return token


def with_document_start(tokenizer, token: str | None = "auto"):
    """``(tokenizer', start)``: a tokenizer whose ``tokenizer'(text)`` starts with ``token`` (as
    :func:`set_document_start` would make it), and the token now in effect (None: nothing).

    The caller's tokenizer is never changed: when the start has to be installed, ``tokenizer'``
    is a deep copy (a fraction of a second for a 50k-token vocabulary) that carries it; when the
    tokenizer already starts texts that way, or ``token`` is None, it is returned as it is.
    With ``"auto"``, a tokenizer that cannot take a start token (not tokenizers-backed) is used
    as shipped, with a warning; an explicit token it cannot take raises InputError.
    """
    if token is None:
        return tokenizer, document_start(tokenizer)
    current = document_start(tokenizer)
    if current is not None and (token == "auto" or token == current):
        return tokenizer, current
    if token == "auto" and getattr(tokenizer, "backend_tokenizer", None) is None:
        warnings.warn(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer: prompts are "
                      "encoded without a document-start token (pass document_start=None to silence this)",
                      stacklevel=3)
        return tokenizer, None
    own = copy.deepcopy(tokenizer)
    return own, set_document_start(own, token)


def document_start_tag(tokenizer) -> str:
    """A short file-name tag for caches of tokenized text: '' when nothing is prepended."""
    token = document_start(tokenizer)
    if token is None:
        return ""
    return f"ds{tokenizer.convert_tokens_to_ids(token)}"


def _token_id(tokenizer, token: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(token)
