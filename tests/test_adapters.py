"""Adapters: per-architecture structure, layouts, tied embeddings, overrides and errors."""

import pytest
import torch
from torch import nn

from editing_fixtures import ARCHS, HIDDEN, LAYERS, model, tokenizer
from pmsolve.errors import InputError
from pmsolve.models.adapters import adapter_for

EXPECTED = {  # arch -> (rewrite template, layout, d_in)
    "gpt2": ("transformer.h.{}.mlp.c_proj", "in_out", 4 * HIDDEN),
    "gptj": ("transformer.h.{}.mlp.fc_out", "out_in", 4 * HIDDEN),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "out_in", 4 * HIDDEN),
    "llama": ("model.layers.{}.mlp.down_proj", "out_in", 2 * HIDDEN),
}


@pytest.fixture(scope="module")
def vocab():
    return len(tokenizer())


@pytest.mark.parametrize("arch", ARCHS)
def test_structure(arch, vocab):
    m = model(arch, vocab)
    ad = adapter_for(m)
    rewrite, layout, d_in = EXPECTED[arch]
    assert ad.num_layers == LAYERS
    assert ad.templates.rewrite == rewrite and ad.layout == layout
    assert (ad.d_in, ad.d_out) == (d_in, HIDDEN)
    w = ad.weight(LAYERS - 1)
    assert tuple(w.shape) == ((HIDDEN, d_in) if layout == "out_in" else (d_in, HIDDEN))
    # The rewrite module really maps d_in-dimensional keys to the residual stream.
    out = ad.rewrite(0)(torch.randn(1, d_in))
    assert out.shape[-1] == HIDDEN
    assert ad.rewrite(2) in set(ad.layer(2).modules())
    assert isinstance(ad.final_norm(), nn.Module) and ad.lm_head().weight.shape == (vocab, HIDDEN)
    assert ad.embed().weight.shape == (vocab, HIDDEN)
    assert ad.input_device() == ad.embed().weight.device


@pytest.mark.parametrize("arch,tied", [("llama", True), ("gpt2", True), ("gpt_neox", False), ("gptj", False)])
def test_tied_embeddings_detected(arch, tied, vocab):
    assert adapter_for(model(arch, vocab)).tied is tied


def test_layer_out_of_range(vocab):
    ad = adapter_for(model("llama", vocab))
    for bad in (-1, LAYERS, 100):
        with pytest.raises(InputError, match="out of range"):
            ad.check_layer(bad)
    with pytest.raises(InputError, match="must be an int"):
        ad.check_layer("3")


def test_unknown_architecture_needs_templates(vocab):
    m = model("llama", vocab)
    m.config.model_type = "mystery"
    with pytest.raises(InputError, match="templates"):
        adapter_for(m)
    with pytest.raises(InputError, match="must give"):
        adapter_for(m, {"rewrite": "model.layers.{}.mlp.down_proj"})
    ad = adapter_for(m, {"layer": "model.layers.{}", "rewrite": "model.layers.{}.mlp.up_proj",
                         "final_norm": "model.norm", "lm_head": "lm_head", "embed": "model.embed_tokens"})
    # The override is honoured: up_proj maps hidden -> intermediate.
    assert (ad.d_in, ad.d_out) == (HIDDEN, 2 * HIDDEN) and ad.num_layers == LAYERS


def test_override_on_known_architecture_and_bad_names(vocab):
    m = model("llama", vocab)
    ad = adapter_for(m, {"rewrite": "model.layers.{}.mlp.gate_proj"})
    assert ad.templates.final_norm == "model.norm" and ad.d_in == HIDDEN
    with pytest.raises(InputError, match="not found"):
        adapter_for(m, {"rewrite": "model.layers.{}.mlp.nope"})
    with pytest.raises(InputError, match="unknown template fields"):
        adapter_for(m, {"rewrit": "x"})
