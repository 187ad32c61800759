"""Typed errors and warnings. Every failure names what is wrong and where.

Hierarchy (catch the base class to handle everything pmsolve raises):

    PMSolveError
    ├── InputError (also ValueError)      bad shapes, dtypes, NaN/Inf, asymmetric C, ...
    ├── NumericalError (also ArithmeticError)
    │   ├── NotPositiveDefiniteError     C (or G) not PSD beyond what jitter may fix
    │   ├── ConflictingConstraintsError  equality constraints contradict each other
    │   └── CapacityError                no room left: empty null space, retained keys past d
    ├── CacheError                        missing, corrupt or mismatched statistics/factor files
    └── BackendUnavailableError (also RuntimeError)
"""

from __future__ import annotations


class PMSolveError(Exception):
    """Base class of every error pmsolve raises on purpose."""


class InputError(PMSolveError, ValueError):
    """An argument has the wrong shape, dtype, device or contents."""


class NumericalError(PMSolveError, ArithmeticError):
    """A factorisation or solve cannot produce a trustworthy answer."""


class NotPositiveDefiniteError(NumericalError):
    """The matrix is not positive (semi-)definite even after the largest allowed jitter."""

    def __init__(self, message: str, *, matrix: str = "C", tried: tuple[float, ...] = ()) -> None:
        super().__init__(message)
        self.matrix = matrix
        self.tried = tried


class ConflictingConstraintsError(NumericalError):
    """Equality constraints (W0 + Δ) K = V cannot all hold: dependent keys ask for different values.

    ``columns`` lists groups of edit indices whose keys are (nearly) linearly dependent
    while their residuals are not.
    """

    def __init__(self, message: str, *, columns: list[list[int]]) -> None:
        super().__init__(message)
        self.columns = columns


class CapacityError(NumericalError):
    """The edit has no room left in the key space: a null-space projector with no direction kept,
    or more independent keys held exactly (retained plus new) than the key width d allows.

    ``required`` and ``available`` are the counts compared (e.g. retained + new keys against d).
    """

    def __init__(self, message: str, *, required: int, available: int) -> None:
        super().__init__(message)
        self.required = required
        self.available = available


class CacheError(PMSolveError):
    """A cache file is missing, truncated, corrupt, or belongs to another model/layer/dtype."""


class BackendUnavailableError(PMSolveError, RuntimeError):
    """The requested backend cannot run here (native module missing, no CUDA device, ...)."""


class PMSolveWarning(UserWarning):
    """Base class of pmsolve's warnings."""


class NumericalWarning(PMSolveWarning):
    """A solve succeeded only after regularisation (jitter on C, ridge on G) or is ill-conditioned."""


class NativeUnavailableWarning(PMSolveWarning):
    """The compiled core could not be loaded; the pure-torch backend is used instead."""
