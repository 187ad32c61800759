"""Numerical settings, as context managers (and plain setters).

    with pmsolve.settings.max_cond(1e10), pmsolve.settings.backend("torch"):
        upd = pmsolve.solve(factor, K, R)

Values are process-wide defaults that explicit keyword arguments override.
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
    # Backend used when a call says backend="auto": None means pick the fastest available.
    "backend": None,
}

_local = threading.local()


def _values() -> dict[str, Any]:
    if not hasattr(_local, "values"):
        _local.values = dict(_DEFAULTS)
    return _local.values


def get(name: str) -> Any:
    return _values()[name]


def set_value(name: str, value: Any) -> None:
    if name not in _DEFAULTS:
        raise KeyError(f"unknown pmsolve setting {name!r}; known: {sorted(_DEFAULTS)}")
    _values()[name] = value


@contextlib.contextmanager
def _override(name: str, value: Any) -> Iterator[None]:
    old = get(name)
    set_value(name, value)
    try:
        yield
    finally:
        set_value(name, old)


def jitter_schedule(values: tuple[float, ...]) -> contextlib.AbstractContextManager[None]:
    return _override("jitter_schedule", tuple(float(v) for v in values))


def ridge_schedule(values: tuple[float, ...]) -> contextlib.AbstractContextManager[None]:
    return _override("ridge_schedule", tuple(float(v) for v in values))


def max_cond(value: float) -> contextlib.AbstractContextManager[None]:
    return _override("max_cond", float(value))


def symmetry_rtol(value: float) -> contextlib.AbstractContextManager[None]:
    return _override("symmetry_rtol", float(value))


def backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    return _override("backend", name)
