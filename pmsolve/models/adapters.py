"""Where the editable pieces of a Hugging Face causal LM live, per architecture.

An :class:`Adapter` answers: which module is decoder layer ``i``, which is the
rewrite module (the MLP output projection W0 that the solver edits), in which
layout its weight is stored, and where the final norm, LM head and embeddings
are. Architectures are detected from ``config.model_type``; anything else is
described with explicit module-name templates (:class:`Templates`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..errors import InputError

Layout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class Templates:
    """Module names inside the model; ``{}`` in ``layer``/``rewrite`` is the layer index,
    and ``"a|b"`` means the first of a, b that exists.

    layout: how the rewrite weight is stored: "out_in" (nn.Linear, d_out × d_in) or
    "in_out" (GPT-2 Conv1D, d_in × d_out).
    """

    layer: str
    rewrite: str
    final_norm: str
    lm_head: str
    embed: str
    layout: Layout = "out_in"


_GPT2 = Templates(
    layer="transformer.h.{}",
    rewrite="transformer.h.{}.mlp.c_proj",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    embed="transformer.wte",
    layout="in_out",
)
_GPTJ = Templates(
    layer="transformer.h.{}",
    rewrite="transformer.h.{}.mlp.fc_out",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    embed="transformer.wte",
)
_NEOX = Templates(
    layer="gpt_neox.layers.{}",
    rewrite="gpt_neox.layers.{}.mlp.dense_4h_to_h",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head|embed_out",  # renamed to lm_head in transformers 5
    embed="gpt_neox.embed_in",
)
_LLAMA = Templates(
    layer="model.layers.{}",
    rewrite="model.layers.{}.mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)

# config.model_type -> templates. SmolLM/SmolLM2 configs say "llama".
KNOWN: dict[str, Templates] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
}


def _get(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name``; "a|b" tries alternatives (names that changed across versions)."""
    for alt in name.split("|"):
        try:
            return model.get_submodule(alt)
        except AttributeError:
            continue
    raise InputError(f"module {name!r} not found in {type(model).__name__}")


class Adapter:
    """Structural view of one model. Construct with :func:`adapter_for`."""

    def __init__(self, model: nn.Module, templates: Templates, num_layers: int, model_type: str) -> None:
        self.model = model
        self.templates = templates
        self.num_layers = num_layers
        self.model_type = model_type
        w = self.weight(0)
        self.d_in, self.d_out = (w.shape[1], w.shape[0]) if self.layout == "out_in" else tuple(w.shape)

    @property
    def layout(self) -> Layout:
        return self.templates.layout

    def check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise InputError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.num_layers:
            raise InputError(f"layer {layer} is out of range: this model has layers 0..{self.num_layers - 1}")
        return layer

    def layer(self, i: int) -> nn.Module:
        return _get(self.model, self.templates.layer.format(self.check_layer(i)))

    def rewrite_name(self, i: int) -> str:
        return self.templates.rewrite.format(self.check_layer(i))

    def rewrite(self, i: int) -> nn.Module:
        return _get(self.model, self.rewrite_name(i))

    def weight(self, i: int) -> torch.Tensor:
        w = getattr(self.rewrite(i), "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise InputError(f"{self.rewrite_name(i)} has no 2-D .weight; is the rewrite template right?")
        return w

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.templates.final_norm)

    def lm_head(self) -> nn.Module:
        return _get(self.model, self.templates.lm_head)

    def embed(self) -> nn.Module:
        return _get(self.model, self.templates.embed)

    @property
    def tied(self) -> bool:
        """True when the LM head shares its weight with the input embeddings."""
        head = getattr(self.lm_head(), "weight", None)
        return head is not None and head is getattr(self.embed(), "weight", None)

    def input_device(self) -> torch.device:
        """Where token ids must go (the embedding's device under a device_map)."""
        return self.embed().weight.device

    def describe(self) -> dict[str, object]:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "rewrite": self.templates.rewrite,
            "layout": self.layout,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "tied_embeddings": self.tied,
        }


def _num_layers(model: nn.Module, templates: Templates) -> int:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    # No config: count layer modules that exist.
    n = 0
    while True:
        try:
            model.get_submodule(templates.layer.format(n))
        except AttributeError:
            return n
        n += 1


def adapter_for(model: nn.Module, templates: Templates | dict[str, str] | None = None) -> Adapter:
    """The adapter for ``model``: from ``config.model_type`` or explicit ``templates``.

    ``templates`` may be a :class:`Templates` or a dict with some of its fields; missing
    fields are taken from the detected architecture when there is one.

    Raises:
        InputError: unknown architecture and no (complete) templates, or templates that
            do not name modules of this model.
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    base = KNOWN.get(model_type)
    if isinstance(templates, dict):
        unknown = set(templates) - set(Templates.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown template fields {sorted(unknown)}; known: {list(Templates.__dataclass_fields__)}")
        if base is None:
            missing = [f for f in ("layer", "rewrite", "final_norm", "lm_head", "embed") if f not in templates]
            if missing:
                raise InputError(f"templates for an unknown architecture must give {missing} as well")
            templates = Templates(**templates)
        else:
            templates = replace(base, **templates)
    if templates is None:
        if base is None:
            raise InputError(
                f"unknown architecture {model_type!r} (known: {sorted(KNOWN)}); pass module-name templates, e.g. "
                "templates={'layer': 'model.layers.{}', 'rewrite': 'model.layers.{}.mlp.down_proj', "
                "'final_norm': 'model.norm', 'lm_head': 'lm_head', 'embed': 'model.embed_tokens', "
                "'layout': 'out_in'}  (CLI: --templates JSON)"
            )
        templates = base
    if templates.layout not in ("out_in", "in_out"):
        raise InputError(f"layout must be 'out_in' or 'in_out', got {templates.layout!r}")
    n = _num_layers(model, templates)
    if n == 0:
        raise InputError(f"no layer module matches template {templates.layer!r}")
    return Adapter(model, templates, n, model_type or "custom")
