"""The editing layer: requests, keys and values in Hugging Face models, edit distribution,
and the editor that ties them to the PM solver (``pmsolve.edit``)."""

from .distribution import CostBalanced, Distribution, MemitSpread, SingleLayer, get_distribution
from .editor import EditResult, LayerEdit, apply_updates, edit, load_updates, save_updates
from .presets import list_presets, load_preset, preset_for
from .requests import EditRequest, load_requests, validate
from .values import ValueConfig

__all__ = [
    "CostBalanced",
    "Distribution",
    "EditRequest",
    "EditResult",
    "LayerEdit",
    "MemitSpread",
    "SingleLayer",
    "ValueConfig",
    "apply_updates",
    "edit",
    "get_distribution",
    "list_presets",
    "load_preset",
    "load_requests",
    "load_updates",
    "preset_for",
    "save_updates",
    "validate",
]
