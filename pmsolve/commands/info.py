"""`pmsolve info`: which backends load here, the BLAS in use, thread counts, and the kernel
switches (pmsolve/switches.py): each one's value and where it came from."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show backends, BLAS configuration, threads and kernel switches")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import pmsolve
    from pmsolve import switches
    from pmsolve._native import native
    from pmsolve.models.precision import bf16_cpu_feature

    mod = native()
    feature = bf16_cpu_feature()
    cpu_precision = f"bf16 autocast ({feature})" if feature else "model dtype"
    info = {
        "pmsolve": pmsolve.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "backends": pmsolve.available_backends(),
        "native_unavailable_reason": pmsolve.native_unavailable_reason(),
        "blas": mod.blas_config() if mod else None,
        "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
        # OpenBLAS reads these when it loads: a forced kernel set can cost more than any tuning here.
        "openblas_env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        "openblas_note": _openblas_core_note(mod.blas_config() if mod else None),
        "cuda_available": torch.cuda.is_available(),
        "cuda_backend": _cuda_backend_status(),
        # What ValueConfig(autocast="auto") picks for v* on the CPU (bf16 needs AMX or AVX512-BF16 to pay off).
        "v_star_precision_cpu": cpu_precision,
        # ... and collect_stats(autocast="auto") for the statistics' forward (edit, stats, eval).
        "stats_forward_cpu": cpu_precision,
        # Where a solve runs on the CPU backend: natively from some number of keys, through torch
        # (whole, MKL on Intel CPUs) below it.
        "cpu_solve": _solve_route(mod),
        # Which kernel factors C on the CPU: MKL's dpotrf found in the process (torch's), or ours.
        "cpu_cholesky": _cholesky_route(mod),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # Which kernel multiplies bf16 activations in the statistics: "amx" (csrc/amx_gram.cpp),
        # "avx512_bf16" (csrc/dpbf16_gram.cpp) or "fp32" (widened, ssyrk); None without the native core.
        "stats_bf16_kernel": mod.bf16_gram_kernel() if mod and hasattr(mod, "bf16_gram_kernel") else None,
        # ... and fp32 activations: OpenBLAS's "ssyrk", or "avx512" (csrc/f32_gram.cpp), which runs where
        # OpenBLAS's own kernels lack AVX-512 (PMSOLVE_F32_GRAM decides).
        "stats_f32_kernel": ("avx512" if mod.f32_gram() else "ssyrk") if mod and hasattr(mod, "f32_gram") else None,
        # Where the native kernels' own parallel work runs: torch's OpenMP pool when the process has
        # one OpenMP runtime (csrc/parallel.h), else threads of their own.
        "native_threads": _native_threads(mod),
        "cache": _cache_usage(),
        # Every PMSOLVE_* switch: value, source ("environment", "default", "auto-detected"; what
        # was detected), and for the native kernels' switches whether the kernel runs now.
        "switches": switches.report(mod),
    }
    print(json.dumps(info, indent=2))
    return 0


def _cpu_has_avx512() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_avx512_supported", None)  # torch's own CPU feature probe
    return bool(probe is not None and probe())


def _openblas_core_note(config: str | None) -> str | None:
    """A warning when OPENBLAS_CORETYPE holds OpenBLAS to narrower kernels than the CPU runs."""
    from pmsolve._native import native

    forced = os.environ.get("OPENBLAS_CORETYPE")
    mod = native()
    if not config or not forced or "core=" not in config or mod is None:
        return None
    core = config.rsplit("core=", 1)[1].split()[0]
    if core.lower() in mod.OPENBLAS_AVX512_CORES or not _cpu_has_avx512():
        return None
    return (f"OPENBLAS_CORETYPE={forced} holds OpenBLAS to its {core} kernels (no AVX-512) on this AVX-512 CPU; "
            "pmsolve's own AVX-512 kernels take over the Cholesky and the fp32 statistics, the rest of its BLAS "
            "work (the solve's triangular solves and products) runs at the narrower rate; unset it before Python "
            "starts for OpenBLAS's own choice (on a Zen 5 its dgemm ran 1.7x faster with its own kernels)")


def _native_threads(mod) -> str | None:
    if mod is None or not hasattr(mod, "openmp"):
        return None
    if mod.openmp():
        return "torch's OpenMP pool"
    runtimes = mod.openmp_runtimes()
    if len(runtimes) == 1:
        return "own threads (switched off by PMSOLVE_OPENMP=off or _C.openmp(False), or built without OpenMP)"
    return f"own threads ({len(runtimes)} OpenMP runtimes loaded: {runtimes})"


def _cholesky_route(mod) -> str | None:
    if mod is None or not hasattr(mod, "mkl_potrf"):
        return None
    if mod.mkl_potrf():
        return f"MKL dpotrf from {mod.loaded_mkl_path()}"
    if hasattr(mod, "f64_gemm") and mod.f64_gemm():
        return "recursive on pmsolve's AVX-512 fp64 kernel, OpenBLAS for the leaves (PMSOLVE_F64_GEMM=off for OpenBLAS's)"
    return "recursive on OpenBLAS (PMSOLVE_MKL_POTRF=on to use a loaded MKL's dpotrf)"


def _solve_route(mod) -> str:
    from pmsolve.backends import cpu

    n = cpu.NATIVE_TRSM_MIN_N
    if n == sys.maxsize:
        return "torch at every n"
    if mod is not None and hasattr(mod, "f64_gemm") and mod.f64_gemm():
        own = max(n, mod.F64_GEMM_SOLVE_MIN_KEYS)
        return f"native from {n} keys, torch below; on pmsolve's AVX-512 fp64 kernel from {own} keys"
    return f"native from {n} keys, torch below"


def _cache_usage() -> dict:
    """Where the cache is ($PMSOLVE_CACHE) and the MiB each part holds: statistics are kept per
    model, weights (dtype included), corpus and token count, so they add up; delete at will."""
    from pmsolve.switches import cache_dir

    root = cache_dir()
    parts = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    mib = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 1) for p in parts}
    return {"path": str(root), "MiB": mib}


def _cuda_backend_status() -> str:
    """"available", or why backend "cuda" is not (no CUDA build of _C, no device, ...)."""
    import torch

    from pmsolve.backends import get_backend
    from pmsolve.errors import BackendUnavailableError

    try:
        get_backend("cuda", torch.device("cuda"))
    except BackendUnavailableError as exc:
        return str(exc)
    return "available"
