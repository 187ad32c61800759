"""Loads the compiled core ``pmsolve._C`` once, and remembers why it failed if it did.

``import pmsolve`` never fails because of the native module: the pure-torch
backend always works, and the first time a caller asks for the native backend
(explicitly or through ``backend="auto"``) a single NativeUnavailableWarning says why.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from . import switches
from .errors import BackendUnavailableError, NativeUnavailableWarning

_module: ModuleType | None = None
_reason: str | None = None
_loaded = False
_warned = False


# After each call OpenBLAS's worker threads busy-wait for 2^28 cycles (~0.1 s) by default.
# With few cores that starves whatever runs next: 20 small torch ops right after a solve took
# about ten times as long as without one. 2^20 cycles (~0.4 ms) still keeps the threads
# awake between the back-to-back BLAS calls inside one kernel. Read once, when the library
# loads; a value the user set wins.
_OPENBLAS_THREAD_TIMEOUT = "20"


def _load() -> None:
    global _module, _reason, _loaded
    # A bad PMSOLVE_* value is an InputError at every attempt, not a silent fallback to torch.
    switches.check_environment()
    _loaded = True
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", _OPENBLAS_THREAD_TIMEOUT)
    try:
        # Loading the wheel's OpenBLAS first lets the dynamic linker resolve _C's
        # dependency by soname even when the rpath does not point at it.
        import scipy_openblas32  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        _reason = f"the BLAS wheel scipy-openblas32 cannot be imported ({exc!r})"
        return
    try:
        _C = _import_C()
    except Exception as exc:
        _reason = (
            f"pmsolve._C cannot be loaded ({exc!r}); rebuild with `pip install -e .` "
            "(needs a C++17 compiler and CMake)"
        )
        return
    # The core reads no environment: the switch table decides, once, here.
    switches.apply_native(_C)
    _module = _C


def _import_C() -> ModuleType:
    """Import pmsolve._C, or the build named by PMSOLVE_NATIVE_LIB (a path to a _C*.so).

    The variable lets a developer test a build from their own build folder
    without installing it over the package's copy.
    """
    path = switches.native_lib()
    if not path:
        from . import _C  # type: ignore[attr-defined]

        return _C
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("pmsolve._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"PMSOLVE_NATIVE_LIB={path} is not a loadable extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["pmsolve._C"] = mod
    return mod


def native() -> ModuleType | None:
    """The native module, or None (and the reason in :func:`unavailable_reason`)."""
    if not _loaded:
        _load()
    return _module


def unavailable_reason() -> str | None:
    native()
    return _reason


def require_native() -> ModuleType:
    mod = native()
    if mod is None:
        raise BackendUnavailableError(f"native backend unavailable: {_reason}")
    return mod


def warn_unavailable_once(reason: str | None = None) -> None:
    """One NativeUnavailableWarning per process: the module is missing, or (``reason``) unusable."""
    global _warned
    reason = reason or (_reason if native() is None else None)
    if reason and not _warned:
        _warned = True
        warnings.warn(
            f"pmsolve: native backend unavailable, using the pure-torch backend: {reason}",
            NativeUnavailableWarning,
            stacklevel=3,
        )
