"""The editing layer: requests, keys and values in Hugging Face models, edit distribution,
and the editor that ties them to the PM solver (``pmsolve.edit``)."""

from .distribution import CostBalanced, Distribution, MemitSpread, SingleLayer, get_distribution
from .editor import EDIT_METHODS, EditResult, Editor, LayerEdit, apply_updates, edit, load_updates, save_updates
from .preservation import NullSpaceSettings
from .presets import list_presets, load_preset, preset_for
from .requests import EditRequest, load_requests, validate
from .values import ValueConfig

__all__ = [
    "CostBalanced",
    "Distribution",
    "EditRequest",
    "EDIT_METHODS",
    "EditResult",
    "Editor",
    "LayerEdit",
    "MemitSpread",
    "NullSpaceSettings",
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
