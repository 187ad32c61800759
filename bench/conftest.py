"""Shared set-up of the CPU solver benchmarks (bench/test_bench_solver.py).

Process-wide settings that must precede the measurements: allocation policy
(for the peak-RSS numbers) and, optionally, the thread count.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def _fixed_mmap_threshold() -> None:
    """Serve every allocation ≥ 128 KiB by mmap, returned to the OS when freed.

    glibc otherwise raises its mmap threshold after frees (up to 32 MiB) and reuses
    already-resident heap memory, which would hide allocations from the peak-RSS
    measurement in the benchmarks.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def _threads_from_env() -> None:
    """PMSOLVE_BENCH_THREADS=n runs every library with n threads (torch, and through it pmsolve; all BLAS pools)."""
    n = os.environ.get("PMSOLVE_BENCH_THREADS")
    if n:
        import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, so that the limit reaches it)
        import scipy_openblas32  # noqa: F401
        import threadpoolctl
        import torch

        import pmsolve._native

        pmsolve._native.native()  # loads pmsolve._C's OpenBLAS
        torch.set_num_threads(int(n))
        threadpoolctl.threadpool_limits(int(n))


_fixed_mmap_threshold()
_threads_from_env()
_LOAD_AT_START = os.getloadavg()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what ran: BLAS libraries and their kernels, threads, and how busy the machine was."""
    import threadpoolctl
    import torch

    from pmsolve._native import native

    mod = native()
    machine_info["pmsolve"] = {
        "blas_config": mod.blas_config() if mod is not None else None,
        "blas_threads": mod.blas_get_num_threads() if mod is not None else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "threadpools": threadpoolctl.threadpool_info(),
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "loadavg_start": _LOAD_AT_START,
        "loadavg_end": os.getloadavg(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "PMSOLVE_BENCH_QUICK", "PMSOLVE_BENCH_THREADS")},
    }


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
