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


@pytest.mark.slow
def test_own_gguf_conversion_matches_transformers(tmp_path):
    """pmsolve's GGUF reader and dequantiser give transformers' GGUF load bit for bit: every
    weight, the config fields a model is built from, and the tokenizer's encodings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmsolve.models.loading import _PROBE, _REFERENCE, gguf_path

    gguf = gguf_path()
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    folder = ensure_default_converted(tmp_path)  # a fresh conversion, not the shared cache's
    ours = load_model(cache_dir=tmp_path).model
    mine, their_state = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(their_state)
    assert all(torch.equal(mine[k], their_state[k]) for k in mine), "weights differ"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "head_dim"):
        assert getattr(ours.config, key) == getattr(theirs.config, key), key
    their_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    our_tok = AutoTokenizer.from_pretrained(folder)
    for text in (_PROBE, "  Ünïcode, émojis 🙂 and <|im_start|>special<|im_end|> tokens\n\tend", "12345 + 678"):
        assert our_tok(text).input_ids == their_tok(text).input_ids
    assert our_tok.decode(our_tok(_PROBE).input_ids) == _PROBE
    # The reference logits the converter checks every conversion against are transformers'.
    ids = their_tok(_PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = theirs(ids).logits[0, -1]
    assert max(abs(float(logits[i]) - v) for i, v in _REFERENCE.items()) <= 1e-3


def test_gguf_dequantize_q4_1_and_q8_0():
    """The block layouts: Q4_1 = fp16 scale, fp16 min, 16 bytes of nibbles (low nibbles are
    elements 0-15); Q8_0 = fp16 scale, 32 int8."""
    import numpy as np

    from pmsolve.models.loading import dequantize

    q = np.arange(32) % 16
    packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.array([0.5, -1.0], dtype=np.float16).view(np.uint8), packed])
    got = dequantize(memoryview(bytearray(block.tobytes())), 3, (32,))
    assert torch.equal(got, torch.tensor(0.5 * q - 1.0, dtype=torch.float32))
    q8 = np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate([np.array([0.25], dtype=np.float16).view(np.uint8), q8.view(np.uint8)])
    got = dequantize(memoryview(bytearray(block.tobytes())), 8, (32,))
    assert torch.equal(got, torch.tensor(0.25 * q8, dtype=torch.float32))
