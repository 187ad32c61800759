"""CPU solver benchmarks (issue #2): solve vs the reference formulas, factorize vs the libraries.

Run (full grid ≈ 10–15 min on 2 cores; PMSOLVE_BENCH_QUICK=1 for a ~1 min smoke run):

    pytest bench/test_bench_solver.py --benchmark-json bench/results/solver.json
    python bench/report.py bench/results/solver.json        # rewrites the tables in bench/RESULTS.md

How it measures (the machine is shared, so load varies over seconds):
- Every round runs every implementation once, back to back (pytest-benchmark's
  ``setup`` hook runs the competitors before each timed round of ours), and the
  medians over rounds are compared. Ratios therefore come from the same minutes.
- Peak memory: the process's peak RSS is reset (``/proc/self/clear_refs``) before
  one extra, untimed run of each implementation, and VmHWM − VmRSS-before is its
  peak increase, the result included. conftest.py makes glibc serve large
  allocations by mmap, so freed memory is not silently reused.
- Fresh memory: every timed call (ours and each competitor's) runs right after touching and
  freeing as much memory as the largest call allocates (``prefault``). Some VMs
  hand memory the guest has freed back to the host within seconds, and touching it again can
  cost more than half a factorisation at d = 6400 (docs/design.md §10). Without this,
  whichever implementation allocated its output after a pause paid it.
- All implementations run with the same thread count (torch's, 2 here, or
  PMSOLVE_BENCH_THREADS, see conftest.py): MKL through torch, OpenBLAS 0.3.34
  (scipy-openblas32, our core's library) and SciPy's bundled OpenBLAS.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import statistics
import time
from typing import Callable

import numpy as np
import pytest
import scipy.linalg
import scipy_openblas32
import torch

import pmsolve
from pmsolve._native import native

QUICK = os.environ.get("PMSOLVE_BENCH_QUICK") == "1"
# PMSOLVE_BENCH_DIMS="6400" (comma-separated) restricts the sizes of a full run.
DIMS = (1536,) if QUICK else tuple(int(x) for x in os.environ.get("PMSOLVE_BENCH_DIMS", "1536,4096,6400").split(","))
NS = (1, 16, 256) if QUICK else (1, 16, 256, 1024)
ROUNDS = {1536: 5, 4096: 3, 6400: 3}
D_OUT = 1024  # rows of R (the MLP output width; only the diagnostics and Δ comparison use it)
LAMBDA = 15000.0  # MEMIT's λ (reference GPT-J setting)
EPS_EMMET = 0.1  # EMMET's ridge ε
F64 = torch.float64

pytestmark = pytest.mark.skipif(native() is None, reason="pmsolve._C unavailable")


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_increase(fn: Callable[[], object]) -> int:
    """Bytes by which one call raises the process's peak RSS above its RSS before the call."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS (Linux ≥ 4.0)
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return (peak - before) * 1024


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory and free it, so that the next large allocations find
    pages in the guest kernel's free lists instead of waiting for the host (see the module
    docstring). Allocations ≥ 128 KiB are mmap'd (conftest.py): freeing returns them at once."""
    if nbytes > 0:
        np.ones(nbytes // 8)


class Competitors:
    """Runs named implementations once per round (as pytest-benchmark setup) and keeps their
    times; each call, and ours after the round, runs right after ``prefault(prefault_bytes)``."""

    def __init__(self, fns: dict[str, Callable[[], object]], prefault_bytes: int = 0) -> None:
        self.fns = fns
        self.prefault_bytes = prefault_bytes
        self.times: dict[str, list[float]] = {k: [] for k in fns}

    def round(self) -> None:
        for name, fn in self.fns.items():
            prefault(self.prefault_bytes)
            self.times[name].append(_timed(fn))
        prefault(self.prefault_bytes)  # for ours, which pytest-benchmark times next

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.times.items()}


