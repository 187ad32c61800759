"""Hyperparameter presets (pmsolve/presets/*.json): layers, μ and distribution per method,
v* settings, and notes on where the numbers come from."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from .values import ValueConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"

# preserve_edits when neither the caller nor the preset sets it. Measured on SmolLM2, 256 facts
# in 16 sequential batches (docs/benchmarks.md, "preserve_edits"): EMMET ES 85.9 -> 96.5 %, PS 73.8
# -> 80.3 % (a second run 86.3 -> 93.4 %, 74.8 -> 78.9 %); MEMIT ES 91.4 -> 98.4 %, PS 79.3 -> 85.5 %;
# NS within about a point; fluency change +0.5, +1.9, -1.9 points in the three runs (+-~1 each):
# no consistent cost. A single batch is unaffected.
DEFAULT_PRESERVE_EDITS = 0.1


@dataclass(frozen=True)
class MethodSettings:
    layers: list[int]
    mu: float | None
    distribution: str
    start_key: bool = False  # see pmsolve.edit(start_key=...)
    key_source: str = "average"  # see pmsolve.edit(key_source=...)
    preserve_prompts: float = 0.0  # see pmsolve.edit(preserve_prompts=...)
    preserve_edits: float = DEFAULT_PRESERVE_EDITS  # see pmsolve.edit(preserve_edits=...)


@dataclass(frozen=True)
class Preset:
    name: str
    methods: dict[str, MethodSettings]
    values: ValueConfig
    match: dict[str, Any]  # name_contains, model_type (lists), config (field -> value)
    notes: str

    def for_method(self, method: str) -> MethodSettings:
        """The settings for ``method``. AlphaEdit is MEMIT's edit (layers, keys, spread) with
        another solve: without settings of its own it takes MEMIT's, with the solver's μ (1, the
        paper's) and earlier edits' keys at the paper's weight 1 in its preservation term."""
        if method == "alphaedit" and method not in self.methods and "memit" in self.methods:
            return replace(self.methods["memit"], mu=None, preserve_edits=1.0)
        if method not in self.methods:
            raise InputError(f"preset {self.name!r} has no settings for method {method!r}; pass layers explicitly")
        return self.methods[method]


def _parse(data: dict[str, Any], source: str) -> Preset:
    try:
        known = {f.name for f in fields(ValueConfig)}
        values = ValueConfig(**{k: v for k, v in data.get("values", {}).items() if k in known})
        methods = {m: MethodSettings(list(s["layers"]), s.get("mu"), s.get("distribution", "memit"),
                                     bool(s.get("start_key", False)), str(s.get("key_source", "average")),
                                     float(s.get("preserve_prompts", 0.0)), float(s.get("preserve_edits", DEFAULT_PRESERVE_EDITS)))
                   for m, s in data["methods"].items()}
        match = data.get("match", {})
        if not isinstance(match.get("config", {}), dict):
            raise TypeError("match.config must be an object of config fields and values")
        return Preset(data["name"], methods, values, match, data.get("notes", ""))
    except (KeyError, TypeError) as exc:
        raise InputError(f"preset {source} is malformed: {exc}") from None


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> Preset:
    """A preset by name (``list_presets()``) or from a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise InputError(f"no preset {name_or_path!r}; built-in presets: {list_presets()}")
    return _parse(json.loads(path.read_text()), str(path))


def mark_edited(model, model_id: str | None) -> None:
    """Record in the model's config which model it was edited from, so that a saved edited model
    (its folder named anything) is matched to the same preset when it is edited again."""
    config = getattr(model, "config", None)
    if config is not None and model_id and not getattr(config, "pmsolve_base", None):
        config.pmsolve_base = model_id


def _config_matches(config, wanted: dict[str, Any]) -> bool:
    return bool(wanted) and config is not None and all(getattr(config, k, None) == v for k, v in wanted.items())


def _fits(preset: Preset, depth: int | None) -> bool:
    return depth is None or all(max(m.layers) < depth for m in preset.methods.values())


def preset_for(model, model_id: str | None = None) -> Preset | None:
    """The built-in preset for ``model``, decided in this order:

    1. the preset whose ``match.config`` values (model_type, widths, depth, vocabulary) all equal
       the model config's: the architecture itself, whatever the folder or file the model was
       loaded from is called (a GGUF file, a renamed copy; the most keys wins);
    2. the preset whose name pattern occurs in ``model_id``, the model's path or the model it was
       edited from (``config.pmsolve_base``, recorded by :func:`mark_edited`); the longest wins;
    3. the preset whose ``match.model_type`` lists the model's type (family defaults)."""
    config = getattr(model, "config", None)
    name = " ".join(str(x or "") for x in (model_id, getattr(config, "_name_or_path", ""),
                                           getattr(config, "pmsolve_base", ""))).lower()
    model_type = str(getattr(config, "model_type", "") or "")
    depth = getattr(config, "num_hidden_layers", None)
    # a preset whose layers this model does not have is never right for it (another size of a family)
    presets = [p for p in (load_preset(q) for q in list_presets()) if _fits(p, depth)]
    by_config = [p for p in presets if _config_matches(config, p.match.get("config") or {})]
    if by_config:
        return max(by_config, key=lambda p: len(p.match["config"]))
    best, best_len = None, 0
    for p in presets:
        for pat in p.match.get("name_contains", []):
            if pat.lower() in name and len(pat) > best_len:
                best, best_len = p, len(pat)
    if best is not None:
        return best
    return next((p for p in presets if model_type in p.match.get("model_type", [])), None)
