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
    CapacityError,
    ConflictingConstraintsError,
    InputError,
    NotPositiveDefiniteError,
    NumericalError,
    NumericalWarning,
    PMSolveError,
)
from .solver import Factor, SolveDiagnostics, Update, factorize, solve
from .lifelong import NullSpace, NullSpaceFactor, RetainedKeys, null_space  # after .solver: builds on it

__version__ = "0.1.0"


def __getattr__(name: str):
    # The editing layer pulls in transformers-facing code; import it on first use only,
    # so that `import pmsolve` stays light.
    if name in ("edit", "Editor", "EditResult", "EditRequest"):
        from . import editing

        return getattr(editing, name)
    raise AttributeError(f"module 'pmsolve' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "CacheError",
    "CapacityError",
    "ConflictingConstraintsError",
    "EditRequest",
    "EditResult",
    "Editor",
    "Factor",
    "InputError",
    "NotPositiveDefiniteError",
    "NullSpace",
    "NullSpaceFactor",
    "NumericalError",
    "NumericalWarning",
    "PMSolveError",
    "RetainedKeys",
    "SolveDiagnostics",
    "Update",
    "available_backends",
    "edit",
    "errors",
    "factorize",
    "native_unavailable_reason",
    "null_space",
    "settings",
    "solve",
]
