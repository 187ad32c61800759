"""Numerical settings, as context managers (and plain setters).

    with pmsolve.settings.max_cond(1e10), pmsolve.settings.backend("torch"):
        upd = pmsolve.solve(factor, K, R)

``set_value`` changes a process-wide default (every thread sees it); a ``with`` block
overrides it for the code it wraps, in its own thread only, so concurrent solves in other
threads keep their settings. Explicit keyword arguments override both.

Kernel choices made from the environment (``PMSOLVE_*`` variables) are in pmsolve.switches.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_DEFAULTS: dict[str, Any] = {
    # Jitter on C: tried in order, relative to mean(diag C), after 0.
    "jitter_schedule": (1e-12, 1e-11, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3),
    # Ridge fallback on G + mu I, relative to mean(diag G), for equality methods.
    "ridge_schedule": (1e-14, 1e-13, 1e-12, 1e-11, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3),
    # A factor whose 1-norm condition estimate exceeds this is treated as singular
    # (1/(4500 eps): about 4 significant digits survive in fp64).
    "max_cond": 1e12,
    # Relative asymmetry of C tolerated before it is rejected.
    "symmetry_rtol": 1e-6,
    # Factor.extend refactors densely once its low-rank term has more columns than this
    # fraction of d (each solve then costs O(d·k·n) more than with a plain factor).
    "max_lowrank_fraction": 0.25,
    # Backend used when a call says backend="auto": None means pick the fastest available.
    "backend": None,
}

_process = dict(_DEFAULTS)   # set_value
_lock = threading.Lock()
_local = threading.local()   # .overrides: name -> value, from the with-blocks active in this thread


def get(name: str) -> Any:
    overrides = getattr(_local, "overrides", None)
    if overrides and name in overrides:
        return overrides[name]
    return _process[name]


def _check_name(name: str) -> None:
    if name not in _DEFAULTS:
        raise KeyError(f"unknown pmsolve setting {name!r}; known: {sorted(_DEFAULTS)}")


def set_value(name: str, value: Any) -> None:
    """Change the process-wide default of a setting."""
    _check_name(name)
    with _lock:
        _process[name] = value


@contextlib.contextmanager
def _override(name: str, value: Any) -> Iterator[None]:
    _check_name(name)
    if not hasattr(_local, "overrides"):
        _local.overrides = {}
    had, old = name in _local.overrides, _local.overrides.get(name)
    _local.overrides[name] = value
    try:
        yield
    finally:
        if had:
            _local.overrides[name] = old
        else:
            del _local.overrides[name]


def jitter_schedule(values: tuple[float, ...]) -> contextlib.AbstractContextManager[None]:
    return _override("jitter_schedule", tuple(float(v) for v in values))


def ridge_schedule(values: tuple[float, ...]) -> contextlib.AbstractContextManager[None]:
    return _override("ridge_schedule", tuple(float(v) for v in values))


def max_cond(value: float) -> contextlib.AbstractContextManager[None]:
    return _override("max_cond", float(value))


def symmetry_rtol(value: float) -> contextlib.AbstractContextManager[None]:
    return _override("symmetry_rtol", float(value))


def max_lowrank_fraction(value: float) -> contextlib.AbstractContextManager[None]:
    return _override("max_lowrank_fraction", float(value))


def backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    return _override("backend", name)
