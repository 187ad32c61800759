"""pmsolve: fast, numerically stable preservation–memorization solves for model editing.

    import pmsolve
    factor = pmsolve.factorize(C)                  # once per layer
    upd = pmsolve.solve(factor, K, R, method="emmet")
    upd.apply_(layer.mlp.down_proj.weight)         # W += R Bᵀ
"""

from . import errors, settings
from ._native import unavailable_reason as native_unavailable_reason
from .backends import available_backends
from .errors import (
    BackendUnavailableError,
    CacheError,
    ConflictingConstraintsError,
    InputError,
    NotPositiveDefiniteError,
    NumericalError,
    NumericalWarning,
    PMSolveError,
)
from .solver import Factor, SolveDiagnostics, Update, factorize, solve

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CacheError",
    "ConflictingConstraintsError",
    "Factor",
    "InputError",
    "NotPositiveDefiniteError",
    "NumericalError",
    "NumericalWarning",
    "PMSolveError",
    "SolveDiagnostics",
    "Update",
    "available_backends",
    "errors",
    "factorize",
    "native_unavailable_reason",
    "settings",
    "solve",
]
