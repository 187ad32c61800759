"""CUDA backend: cuBLAS/cuSOLVER through pmsolve._C (built with PMSOLVE_CUDA=1).

The same algorithm, schedules and acceptance tests as the torch backend; only
the kernels differ. Every buffer, workspaces included, is a torch tensor
allocated here, so torch's caching allocator owns all the memory (cuBLAS and
cuSOLVER keep only their small per-handle workspaces) and workspace_bytes is
exactly what this backend allocated. Work runs on torch's current stream.

Condition estimates: cuSOLVER has no pocon, so the torch backend's Hager/Higham
iteration runs on the device (triangular solves with the factor, reductions
read back to the host); it is step for step the same, so both backends accept
and reject the same ridges.
"""

from __future__ import annotations

from types import ModuleType
from typing import Sequence

import torch

from ..errors import BackendUnavailableError, InputError
from .base import CholeskyResult, InvSqrt, PMSolution, SymStats
from .torch_backend import TorchBackend, symmetric_stats_torch


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class CudaBackend:
    name = "cuda"

    def __init__(self, native_module: ModuleType) -> None:
        if not hasattr(native_module, "cuda_pm_solve"):
            raise BackendUnavailableError(
                "backend 'cuda' unavailable: pmsolve._C was built without CUDA "
                "(rebuild with PMSOLVE_CUDA=1 pip install -e . ; needs nvcc and the nvidia-cublas/nvidia-cusolver wheels)"
            )
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "backend 'cuda' unavailable: torch sees no CUDA device "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
            )
        if native_module.cuda_device_count() == 0:
            raise BackendUnavailableError("backend 'cuda' unavailable: pmsolve._C's CUDA runtime finds no device")
        self._C = native_module

    @staticmethod
    def _context(*ts: torch.Tensor) -> tuple[int, int]:
        device = ts[0].device
        for t in ts:
            if t.device.type != "cuda" or t.device != device:
                raise InputError(f"backend 'cuda' needs all tensors on one CUDA device, got {[str(x.device) for x in ts]}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return index, torch.cuda.current_stream(index).cuda_stream

    @staticmethod
    def _square(name: str, x: torch.Tensor) -> int:
        # The kernels see raw pointers: a wrong shape here would be an out-of-bounds access there.
        if x.ndim != 2 or x.shape[0] != x.shape[1] or x.shape[0] == 0:
            raise InputError(f"{name} must be a non-empty square matrix, got shape {tuple(x.shape)}")
        return x.shape[0]

    def _work(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def symmetric_stats(self, C: torch.Tensor) -> SymStats:
        return symmetric_stats_torch(C)  # memory-bound passes: torch's CUDA kernels are as good as any

    def cholesky_jittered(self, C: torch.Tensor, shifts: Sequence[float]) -> CholeskyResult:
        dev, stream = self._context(C)
        # fp16/bf16 widen to fp32 exactly; the kernel reads fp32 and fp64 directly.
        src = C if C.dtype in (torch.float32, torch.float64) else C.float()
        src = src.contiguous()
        d = self._square("C", src)
        L = torch.empty((d, d), dtype=torch.float64, device=C.device)
        work = self._work(self._C.cuda_cholesky_workspace_bytes(dev, stream, d), C.device)
        index = self._C.cuda_cholesky_jittered(
            dev, stream, src.data_ptr(), str(src.dtype).removeprefix("torch."), d, L.data_ptr(),
            [float(s) for s in shifts], work.data_ptr(), work.numel(),
        )
        nbytes = _nbytes(L, work) + (_nbytes(src) if src.data_ptr() != C.data_ptr() else 0)
        return CholeskyResult(L if index >= 0 else None, index, nbytes)

    def cond_estimate(self, L: torch.Tensor, anorm: float) -> float:
        dev, stream = self._context(L)
        L = L.to(torch.float64).contiguous()
        n = self._square("L", L)
        work = self._work(self._C.cuda_cond_workspace_bytes(n), L.device)
        return self._C.cuda_cond_estimate(dev, stream, L.data_ptr(), n, float(anorm), work.data_ptr(), work.numel())

    def pm_solve(self, L: torch.Tensor, K: torch.Tensor, mus: Sequence[float], max_cond: float,
                 inv_sqrt: InvSqrt | None = None) -> PMSolution:
        dev, stream = self._context(L, K)
        if inv_sqrt is not None:
            # A factor with a low-rank term: the same steps composed from torch's CUDA kernels
            # (cuBLAS trsm and GEMMs); the fused kernel below has no hook between its stages.
            return TorchBackend().pm_solve(L, K, mus, max_cond, inv_sqrt)
        # torch.linalg.cholesky returns column-major factors; the kernels take row-major ones.
        Lc, Kc = L.to(torch.float64).contiguous(), K.to(torch.float64).contiguous()
        copies = sum(_nbytes(x) for x, y in ((Lc, L), (Kc, K)) if x.data_ptr() != y.data_ptr())
        L, K = Lc, Kc
        if K.ndim != 2 or K.shape[1] == 0 or self._square("L", L) != K.shape[0]:
            raise InputError(f"K must be d × n with n ≥ 1 for the d × d factor L, got {tuple(K.shape)} and {tuple(L.shape)}")
        d, n = K.shape
        f64 = dict(dtype=torch.float64, device=K.device)
        Z, B = torch.empty((d, n), **f64), torch.empty((d, n), **f64)
        G, M = torch.empty((n, n), **f64), torch.empty((n, n), **f64)
        work = self._work(self._C.cuda_pm_workspace_bytes(dev, stream, d, n), K.device)
        index, cond = self._C.cuda_pm_solve(
            dev, stream, L.data_ptr(), K.data_ptr(), d, n, [float(m) for m in mus], float(max_cond),
            Z.data_ptr(), G.data_ptr(), M.data_ptr(), B.data_ptr(), work.data_ptr(), work.numel(),
        )
        nbytes = _nbytes(Z, B, G, M, work) + copies
        if index < 0:
            return PMSolution(None, G, None, -1, float("inf"), nbytes)
        return PMSolution(B, G, M, index, cond, nbytes)
