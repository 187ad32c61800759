"""The C++ CPU backend: pmsolve._C kernels on OpenBLAS (csrc/cholesky.cpp, csrc/pm_solve.cpp),
except a solve with few keys (with any number on Intel CPUs), which runs through torch (see
pm_solve), and, on Intel CPUs, the Cholesky factorisation itself, which runs torch's MKL dpotrf
(csrc/loaded_mkl.h). Which kernels run is decided by the switch table, pmsolve/switches.py.

Tensors cross to the kernels as numpy views (``tensor.numpy()`` shares memory),
so nothing is copied on the way in; outputs are numpy arrays allocated by the
module and wrapped back with ``torch.from_numpy`` (again without a copy).

Threads: OpenBLAS gets ``torch.get_num_threads()`` threads (or ``PMSOLVE_NUM_THREADS``
when set; pmsolve.switches.num_threads), re-read at every call so
that ``torch.set_num_threads`` governs both libraries. The two thread pools
never run at the same time: every kernel call is synchronous.
"""

from __future__ import annotations

import mmap
import sys
from types import ModuleType
from typing import Sequence

import torch

from .. import switches
from ..errors import BackendUnavailableError
from .base import CholeskyResult, InvSqrt, PMSolution, SymStats
from .torch_backend import (TorchBackend, apply_inv_sqrt_, hager_cond_1norm, hager_norm1, reciprocal_cond,
                            symmetric_stats_torch)

_F64 = 8


# Keys from which pm_solve runs natively (below: through torch, whole; see CpuBackend.pm_solve); a
# module attribute, so it can be changed. Measured with bench/trsm_standalone.py at d = 6400: on
# an AMD EPYC ours won from 4 keys on; on an Intel Xeon MKL's (torch's) won at every n, hence the
# auto rule of PMSOLVE_NATIVE_SOLVE (pmsolve/switches.py).
NATIVE_TRSM_MIN_N = 4 if switches.toggle("PMSOLVE_NATIVE_SOLVE").value else sys.maxsize


# Whether the condition estimate's solves run natively (_C.spd_apply_inverse) or through torch
# (PMSOLVE_NATIVE_COND_SOLVES): by default natively except on Intel CPUs with torch's MKL, whose
# vector solves were fast there and where the native kernel is not yet measured
# (bench: test_cond_estimate_vs_library_solves).
NATIVE_COND_SOLVES = bool(switches.toggle("PMSOLVE_NATIVE_COND_SOLVES").value)


def blas_threads() -> int:
    """Threads OpenBLAS should use now: PMSOLVE_NUM_THREADS, else torch's intra-op count."""
    return int(switches.num_threads().value)


def _zero_pages_matrix(d: int) -> torch.Tensor:
    """A d × d float64 tensor of zeros on fresh private anonymous pages (an mmap the tensor keeps
    alive), transparent huge pages asked for.

    Fresh pages are zeros already, so the kernel never writes the factor's upper triangle. Why
    these pages (measured on a Zen 5 VM, d = 6400): first-touching the matrix cost
    237 ms on Python's default MAP_SHARED mapping (shmem: no huge pages), 133 ms on private 4 KiB
    pages and 21 ms on private 2 MiB pages: the factorisation 656 → 549 ms. The price: every huge
    page holds some of the lower triangle, so the whole d × d becomes resident (312 MiB at
    d = 6400, as torch.linalg.cholesky's output; 4 KiB pages left ~45 % of it untouched).
    ``factorize(overwrite_c=True)`` is the memory-lean path: no new matrix at all.
    """
    if d == 0:
        return torch.zeros((0, 0), dtype=torch.float64)
    buf = mmap.mmap(-1, d * d * _F64, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; a no-op where THP is off
        buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.float64).view(d, d)