def _run(benchmark, ours: Callable[[], object], competitors: Competitors, rounds: int) -> float:
    benchmark.pedantic(ours, setup=competitors.round, rounds=rounds, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median


# ---------------------------------------------------------------------------
# inputs and reference formulas
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # ≈ 1 GB for all three sizes; regenerating costs more than it saves
def problem(d: int):
    """C = AAᵀ/d + 1e-3·mean(diag)·I (Marchenko–Pastur spectrum, κ ≈ 4e3), keys and residuals."""
    g = torch.Generator().manual_seed(d)
    A = torch.randn(d, d, generator=g, dtype=F64)
    C = A @ A.mT / d
    del A
    C = (C + C.mT) / 2
    C.diagonal().add_(1e-3 * float(C.diagonal().mean()))
    K = {n: torch.randn(d, n, generator=g, dtype=F64) for n in NS}
    R = {n: torch.randn(D_OUT, n, generator=g, dtype=F64) for n in NS}
    factor = pmsolve.factorize(C, backend="cpu")
    t_factor = statistics.median(_timed(lambda: pmsolve.factorize(C, backend="cpu")) for _ in range(3))
    return C, K, R, factor, t_factor


@functools.lru_cache(maxsize=1)
def c_inverse(d: int) -> torch.Tensor:
    return torch.inverse(problem(d)[0])


def memit_reference(C: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(λC + KKᵀ)⁻¹K as the MEMIT reference code computes it; Δ = R · thisᵀ."""
    return torch.linalg.solve(LAMBDA * C + K @ K.mT, K)


def emmet_reference_after_inverse(Cinv: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """C⁻¹K (KᵀC⁻¹K + εI)⁻¹ with torch.inverse, as the EMMET reference code computes it."""
    CiK = Cinv @ K
    eye = torch.eye(K.shape[1], dtype=F64)
    return CiK @ torch.inverse(K.mT @ CiK + EPS_EMMET * eye)


def rel_delta(R: torch.Tensor, B: torch.Tensor, B_ref: torch.Tensor) -> float:
    """‖R Bᵀ − R B_refᵀ‖_F / ‖R B_refᵀ‖_F: relative difference of the dense updates Δ."""
    ref = R @ B_ref.mT
    return float(torch.linalg.matrix_norm(R @ B.mT - ref) / torch.linalg.matrix_norm(ref))


# ---------------------------------------------------------------------------
# (a) solve vs the reference formulas
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("d", DIMS)
def test_emmet_reference_inverse(benchmark, d):
    """torch.inverse(C): the O(d³) part of every EMMET reference call, timed once per d."""
    C = problem(d)[0]
    benchmark.group = f"emmet-inverse-d{d}"
    benchmark.pedantic(lambda: torch.inverse(C), rounds=ROUNDS[d], iterations=1)
    benchmark.extra_info.update(d=d, peak_bytes=peak_rss_increase(lambda: torch.inverse(C)))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DIMS)
def test_solve_vs_references(benchmark, d, n):
    C, Ks, Rs, factor, t_factor = problem(d)
    K, R = Ks[n], Rs[n]
    Cinv = c_inverse(d)  # the EMMET reference's inverse is timed in test_emmet_reference_inverse
    comp = Competitors(
        {
            "memit_ref": lambda: memit_reference(C, K),
            "emmet_ref_after_inverse": lambda: emmet_reference_after_inverse(Cinv, K),
            "emmet": lambda: pmsolve.solve(factor, K, R, method="emmet", mu=EPS_EMMET, backend="cpu"),
        },
        prefault_bytes=3 * d * d * 8,  # the MEMIT reference's λC + KKᵀ, its sum and LU's copy
    )
    benchmark.group = f"solve-d{d}"

    def ours():
        return pmsolve.solve(factor, K, R, method="memit", mu=LAMBDA, backend="cpu")

    t_ours = _run(benchmark, ours, comp, ROUNDS[d])
    med = comp.medians()
    up_memit, up_emmet = ours(), comp.fns["emmet"]()
    benchmark.extra_info.update(
        d=d,
        n=n,
        t_memit=t_ours,
        t_emmet=med["emmet"],
        t_factorize=t_factor,
        t_memit_ref=med["memit_ref"],
        t_emmet_ref_after_inverse=med["emmet_ref_after_inverse"],
        rel_delta_memit=rel_delta(R, up_memit.B, memit_reference(C, K)),
        rel_delta_emmet=rel_delta(R, up_emmet.B, emmet_reference_after_inverse(Cinv, K)),
        mu_emmet=up_emmet.diagnostics.mu,
        cond_C=factor.cond,
        cond_G_memit=up_memit.diagnostics.cond_G,
        peak_bytes_memit=peak_rss_increase(ours),
        peak_bytes_memit_ref=peak_rss_increase(lambda: memit_reference(C, K)),
        peak_bytes_emmet_ref_after_inverse=peak_rss_increase(lambda: emmet_reference_after_inverse(Cinv, K)),
        workspace_bytes_memit=up_memit.diagnostics.peak_bytes,
    )


# ---------------------------------------------------------------------------
# (b) factorize vs the libraries
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _openblas() -> ctypes.CDLL:
    """The very library pmsolve._C links (already loaded by pmsolve._native)."""
    lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"))
    p, i32 = ctypes.c_void_p, ctypes.c_int32
    lib.scipy_cblas_dgemm.argtypes = [i32, i32, i32, i32, i32, i32, ctypes.c_double, p, i32, p, i32,
                                      ctypes.c_double, p, i32]  # fmt: skip
    lib.scipy_dpotrf_.argtypes = [ctypes.c_char_p, p, p, p, p, ctypes.c_size_t]
    return lib


def openblas_dgemm(A: np.ndarray, B: np.ndarray, out: np.ndarray) -> None:
    """out = A Bᵀ (row-major) with OpenBLAS 0.3.34's dgemm."""
    m, k = A.shape
    n = B.shape[0]
    RowMajor, NoTrans, Trans = 101, 111, 112
    _openblas().scipy_cblas_dgemm(RowMajor, NoTrans, Trans, m, n, k, 1.0, A.ctypes.data, k, B.ctypes.data, k, 0.0,
                                  out.ctypes.data, n)  # fmt: skip


def openblas_dpotrf(a: np.ndarray) -> int:
    """In-place LAPACK dpotrf of OpenBLAS 0.3.34 (row-major lower = column-major 'U')."""
    n, info = ctypes.c_int32(a.shape[0]), ctypes.c_int32(0)
    _openblas().scipy_dpotrf_(b"U", ctypes.byref(n), a.ctypes.data, ctypes.byref(n), ctypes.byref(info), 1)
    return info.value


def cholesky_kernels(Cn: np.ndarray) -> dict[str, Callable[[], object]]:
    """`_C.cholesky_jittered(Cn)` with each CPU kernel: "recursive" (ours on OpenBLAS),
    "recursive_avx512" (ours on csrc/f64_gemm.h, where the CPU has AVX512-F) and, when an MKL is
    loaded, "mkl_potrf" (csrc/loaded_mkl.h); the switches are restored after each call."""
    mod = native()

    def with_kernel(mkl: bool, avx512: bool) -> Callable[[], object]:
        def run():
            before = mod.mkl_potrf(), mod.f64_gemm()
            mod.mkl_potrf(mkl)
            mod.f64_gemm(avx512)
            try:
                return mod.cholesky_jittered(Cn, [0.0])
            finally:
                mod.mkl_potrf(before[0])
                mod.f64_gemm(before[1])

        return run

    kernels = {"recursive": with_kernel(False, False)}
    if mod.f64_gemm_available():
        kernels["recursive_avx512"] = with_kernel(False, True)
    if mod.loaded_mkl_path():
        kernels["mkl_potrf"] = with_kernel(True, False)
    return kernels


def default_cholesky_kernel() -> str:
    """The cholesky_kernels() name factorize uses by default on this machine."""
    mod = native()
    return "mkl_potrf" if mod.mkl_potrf() else "recursive_avx512" if mod.f64_gemm() else "recursive"


def pmsolve_dgemm(A: np.ndarray, B: np.ndarray, out: np.ndarray) -> Callable[[], object] | None:
    """out −= A Bᵀ on pmsolve's AVX-512 fp64 kernel (the Cholesky's, csrc/f64_gemm.h), the same
    flops as dgemm; None where the CPU lacks AVX512-F."""
    mod = native()
    if not mod.f64_gemm_available():
        return None
    return lambda: mod.f64_gemm_sub(A, B, out)


@pytest.mark.parametrize("d", DIMS)
def test_factorize_vs_libraries(benchmark, d):
    C = problem(d)[0]
    Cn = C.numpy()
    work = np.empty_like(Cn)
    # dgemm at the shape of the recursion's top-level update (d × d × d/2): d³ flops.
    A, B, out = Cn[:, : d // 2].copy(), Cn[:, d // 2 :].copy(), np.empty_like(Cn)
    At, Bt = torch.from_numpy(A), torch.from_numpy(B)

    def dpotrf_0334():
        np.copyto(work, Cn)  # dpotrf works in place; the copy is timed separately and subtracted below
        return openblas_dpotrf(work)

    comp = Competitors(
        {
            **{f"native_{name}": fn for name, fn in cholesky_kernels(Cn).items()},
            "torch_cholesky": lambda: torch.linalg.cholesky(C),
            "scipy_cholesky": lambda: scipy.linalg.cholesky(Cn, lower=True, check_finite=False),
            "openblas_dpotrf": dpotrf_0334,
            "openblas_dgemm": lambda: openblas_dgemm(A, B, out),
            "torch_matmul": lambda: At @ Bt.mT,
            **({"pmsolve_dgemm": pmsolve_dgemm(A, B, out)} if pmsolve_dgemm(A, B, out) else {}),
        },
        prefault_bytes=2 * d * d * 8,  # an output factor, and a copy of C where one is made
    )
    benchmark.group = f"factorize-d{d}"
    t_ours = _run(benchmark, lambda: pmsolve.factorize(C, backend="cpu"), comp, ROUNDS[d])
    med = comp.medians()
    copy = statistics.median(_timed(lambda: np.copyto(work, Cn)) for _ in range(3))
    med["openblas_dpotrf"] -= copy
    flops = d**3 / 3
    gemm_flops = 2 * d * d * (d // 2)
    benchmark.extra_info.update(
        d=d,
        t_factorize=t_ours,
        **{f"t_{k}": v for k, v in med.items()},
        gflops={**{k: flops / v / 1e9 for k, v in med.items() if "gemm" not in k and "matmul" not in k},
                "factorize": flops / t_ours / 1e9,
                **{k: gemm_flops / v / 1e9 for k, v in med.items() if "gemm" in k or "matmul" in k}},  # fmt: skip
        default_kernel=default_cholesky_kernel(),
        peak_bytes_factorize=peak_rss_increase(lambda: pmsolve.factorize(C, backend="cpu")),
        peak_bytes_torch_cholesky=peak_rss_increase(lambda: torch.linalg.cholesky(C)),
    )


@pytest.mark.parametrize("d", DIMS)
def test_cond_estimate_vs_library_solves(benchmark, d):
    """The cpu backend's condition estimate (DLACN2 on _C.spd_apply_inverse) against the same
    iteration on torch's triangular solves (MKL's) and LAPACK's dpocon (OpenBLAS's), same factor.
    Which is faster decides cpu.NATIVE_COND_SOLVES per machine; the estimates must agree."""
    from pmsolve.backends import get_backend
    from pmsolve.backends.torch_backend import hager_cond_1norm

    C = problem(d)[0]
    be = get_backend("cpu", C.device)
    L = be.cholesky_jittered(C, [0.0]).L
    anorm = float(be.symmetric_stats(C).norm1)
    mod = native()
    comp = Competitors({"torch_solves": lambda: hager_cond_1norm(L, anorm),
                        "lapack_dpocon": lambda: mod.cond_estimate(L.numpy(), anorm)})  # fmt: skip
    native_kernel = lambda: be._cond_native(L, anorm)  # noqa: E731
    benchmark.group = f"cond-d{d}"
    t = _run(benchmark, native_kernel, comp, 5)
    med = comp.medians()
    estimates = {"native": native_kernel(), "torch_solves": hager_cond_1norm(L, anorm),
                 "lapack_dpocon": mod.cond_estimate(L.numpy(), anorm)}  # fmt: skip
    benchmark.extra_info.update(d=d, t_native=t, **{f"t_{k}": v for k, v in med.items()},
                                speedup_vs_torch_solves=med["torch_solves"] / t, estimates=estimates)  # fmt: skip
    assert estimates["native"] == pytest.approx(estimates["torch_solves"], rel=1e-6)


@pytest.mark.skipif(4096 not in DIMS, reason="tuning sweep at d = 4096: full runs only")
def test_cholesky_cutoff_sweep(benchmark):
    """Recursion cutoff of the native Cholesky at d = 4096 (the default is _C.CHOLESKY_CUTOFF)."""
    d = 4096
    Cn = problem(d)[0].numpy()
    mod = native()
    cutoffs = (32, 64, 256, 512)
    comp = Competitors({f"cutoff_{c}": functools.partial(mod.cholesky_jittered, Cn, [0.0], c) for c in cutoffs})
    benchmark.group = "cutoff-d4096"
    t = _run(benchmark, lambda: mod.cholesky_jittered(Cn, [0.0]), comp, 3)
    gf = {k: d**3 / 3 / v / 1e9 for k, v in comp.medians().items()}
    gf[f"cutoff_{mod.CHOLESKY_CUTOFF}"] = d**3 / 3 / t / 1e9
    benchmark.extra_info.update(d=d, gflops=dict(sorted(gf.items(), key=lambda kv: int(kv[0].split("_")[1]))))
