"""Shared set-up of the CPU solver benchmarks (bench/test_bench_solver.py).

Sizes: the full run uses the issue's grid; PMSOLVE_BENCH_QUICK=1 runs a small
subset in about a minute (for checking that the suite works, not for numbers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

QUICK = os.environ.get("PMSOLVE_BENCH_QUICK") == "1"
DIMS = (1536,) if QUICK else (1536, 4096, 6400)
NS = (1, 16, 256) if QUICK else (1, 16, 256, 1024)


def _fixed_mmap_threshold() -> None:
    """Serve every allocation ≥ 128 KiB by mmap, returned to the OS when freed.

    glibc otherwise raises its mmap threshold after frees (up to 32 MiB) and reuses
    already-resident heap memory, which would hide allocations from the peak-RSS
    measurement in the benchmarks.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


_fixed_mmap_threshold()


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
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "PMSOLVE_BENCH_QUICK")},
    }


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
