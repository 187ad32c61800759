"""Model loading: the converted built-in SmolLM2 and plain local folders."""

from __future__ import annotations

import json

import pytest
import torch

from pmsolve.errors import CacheError, InputError
from pmsolve.models import DEFAULT_MODEL_ID, load_model
from pmsolve.models.loading import ensure_default_converted


@pytest.fixture(scope="module")
def smollm():
    # Uses the shared cache: the first run of the suite pays the one-time GGUF conversion.
    return load_model()


def test_default_model_knows_paris(smollm):
    model, tok = smollm
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tok.decode(next_id) == " Paris"


def test_default_model_structure(smollm):
    model, tok = smollm
    assert smollm.model_id == DEFAULT_MODEL_ID
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    # Tied LM head: editors that touch embeddings must see one tensor, not two.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.pad_token is not None and tok.padding_side == "right"


def test_converted_config_keeps_rope_base(smollm):
    folder = ensure_default_converted()
    config = json.loads((folder / "config.json").read_text())
    # Older transformers read the top-level key; without it they silently use 10000.
    assert config["rope_theta"] == 100000
    assert config["rope_parameters"]["rope_theta"] == 100000
    assert "quantization_config" not in config
    marker = json.loads((folder / "pmsolve_source.json").read_text())
    assert marker["max_abs_logit_diff"] <= 1e-3


def test_unfinished_cache_folder_is_refused(tmp_path):
    (tmp_path / DEFAULT_MODEL_ID).mkdir()
    with pytest.raises(CacheError, match="not a finished"):
        load_model(cache_dir=tmp_path)


def test_local_folder_roundtrip(tmp_path, smollm):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_src = smollm.tokenizer  # a real tokenizer; none other is available offline
    config = LlamaConfig(vocab_size=len(tok_src), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok_src.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert lm.model_id == tmp_path.name
    assert lm.model.dtype == torch.bfloat16
    assert not lm.model.training
    # device_map goes through accelerate; weights must land where asked.
    placed = load_model(str(tmp_path), device_map="cpu").model
    assert {p.device.type for p in placed.parameters()} == {"cpu"}


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        load_model(str(tmp_path / "nope"))
    # An empty folder exists but holds no model.
    with pytest.raises(InputError, match="cannot load model"):
        load_model(str(tmp_path))
