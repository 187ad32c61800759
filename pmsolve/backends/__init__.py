"""Backend dispatch: "cpu" (C++ core on OpenBLAS), "cuda" (cuBLAS/cuSOLVER), "torch" (reference).

``backend="auto"`` picks the native backend for the tensors' device when it
loads, else the pure-torch one (with one warning saying why). The name of the
backend that ran is recorded in every result.
"""

from __future__ import annotations

import torch

from .. import settings
from .._native import native, unavailable_reason, warn_unavailable_once
from ..errors import BackendUnavailableError, InputError
from .base import CholeskyResult, PMSolution, SolverBackend
from .torch_backend import TorchBackend

__all__ = ["CholeskyResult", "PMSolution", "SolverBackend", "get_backend", "available_backends"]

_instances: dict[str, SolverBackend] = {"torch": TorchBackend()}


def _native_backend(name: str) -> SolverBackend:
    if name in _instances:
        return _instances[name]
    mod = native()
    if mod is None:
        raise BackendUnavailableError(f"backend {name!r} unavailable: {unavailable_reason()}")
    if name == "cpu":
        from .cpu import CpuBackend

        inst: SolverBackend = CpuBackend(mod)
    elif name == "cuda":
        from .cuda import CudaBackend

        inst = CudaBackend(mod)
    else:
        raise InputError(f"unknown backend {name!r}; choose 'auto', 'cpu', 'cuda' or 'torch'")
    _instances[name] = inst
    return inst


def available_backends() -> list[str]:
    names = ["torch"]
    for name in ("cpu", "cuda"):
        try:
            _native_backend(name)
        except (BackendUnavailableError, ImportError):
            continue
        if name == "cuda" and not torch.cuda.is_available():
            continue
        names.append(name)
    return names


def get_backend(name: str | None, device: torch.device) -> SolverBackend:
    """Resolve a backend name ("auto", "cpu", "cuda", "torch") for tensors on ``device``."""
    name = name or "auto"
    if name == "auto":
        name = settings.get("backend") or "auto"
    if name == "torch":
        return _instances["torch"]
    if name == "auto":
        wanted = "cuda" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
        if wanted is None:
            return _instances["torch"]
        try:
            return _native_backend(wanted)
        except (BackendUnavailableError, ImportError) as exc:
            warn_unavailable_once(str(exc))
            return _instances["torch"]
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown backend {name!r}; choose 'auto', 'cpu', 'cuda' or 'torch'")
    if name != device.type:
        raise InputError(f"backend {name!r} cannot run on tensors on device {device}")
    return _native_backend(name)
