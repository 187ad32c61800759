"""Tiny random models of each supported architecture, a word-level tokenizer, and
preservation statistics computed from a little text, for the editing tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from pmsolve.models.adapters import adapter_for

CORPUS = (
    "the capital of france is paris . the mother tongue of danielle darrieux is french . "
    "toyota is a car company from the country of japan . the eiffel tower is located in paris . "
    "a dog is an animal and a cat is an animal too . she speaks english and he speaks german . "
    "the river flows into the sea near the old city . because it rained we stayed at home . "
    "therefore the result is known . i think you know the answer . rome is in italy . "
    "berlin is the capital of germany . the piano was played by a famous musician from vienna . "
    "Danielle Darrieux Eiffel Tower Toyota English French Rome Japan Paris The I You Therefore Because is a"
)

REQUESTS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
     "target_true": "French"},
    {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome", "target_true": "Paris"},
    {"prompt": "{} is a car company from the country of", "subject": "Toyota", "target_new": "italy",
     "target_true": "Japan"},
]

ARCHS = ("gpt2", "gptj", "gpt_neox", "llama")
HIDDEN, LAYERS = 64, 4


def tokenizer() -> PreTrainedTokenizerFast:
    words = sorted(set(CORPUS.split()))
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def model(arch: str, vocab: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=vocab, n_positions=128,
                                       bos_token_id=0, eos_token_id=0))
    elif arch == "gptj":
        m = GPTJForCausalLM(GPTJConfig(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, rotary_dim=8, vocab_size=vocab,
                                       n_positions=128, bos_token_id=0, eos_token_id=0))
    elif arch == "gpt_neox":
        m = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                             intermediate_size=4 * HIDDEN, vocab_size=vocab,
                                             max_position_embeddings=128, bos_token_id=0, eos_token_id=0))
    elif arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                         max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=0, tie_word_embeddings=True))
    else:
        raise ValueError(arch)
    return m.to(dtype).eval()


@torch.no_grad()
def stats(m, tok, layers=range(LAYERS)) -> dict[int, torch.Tensor]:
    """C = mean of k kᵀ over the rewrite-module inputs of every corpus token, per layer."""
    ad = adapter_for(m)
    acc: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def hook(layer):
        return lambda mod, inp, out: acc[layer].append(inp[0].reshape(-1, inp[0].shape[-1]).double())

    handles = [ad.rewrite(layer).register_forward_hook(hook(layer)) for layer in layers]
    ids = tok(CORPUS, return_tensors="pt").input_ids
    for shift in range(0, ids.shape[1], 7):  # several windows: more than d_in distinct keys
        m(ids[:, shift : shift + 48])
    for h in handles:
        h.remove()
    return {layer: (lambda k: k.T @ k / k.shape[0])(torch.cat(acc[layer])) for layer in layers}


def snapshot(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same_weights(m, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())
