"""Model loading and per-architecture access (adapters live next to this module)."""

from .loading import DEFAULT_MODEL_ID, LoadedModel, default_cache_dir, load_model

__all__ = ["DEFAULT_MODEL_ID", "LoadedModel", "default_cache_dir", "load_model"]
