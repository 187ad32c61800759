"""Model loading and per-architecture access (adapters live next to this module)."""

from .document_start import document_start, set_document_start
from .loading import DEFAULT_MODEL_ID, LoadedModel, default_cache_dir, load_model

__all__ = ["DEFAULT_MODEL_ID", "LoadedModel", "default_cache_dir", "document_start", "load_model",
           "set_document_start"]