class CpuBackend:
    name = "cpu"

    REQUIRED = ("symmetric_stats", "cholesky_jittered", "cholesky_jittered_inplace", "spd_apply_inverse", "pm_solve",
                "pm_whitened", "triangular_solve", "blas_get_num_threads", "blas_set_num_threads", "mkl_potrf")

    def __init__(self, module: ModuleType) -> None:
        missing = [f for f in self.REQUIRED if not hasattr(module, f)]
        if missing:
            # A stale build (e.g. an old in-tree _C*.so) must not be picked and then crash mid-solve.
            raise BackendUnavailableError(
                f"{getattr(module, '__file__', 'pmsolve._C')} lacks {missing}: it is an outdated build; "
                "rebuild with `pip install -e .`"
            )
        self._C = module
        self._torch = TorchBackend()  # the solve's route below NATIVE_TRSM_MIN_N keys

    def _sync_threads(self) -> None:
        # Asked every time rather than cached: other users of the same OpenBLAS may change it.
        n = blas_threads()
        if self._C.blas_get_num_threads() != n:
            self._C.blas_set_num_threads(n)

    def symmetric_stats(self, C: torch.Tensor) -> SymStats:
        """One threaded native pass (both triangles, in tiles) instead of torch's three."""
        if C.device.type != "cpu" or C.dtype not in (torch.float32, torch.float64):
            return symmetric_stats_torch(C)
        self._sync_threads()
        s = self._C.symmetric_stats(C.detach().numpy())
        return SymStats(norm1=s["norm1"], amax=s["amax"], asym=s["asym"], asym_at=tuple(s["asym_at"]),
                        nonfinite_at=None if s["nonfinite_at"] is None else tuple(s["nonfinite_at"]),
                        diag_min=s["diag_min"], diag_min_at=s["diag_min_at"])

    def cholesky_jittered(self, C: torch.Tensor, shifts: Sequence[float]) -> CholeskyResult:
        self._sync_threads()
        C = C.detach().cpu()
        extra = 0
        if C.dtype not in (torch.float32, torch.float64):
            # bf16/fp16 -> fp32 is exact and half the size of an fp64 copy.
            C = C.to(torch.float32)
            extra = C.numel() * C.element_size()
        d = C.shape[0]
        L = _zero_pages_matrix(d)
        # Any strides are fine: the kernel copies the lower triangle into L anyway.
        _, k = self._C.cholesky_jittered(C.numpy(), [float(s) for s in shifts], out=L.numpy(), out_zeroed=True)
        if k < 0:
            return CholeskyResult(None, -1, d * d * _F64 + extra)
        return CholeskyResult(L, k, d * d * _F64 + extra)

    def cholesky_jittered_inplace(self, C: torch.Tensor, shifts: Sequence[float],
                                  exactly_symmetric: bool = False) -> CholeskyResult:
        """As cholesky_jittered, in C's own storage (fp64, C-contiguous, on the CPU): no d × d buffer.
        exactly_symmetric (C == Cᵀ, as checked): its upper triangle is the retry backup as it is."""
        self._sync_threads()
        k = self._C.cholesky_jittered_inplace(C.detach().numpy(), [float(s) for s in shifts],
                                              symmetric=exactly_symmetric)
        return CholeskyResult(C if k >= 0 else None, k, C.shape[0] * _F64)

    def cond_estimate(self, L: torch.Tensor, anorm: float) -> float:
        """DPOCON's estimate (DLACN2's iteration, hager_norm1). Its solves: ``_C.spd_apply_inverse``
        where NATIVE_COND_SOLVES (both triangular solves streamed at memory bandwidth, two vectors
        per read of the factor; on a Zen 5 at d = 6400, one vector cost about two thirds of
        torch's two solves and the estimate a quarter less), else torch's (MKL's on Intel CPUs).
        A column-major factor takes torch's. ``_C.cond_estimate`` keeps LAPACK's dpocon."""
        L = L.detach().to(device="cpu", dtype=torch.float64)
        if not NATIVE_COND_SOLVES or not L.is_contiguous() or anorm == 0 or L.shape[0] == 0:
            return hager_cond_1norm(L, float(anorm))
        return self._cond_native(L, float(anorm))

    def _cond_native(self, L: torch.Tensor, anorm: float) -> float:
        self._sync_threads()
        Ln = L.numpy()

        def apply_inv(X: torch.Tensor) -> torch.Tensor:  # the kernel takes vectors as rows
            rows = X.mT.contiguous()
            self._C.spd_apply_inverse(Ln, rows.numpy())
            return rows.mT

        return reciprocal_cond(hager_norm1(apply_inv, L.shape[0], L.dtype, L.device), anorm)

    def pm_solve(self, L: torch.Tensor, K: torch.Tensor, mus: Sequence[float], max_cond: float,
                 inv_sqrt: InvSqrt | None = None) -> PMSolution:
        """Z = L⁻¹K, the n × n work on it (pm_whitened), then B = L⁻ᵀ Z (G + μI)⁻¹.

        The two d × d triangular solves dominate (2·d²·n flops). From NATIVE_TRSM_MIN_N keys on
        they run natively, recursively on GEMM, in place in one d × n buffer; below it (and at
        every n on Intel CPUs, where MKL's solves are faster), the whole solve runs through torch,
        the n × n work included: OpenBLAS's threads starting between two of MKL's calls, beside
        torch's still-spinning OpenMP threads, made the solve 1.2-3× slower on an Intel Xeon at
        d = 6400 (most at small n). Both read L in place, whichever its storage.
        A low-rank term (``inv_sqrt``) is two d × k × n products around pm_whitened, through torch.
        """
        L = L.detach().to(device="cpu", dtype=torch.float64)
        K = K.detach().to(device="cpu", dtype=torch.float64)
        mus = [float(m) for m in mus]
        d, n = K.shape
        if n < NATIVE_TRSM_MIN_N:
            return self._torch.pm_solve(L, K, mus, max_cond, inv_sqrt)
        self._sync_threads()
        L_arr = L.numpy() if L.is_contiguous() else L.mT.contiguous().mT.numpy()  # no copy if either order
        Z = K.clone(memory_format=torch.contiguous_format)
        self._C.triangular_solve(L_arr, Z.numpy(), False)
        apply_inv_sqrt_(Z, inv_sqrt)
        G, M, k, cond = self._C.pm_whitened(Z.numpy(), mus, float(max_cond))
        workspace = d * n * _F64 + 2 * n * n * _F64 + 3 * n * _F64 + 4 * n  # Z = B, G, M, dpocon's
        if k >= 0:
            apply_inv_sqrt_(Z, inv_sqrt)
            self._C.triangular_solve(L_arr, Z.numpy(), True)
        B = Z
        G = torch.from_numpy(G)
        if k < 0:
            return PMSolution(None, G, None, -1, float(cond), workspace)
        return PMSolution(B, G, torch.from_numpy(M), int(k), float(cond), workspace, self._cross(B, K))

    def _cross(self, B: torch.Tensor, K: torch.Tensor) -> torch.Tensor | None:
        """BᵀK on the AVX-512 fp64 kernel where the solve's GEMMs run on it (the same rule as
        csrc/pm_solve.cpp's own_solve_threads); else None (torch forms it). d·n² flops; about
        twice as fast as torch's MKL product on an AVX-512 Zen 5 at d = 6400, n = 1024."""
        n = K.shape[1]
        if n < self._C.F64_GEMM_SOLVE_MIN_KEYS or not self._C.f64_gemm():
            return None
        BtK = torch.zeros(n, n, dtype=torch.float64)
        self._C.f64_gemm_sub(B.mT.numpy(), K.mT.numpy(), BtK.numpy())  # 0 − Bᵀ·K, exactly negated below
        return BtK.neg_()
