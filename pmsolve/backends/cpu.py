"""The C++ CPU backend: pmsolve._C kernels on OpenBLAS (csrc/cholesky.cpp, csrc/pm_solve.cpp).

Tensors cross to the kernels as numpy views (``tensor.numpy()`` shares memory),
so nothing is copied on the way in; outputs are numpy arrays allocated by the
module and wrapped back with ``torch.from_numpy`` (again without a copy).

Threads: OpenBLAS gets ``torch.get_num_threads()`` threads (or the
``PMSOLVE_NUM_THREADS`` environment variable when set), re-read at every call so
that ``torch.set_num_threads`` governs both libraries. The two thread pools
never run at the same time: every kernel call is synchronous.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Sequence

import torch

from ..errors import BackendUnavailableError, InputError
from .base import CholeskyResult, PMSolution

_F64 = 8


def blas_threads() -> int:
    """Threads OpenBLAS should use now: PMSOLVE_NUM_THREADS, else torch's intra-op count."""
    env = os.environ.get("PMSOLVE_NUM_THREADS")
    if env:
        n = int(env) if env.strip().isdigit() else 0
        if n < 1:
            raise InputError(f"PMSOLVE_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    return torch.get_num_threads()


class CpuBackend:
    name = "cpu"

    REQUIRED = ("cholesky_jittered", "cond_estimate", "pm_solve", "blas_get_num_threads", "blas_set_num_threads")

    def __init__(self, module: ModuleType) -> None:
        missing = [f for f in self.REQUIRED if not hasattr(module, f)]
        if missing:
            # A stale build (e.g. an old in-tree _C*.so) must not be picked and then crash mid-solve.
            raise BackendUnavailableError(
                f"{getattr(module, '__file__', 'pmsolve._C')} lacks {missing}: it is an outdated build; "
                "rebuild with `pip install -e .`"
            )
        self._C = module

    def _sync_threads(self) -> None:
        # Asked every time rather than cached: other users of the same OpenBLAS may change it.
        n = blas_threads()
        if self._C.blas_get_num_threads() != n:
            self._C.blas_set_num_threads(n)

    def cholesky_jittered(self, C: torch.Tensor, shifts: Sequence[float]) -> CholeskyResult:
        self._sync_threads()
        C = C.detach().cpu()
        extra = 0
        if C.dtype not in (torch.float32, torch.float64):
            # bf16/fp16 -> fp32 is exact and half the size of an fp64 copy.
            C = C.to(torch.float32)
            extra = C.numel() * C.element_size()
        # Any strides are fine: the kernel copies the lower triangle into L anyway.
        L, k = self._C.cholesky_jittered(C.numpy(), [float(s) for s in shifts])
        d = C.shape[0]
        if k < 0:
            return CholeskyResult(None, -1, d * d * _F64 + extra)
        return CholeskyResult(torch.from_numpy(L), k, d * d * _F64 + extra)

    def cond_estimate(self, L: torch.Tensor, anorm: float) -> float:
        self._sync_threads()
        return float(self._C.cond_estimate(_factor_view(L).numpy(), float(anorm)))

    def pm_solve(self, L: torch.Tensor, K: torch.Tensor, mus: Sequence[float], max_cond: float) -> PMSolution:
        self._sync_threads()
        Lc, Kc = _factor_view(L), _f64_contiguous(K)
        d, n = Kc.shape
        copies = sum(x.numel() * _F64 for x, y in ((Lc, L), (Kc, K)) if x.data_ptr() != y.data_ptr())
        B, G, M, k, cond = self._C.pm_solve(Lc.numpy(), Kc.numpy(), [float(m) for m in mus], float(max_cond))
        # d × n (Z, then B in place), G and M (n × n), dpocon's 3n doubles and n int32s.
        workspace = d * n * _F64 + 2 * n * n * _F64 + 3 * n * _F64 + 4 * n + copies
        return PMSolution(
            B=None if B is None else torch.from_numpy(B),
            G=torch.from_numpy(G),
            M=None if M is None else torch.from_numpy(M),
            mu_index=int(k),
            cond=float(cond),
            workspace_bytes=workspace,
        )


def _f64_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float64).contiguous()


def _factor_view(L: torch.Tensor) -> torch.Tensor:
    """L as the kernels take it without a copy: row-major (ours) or column-major (torch.linalg.cholesky's)."""
    L = L.detach().to(device="cpu", dtype=torch.float64)
    return L if L.is_contiguous() or L.mT.is_contiguous() else L.contiguous()
