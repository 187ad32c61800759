"""The unified PM solver (issue #2): closed forms, backend agreement, degenerate inputs, errors.

Every numerical comparison states its tolerance from first principles: Cholesky,
triangular and SPD solves are backward stable, so a result computed in another
order differs by at most a modest multiple of κ·ε (Higham, Accuracy and Stability
of Numerical Algorithms, §8, §10). Tests that need the compiled core skip (with
the reason) where pmsolve._C does not load.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st

import pmsolve
from pmsolve import settings
from pmsolve._native import native, unavailable_reason
from pmsolve.errors import (
    CacheError,
    ConflictingConstraintsError,
    InputError,
    NotPositiveDefiniteError,
    NumericalWarning,
)

EPS = torch.finfo(torch.float64).eps
F64 = torch.float64
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.native)]


def native_or_skip():
    mod = native()
    if mod is None:
        pytest.skip(f"pmsolve._C unavailable: {unavailable_reason()}")
    return mod


@pytest.fixture(autouse=True)
def _native_for_cpu_params(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cpu":
        native_or_skip()


# ---------------------------------------------------------------------------
# inputs and textbook references
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def spd(d: int, cond: float = 100.0, seed: int = 0) -> torch.Tensor:
    """C = Q diag(s) Qᵀ with eigenvalues log-spaced in [1/cond, 1]·d: a controlled κ₂(C) = cond.

    Cached (QR of a 2048 × 2048 matrix is not free on two cores); callers must not modify it.
    """
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    s = torch.logspace(0, -math.log10(cond), d, dtype=F64) * d
    C = (Q * s) @ Q.mT
    return (C + C.mT) / 2


def keys(d: int, n: int, d_out: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, n, generator=g, dtype=F64), torch.randn(d_out, n, generator=g, dtype=F64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def emmet_ref(C, K, R):
    CiK = torch.linalg.solve(C, K)
    return R @ torch.linalg.solve(K.mT @ CiK, CiK.mT), K.mT @ CiK


def memit_ref(C, K, R, lam):
    # Δ = R Kᵀ (λC + KKᵀ)⁻¹, the reference code's formula (A symmetric, so solve Aᵀ X = K R ᵀ).
    return torch.linalg.solve(lam * C + K @ K.mT, K @ R.mT).mT


def rome_ref(C, k, r):
    Cik = torch.linalg.solve(C, k)
    return r @ Cik.mT / (k.mT @ Cik)


def kappa(A: torch.Tensor) -> float:
    """κ₂ of a symmetric positive definite matrix (eigvalsh: far cheaper than an SVD)."""
    ev = torch.linalg.eigvalsh(A)
    return float(ev[-1] / ev[0]) if ev[0] > 0 else math.inf


def cond_tol(*conds: float, c: float = 1e3) -> float:
    """c·ε·Σκ: the forward-error bound of two backward-stable evaluations in different orders.

    B = C⁻¹K(G + μI)⁻¹ passes through both factorisations, so the condition numbers add;
    c = 1e3 covers the dimension-dependent constants at d ≤ 2048 (observed errors sit
    one to two orders of magnitude below it).
    """
    return c * EPS * max(1.0, sum(conds))


# ---------------------------------------------------------------------------
# closed forms
# ---------------------------------------------------------------------------

SHAPES = [(8, 1), (8, 4), (64, 1), (64, 13), (64, 32), (300, 1), (300, 150), (2048, 1), (2048, 1024)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,n", SHAPES)
def test_methods_match_textbook_closed_forms(backend, d, n):
    kC = 1e3
    C = spd(d, cond=kC, seed=d)
    K, R = keys(d, n, seed=n)
    f = pmsolve.factorize(C, backend=backend)
    ref, G = emmet_ref(C, K, R)
    kG = kappa(G)
    up = pmsolve.solve(f, K, R, method="emmet", backend=backend)
    assert rel(up.dense(), ref) <= cond_tol(kC, kG)
    assert up.diagnostics.residual <= cond_tol(kC, kG)
    lam = float(torch.diagonal(G).mean())  # λ of the order of G: a genuinely least-squares solve
    up = pmsolve.solve(f, K, R, method="memit", mu=lam, backend=backend)
    # The reference solves with λC + KKᵀ: λmin ≥ λ·λmin(C) = λd/κ_C, λmax ≤ λd + ‖K‖²_F.
    k_ref = kC + float(K.norm()) ** 2 / (lam * d / kC)
    assert rel(up.dense(), memit_ref(C, K, R, lam)) <= cond_tol(kC, kG, k_ref)
    if n == 1:
        up = pmsolve.solve(f, K, R, method="rome", backend=backend)
        assert rel(up.dense(), rome_ref(C, K, R)) <= cond_tol(kC)
        assert rel(up.dense(), ref) <= cond_tol(kC)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rome_equals_emmet_for_one_edit(backend):
    C = spd(96, seed=3)
    K, R = keys(96, 1)
    f = pmsolve.factorize(C, backend=backend)
    a = pmsolve.solve(f, K, R, method="rome", backend=backend)
    b = pmsolve.solve(f, K, R, method="emmet", backend=backend)
    assert torch.equal(a.B, b.B)  # same formula, same μ = 0, same kernels: bit for bit


@pytest.mark.parametrize("backend", BACKENDS)
def test_memit_tends_to_emmet_as_lambda_vanishes(backend):
    C = spd(128, seed=4)
    K, R = keys(128, 16)
    f = pmsolve.factorize(C, backend=backend)
    emmet = pmsolve.solve(f, K, R, method="emmet", backend=backend).dense()
    G = K.mT @ torch.linalg.solve(C, K)
    lam_min = float(torch.linalg.eigvalsh(G)[0])
    errs = []
    for lam in (1e-1, 1e-3, 1e-5, 1e-7):
        memit = pmsolve.solve(f, K, R, method="memit", mu=lam * lam_min, backend=backend).dense()
        errs.append(rel(memit, emmet))
        # (G + μI)⁻¹ - G⁻¹ = -μ G⁻¹ (G + μI)⁻¹: first order in μ/λmin(G), up to κ(G) amplification.
        assert errs[-1] <= 2 * lam * kappa(G)
    # First order: each 100× smaller λ gives a ~100× smaller difference.
    assert all(b <= a / 50 for a, b in zip(errs, errs[1:]))


# ---------------------------------------------------------------------------
# native vs torch
# ---------------------------------------------------------------------------


@pytest.mark.native
@pytest.mark.parametrize("d,n", [(16, 3), (200, 1), (200, 100), (1024, 256)])
def test_cpu_matches_torch_on_well_conditioned_inputs(d, n, cholesky_kernel):
    native_or_skip()
    C = spd(d, cond=10, seed=d)  # κ(C) = 10 and Gaussian K (n ≤ d/2): κ(G) ≲ 1e2
    K, R = keys(d, n)
    ft, fc = pmsolve.factorize(C, backend="torch"), pmsolve.factorize(C, backend="cpu")
    # 1e3·ε·(κ_C + κ_G) ≈ 2.5e-11 < 1e-10: the bound holds with room.
    assert rel(fc.L, ft.L) <= 1e-10
    assert fc.cond == pytest.approx(ft.cond, rel=1e-10)  # same DLACN2 iteration, same L up to rounding
    for method, mu in (("emmet", None), ("memit", 10.0)):
        ut = pmsolve.solve(ft, K, R, method=method, mu=mu, backend="torch")
        uc = pmsolve.solve(fc, K, R, method=method, mu=mu, backend="cpu")
        assert rel(uc.B, ut.B) <= 1e-10
        assert uc.diagnostics.mu == ut.diagnostics.mu
        assert uc.diagnostics.cond_G == pytest.approx(ut.diagnostics.cond_G, rel=1e-10)
        assert uc.diagnostics.preservation_cost == pytest.approx(ut.diagnostics.preservation_cost, rel=1e-10)


@pytest.mark.native
@pytest.mark.parametrize("cond", [1e6, 1e9])
def test_cpu_matches_torch_on_ill_conditioned_C(cond, cholesky_kernel):
    native_or_skip()
    d, n = 300, 40
    C = spd(d, cond=cond, seed=7)
    K, R = keys(d, n)
    ft, fc = pmsolve.factorize(C, backend="torch"), pmsolve.factorize(C, backend="cpu")
    ut = pmsolve.solve(ft, K, R, backend="torch")
    uc = pmsolve.solve(fc, K, R, backend="cpu")
    kG = kappa(K.mT @ torch.linalg.solve(C, K))
    # Both are κ·ε-accurate; the difference of two such results is within the sum of their bounds.
    assert rel(uc.B, ut.B) <= 2 * cond_tol(cond, kG)
    assert rel(fc.L, ft.L) <= 2 * cond_tol(cond ** 0.5)  # Cholesky's factor error scales with κ^{1/2}


@pytest.mark.native
def test_native_kernels_accept_any_layout_without_copies():
    mod = native_or_skip()
    C = spd(150, seed=5)
    L_ref = torch.linalg.cholesky(C)  # torch returns it column-major
    for view in (C, C.mT, torch.tril(C)):  # only the lower triangle is read
        L, k = mod.cholesky_jittered(view.numpy(), [0.0])
        assert k == 0 and rel(torch.from_numpy(L), L_ref) <= 1e-13
    L32, _ = mod.cholesky_jittered(C.to(torch.float32).numpy(), [0.0])
    assert rel(torch.from_numpy(L32), torch.linalg.cholesky(C.to(torch.float32).to(F64))) <= 1e-13
    K, _ = keys(150, 5)
    row = mod.pm_solve(L_ref.contiguous().numpy(), K.numpy(), [0.0], 1e12)
    col = mod.pm_solve(L_ref.numpy(), K.numpy(), [0.0], 1e12)
    assert not L_ref.is_contiguous() and rel(torch.from_numpy(col[0]), torch.from_numpy(row[0])) <= 1e-13
    with pytest.raises(TypeError, match="float64"):
        mod.pm_solve(L_ref.numpy(), K.to(torch.float32).numpy(), [0.0], 1e12)
    with pytest.raises(ValueError, match="C-contiguous"):
        mod.pm_solve(L_ref.numpy(), K.mT.contiguous().mT.numpy(), [0.0], 1e12)
    with pytest.raises(ValueError, match="rows"):
        mod.pm_solve(L_ref.numpy(), K[:10].numpy(), [0.0], 1e12)


def _peak_rss_increase(fn) -> tuple[object, int]:
    """(fn(), bytes by which the call raised the process's peak RSS): sees torch's allocations too."""
    import gc

    def kib(key: str) -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = kib("VmRSS")
    out = fn()
    return out, (kib("VmHWM") - before) * 1024


@pytest.mark.native
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("n", [1, 16])
def test_pm_solve_allocates_no_d_by_d_memory(layout, n):
    """Neither the triangular solves (torch's for n = 1, native for n = 16) nor the n × n work
    copy the d × d factor, whichever its storage order (ours is row-major,
    torch.linalg.cholesky's column-major)."""
    native_or_skip()
    from pmsolve.backends import cpu, get_backend

    assert 1 < cpu.NATIVE_TRSM_MIN_N <= 16  # the two cases take the two paths
    be = get_backend("cpu", torch.device("cpu"))
    d = 2048
    C = spd(d, seed=2)
    L = pmsolve.factorize(C, backend="cpu").L
    L = L.contiguous() if layout == "row" else L.mT.contiguous().mT
    K, _ = keys(d, n)
    be.pm_solve(L, K, [0.0], 1e12)  # warm-up: first-call allocations of the libraries
    sol, peak = _peak_rss_increase(lambda: be.pm_solve(L, K, [0.0], 1e12))
    assert sol.mu_index == 0
    assert peak < d * d * 8 // 4, peak  # a copy of L would add 32 MiB; Z, B, G, M are ~0.5 MiB
    assert sol.workspace_bytes < d * d * 8


@pytest.mark.native
@pytest.mark.parametrize("n", [4, 64])
def test_pm_solve_is_the_same_through_either_route(monkeypatch, n):
    """The native route (recursive solves, the n × n work on OpenBLAS) and the torch route (the
    torch backend's solve, whole; the default on Intel CPUs) give the same B, G: both are backward
    stable, so they agree to about d·κ(C)·eps = 512·100·2.2e-16 ≈ 1e-11; we allow 1e-10. The
    torch route is exactly the torch backend's result."""
    native_or_skip()
    from pmsolve.backends import cpu, get_backend
    from pmsolve.backends.torch_backend import TorchBackend

    be = get_backend("cpu", torch.device("cpu"))
    d = 512
    L = pmsolve.factorize(spd(d, seed=3), backend="cpu").L
    K, _ = keys(d, n)
    native = be.pm_solve(L, K, [0.0], 1e12)
    monkeypatch.setattr(cpu, "NATIVE_TRSM_MIN_N", sys.maxsize)
    via_torch = be.pm_solve(L, K, [0.0], 1e12)
    oracle = TorchBackend().pm_solve(L, K, [0.0], 1e12)
    assert torch.equal(via_torch.B, oracle.B) and via_torch.cond == oracle.cond
    assert native.mu_index == via_torch.mu_index == 0
    for a, b in ((native.B, via_torch.B), (native.G, via_torch.G)):
        assert float((a - b).norm() / b.norm()) < 1e-10


@pytest.mark.native
def test_blas_threads_follow_torch():
    mod = native_or_skip()
    from pmsolve.backends import get_backend

    be = get_backend("cpu", torch.device("cpu"))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        be.cond_estimate(torch.eye(4, dtype=F64), 1.0)
        assert mod.blas_get_num_threads() == 1
        torch.set_num_threads(old)
        be.cond_estimate(torch.eye(4, dtype=F64), 1.0)
        assert mod.blas_get_num_threads() == old
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------
# degenerate inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_units_get_jitter_reported(backend, cholesky_kernel):
    d = 64
    g = torch.Generator().manual_seed(0)
    K0 = torch.randn(d, 4 * d, generator=g, dtype=F64)
    dead = [3, 17, 40]
    K0[dead] = 0  # dead MLP units: zero rows and columns in C
    C = K0 @ K0.mT / K0.shape[1]
    with pytest.warns(NumericalWarning, match="singular"):
        f = pmsolve.factorize(C, backend=backend)
    assert f.jitter > 0 and f.jitter_relative == pytest.approx(f.jitter / f.scale)
    with pytest.warns(NumericalWarning):
        ref = pmsolve.factorize(C, backend="torch")
    assert f.jitter == ref.jitter  # same schedule, same first success
    K, R = keys(d, 5)
    K[dead] = 0  # a dead unit is zero on edit keys too
    up = pmsolve.solve(f, K, R, backend=backend)
    assert up.diagnostics.jitter == f.jitter and up.diagnostics.residual < 1e-8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("n", [5, 12])  # fewer and more edits than d_out = 7 (two routes for δ's term)
@pytest.mark.parametrize("method", ["emmet", "memit"])
def test_preservation_cost_is_the_dense_trace(backend, dead, n, method):
    """diagnostics.preservation_cost is tr(Δ C Δᵀ) with the C given (δ not included), against the
    dense product in fp64. With dead units C is singular; a fixed δ of 5 % of mean(diag C) makes
    δ's share of the cost large enough that leaving it in would fail. Tolerance: cond_tol with
    κ(C + δI) and κ(G + μI), which bound the forward error of B, and so of the quadratic form,
    on both sides."""
    d = 96
    g = torch.Generator().manual_seed(n)
    K0 = torch.randn(d, 3 * d, generator=g, dtype=F64)
    if dead:
        K0[[5, 50]] = 0
    C = K0 @ K0.mT / K0.shape[1]
    jitter = 0.05 * float(torch.diagonal(C).mean()) if dead else None
    f = pmsolve.factorize(C, jitter=jitter, backend=backend)
    assert (f.jitter > 0) == dead
    K, R = keys(d, n, seed=n + 1)
    if dead:
        K[[5, 50]] = 0
    up = pmsolve.solve(f, K, R, method=method, mu=None if method == "emmet" else 0.5, backend=backend)
    D = up.dense()
    truth = float(torch.trace(D @ C @ D.mT))
    Cd = C + f.jitter * torch.eye(d, dtype=F64)
    G = K.mT @ torch.linalg.solve(Cd, K)
    tol = cond_tol(kappa(Cd), kappa(G + up.diagnostics.mu * torch.eye(n, dtype=F64)))
    assert up.diagnostics.preservation_cost == pytest.approx(truth, rel=tol)
    assert truth > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,cutoff", [(64, None), (300, 64), (700, 128), (1500, None)])
def test_factorize_overwrite_c_equals_the_copying_path(backend, d, cutoff, cholesky_kernel):
    """overwrite_c factors in C's own storage: bit for bit the factor of the copying path
    (same kernel, same data), also when a first attempt fails and jitter is needed (the
    lower triangle is reloaded from the mirrored upper one); recursion levels exercised with
    small cutoffs. The returned factor *is* C."""
    g = torch.Generator().manual_seed(d)
    K0 = torch.randn(d, 3 * d, generator=g, dtype=F64)
    K0[[1, d // 2]] = 0  # dead units: singular, the first attempt fails
    singular = K0 @ K0.mT / K0.shape[1]
    singular = (singular + singular.mT) / 2  # exactly symmetric: its upper triangle is the backup as it is
    nearly = singular.clone()
    nearly[d - 1, 0] *= 1 + 1e-13  # symmetric within symmetry_rtol only: the kernel mirrors first
    cases = {"spd": spd(d, cond=1e4, seed=3).clone(), "singular": singular, "singular, nearly symmetric": nearly}
    for name, C in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumericalWarning)
            ref = pmsolve.factorize(C, backend=backend)
            if cutoff is not None and backend == "cpu":  # the kernel itself, below its default cutoff
                mod = native_or_skip()
                work = C.clone()
                L_ref, k_ref = mod.cholesky_jittered(C.numpy(), [0.0, ref.jitter], cutoff)
                k_in = mod.cholesky_jittered_inplace(work.numpy(), [0.0, ref.jitter], cutoff)
                assert k_in == k_ref and torch.equal(work, torch.from_numpy(L_ref)), name
            work = C.clone()
            got = pmsolve.factorize(work, backend=backend, overwrite_c=True)
        assert got.L.data_ptr() == work.data_ptr(), name
        assert got.jitter == ref.jitter and (got.jitter > 0) == name.startswith("singular"), name
        assert torch.equal(got.L, ref.L), name
        assert got.cond == pytest.approx(ref.cond, rel=1e-12), name


@pytest.mark.native
def test_native_cholesky_into_a_given_buffer():
    """`out=` receives exactly the factor the kernel would allocate; a buffer of the wrong
    shape, dtype or layout, or C itself, is refused before anything is written."""
    mod = native_or_skip()
    C = spd(300, seed=5)
    L_new, k_new = mod.cholesky_jittered(C.numpy(), [0.0], 64)
    out = torch.full((300, 300), math.nan, dtype=F64)
    ret, k = mod.cholesky_jittered(C.numpy(), [0.0], 64, out=out.numpy())
    assert k == k_new == 0 and torch.equal(out, torch.from_numpy(L_new)) and torch.equal(torch.from_numpy(ret), out)
    work = C.clone()
    for bad in (torch.empty(300, 299, dtype=F64), torch.empty(300, 300), torch.empty(300, 300, dtype=F64).mT, work):
        with pytest.raises((ValueError, TypeError)):
            mod.cholesky_jittered(work.numpy(), [0.0], out=bad.numpy())
    assert torch.equal(work, C)
    # out_zeroed: a buffer known to hold zeros gets the lower triangle only, also across a failed
    # first attempt (a dead unit: only the shift works); the result is the same factor.
    singular = C.clone()
    singular[:, 7] = singular[7, :] = 0
    for M, shifts in ((C, [0.0]), (singular, [0.0, 1e-3])):
        L_ref, k_ref = mod.cholesky_jittered(M.numpy(), shifts)
        zeros = torch.zeros(300, 300, dtype=F64)
        _, k = mod.cholesky_jittered(M.numpy(), shifts, out=zeros.numpy(), out_zeroed=True)
        assert k == k_ref and torch.equal(zeros, torch.from_numpy(L_ref))
    with pytest.raises(ValueError, match="out_zeroed needs out"):
        mod.cholesky_jittered(C.numpy(), [0.0], out_zeroed=True)


@pytest.mark.native
def test_inplace_cholesky_takes_an_exactly_symmetric_upper_triangle_as_its_backup(cholesky_kernel):
    """symmetric=True skips mirroring the lower triangle onto the upper one (the retry backup): for
    an exactly symmetric C the result is bit for bit the mirroring path's, a retry after a failed
    first attempt included, and when every shift fails C comes back exactly."""
    mod = native_or_skip()
    d = 300
    C = spd(d, seed=6)
    C = (C + C.mT) / 2
    singular = C.clone()
    singular[:, 5] = singular[5, :] = 0
    shifts = [0.0, 1e-3 * float(C.diagonal().mean())]
    for M in (C, singular):
        a, b = M.clone(), M.clone()
        k = mod.cholesky_jittered_inplace(a.numpy(), shifts)
        assert k == mod.cholesky_jittered_inplace(b.numpy(), shifts, symmetric=True) == (0 if M is C else 1)
        assert torch.equal(a, b)
    indefinite = C.clone()
    indefinite[7, 7] = -1.0
    work = indefinite.clone()
    assert mod.cholesky_jittered_inplace(work.numpy(), [0.0, 1e-6], symmetric=True) == -1
    assert torch.equal(work, indefinite)


@pytest.mark.native
@pytest.mark.parametrize("d,cond,cutoff", [(1, 1.0, 1024), (7, 1e3, 1024), (1100, 1e2, 1024), (1100, 1e8, 1024),
                                           (2100, 1e4, 1024), (333, 1e6, 24), (700, 1e3, 100)])  # fmt: skip
def test_the_cpu_cholesky_kernels_agree(d, cond, cutoff):
    """Our recursion on OpenBLAS (trsm + gemmt levels above the cutoff), the same recursion on
    the AVX-512 fp64 kernel (recursive trsm and trailing updates on csrc/f64_gemm.cpp) and MKL's
    dpotrf (found in the process) give the same factor up to rounding (Cholesky's forward error
    scales with κ^{1/2}), each with an exactly zero upper triangle, and the same verdicts when C
    is singular or indefinite. Small cutoffs force deep recursions with ragged halves."""
    mod = native_or_skip()
    kernels = ["openblas"]
    if mod.f64_gemm_available():
        kernels.append("avx512")
    if mod.loaded_mkl_path():
        kernels.append("mkl")
    if len(kernels) == 1:
        pytest.skip("neither MKL in this process nor AVX512-F: one CPU Cholesky kernel")
    pmsolve.backends.get_backend("cpu", torch.device("cpu"))
    before = mod.mkl_potrf(), mod.f64_gemm()
    C = spd(d, cond=cond, seed=d) if d > 1 else torch.tensor([[2.5]], dtype=F64)
    singular = C.clone()
    singular[:, d // 2] = singular[d // 2, :] = 0  # a dead unit: only a shift makes it PD
    indefinite = C.clone()
    indefinite[d - 1, d - 1] = -1.0
    got = {}
    try:
        for kernel in kernels:
            mod.mkl_potrf(kernel == "mkl")
            mod.f64_gemm(kernel == "avx512")
            L, k = mod.cholesky_jittered(C.numpy(), [0.0], cutoff)
            assert k == 0 and torch.equal(torch.from_numpy(L).triu(1), torch.zeros(d, d, dtype=F64))
            k_sing = mod.cholesky_jittered(singular.numpy(), [0.0, 1e-3 * float(C.diagonal().mean())], cutoff)[1]
            k_indef = mod.cholesky_jittered(indefinite.numpy(), [0.0], cutoff)[1]
            got[kernel] = (torch.from_numpy(L), k_sing, k_indef)
    finally:
        mod.mkl_potrf(before[0])
        mod.f64_gemm(before[1])
    reference = torch.linalg.cholesky(C)
    for kernel in kernels:
        assert rel(got[kernel][0], got["openblas"][0]) <= 2 * cond_tol(cond**0.5), kernel
        assert rel(got[kernel][0], reference) <= 2 * cond_tol(cond**0.5), kernel
        assert got[kernel][1:] == (1, -1), kernel


def test_mkl_potrf_choice_follows_the_environment(monkeypatch):
    from pmsolve import switches

    monkeypatch.setenv("PMSOLVE_MKL_POTRF", "0")
    assert switches.toggle("PMSOLVE_MKL_POTRF").value is False
    monkeypatch.setenv("PMSOLVE_MKL_POTRF", "1")
    assert switches.toggle("PMSOLVE_MKL_POTRF").value is True
    monkeypatch.delenv("PMSOLVE_MKL_POTRF")
    assert switches.toggle("PMSOLVE_MKL_POTRF").value == (switches.cpu_vendor() == "GenuineIntel")
    mod = native()
    if mod is not None and torch.backends.mkl.is_available():
        assert mod.loaded_mkl_path(), "torch reports MKL, but no loaded object exports MKL's dpotrf_"


@pytest.mark.parametrize("backend", BACKENDS)
def test_factorize_overwrite_c_leaves_c_usable_when_it_fails(backend, cholesky_kernel):
    """Bad input is refused before C is touched; an indefinite C (no jitter helps) comes back
    exactly (it was symmetric); a C that cannot hold an fp64 factor is a typed error."""
    d = 96
    C = spd(d, seed=4).clone()
    C[5, 5] = -C[5, 5]  # negative diagonal: rejected by the checks
    before = C.clone()
    with pytest.raises(NotPositiveDefiniteError):
        pmsolve.factorize(C, backend=backend, overwrite_c=True)
    assert torch.equal(C, before)
    C = spd(d, seed=4).clone()
    C[0, 1] = C[1, 0] = 10 * C.diagonal().mean()  # a 2 × 2 minor far from PSD: every jitter fails
    before = C.clone()
    with pytest.raises(NotPositiveDefiniteError, match="indefinite"):
        pmsolve.factorize(C, backend=backend, overwrite_c=True)
    assert torch.equal(C, before)
    C[0, 1] = math.nan
    with pytest.raises(InputError, match="NaN"):
        pmsolve.factorize(C, backend=backend, overwrite_c=True)
    before[0, 1] = 7.0
    assert torch.equal(C.nan_to_num(nan=7.0), before)
    for bad in (spd(d).float(), spd(d).mT, spd(d)[::2, ::2]):  # (spd is cached: these must stay intact)
        with pytest.raises(InputError, match="overwrite_c"):
            pmsolve.factorize(bad, backend=backend, overwrite_c=True)


def _dup_keys(d: int, eps: float, consistent: bool):
    K, R = keys(d, 6, seed=11)
    g = torch.Generator().manual_seed(12)
    K[:, 4] = K[:, 1] + eps * torch.randn(d, generator=g, dtype=F64) * K[:, 1].norm() / d**0.5
    R[:, 4] = R[:, 1] if consistent else R[:, 1] + 1.0
    return K, R


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-9])
def test_consistent_duplicate_keys_get_a_reported_ridge(backend, eps):
    C = spd(80, seed=8)
    K, R = _dup_keys(80, eps, consistent=True)
    f = pmsolve.factorize(C, backend=backend)
    with pytest.warns(NumericalWarning, match="ridge"):
        up = pmsolve.solve(f, K, R, backend=backend)
    d = up.diagnostics
    assert d.ridge_fallback and d.mu > 0 and d.cond_G <= settings.get("max_cond")
    # The two constraints say the same thing: the ridge costs only O(μ/λ) of the memorization.
    assert d.residual < 1e-6
    if backend == "cpu":
        with pytest.warns(NumericalWarning):
            ref = pmsolve.solve(f, K, R, backend="torch")
        # The ridge unit is mean(diag G) of each backend's own G: equal up to rounding.
        assert ref.diagnostics.mu == pytest.approx(d.mu, rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-9])
def test_conflicting_duplicate_keys_name_the_columns(backend, eps):
    C = spd(80, seed=8)
    K, R = _dup_keys(80, eps, consistent=False)
    f = pmsolve.factorize(C, backend=backend)
    with pytest.raises(ConflictingConstraintsError, match=r"\[1, 4\]") as exc:
        pmsolve.solve(f, K, R, backend=backend)
    assert exc.value.columns == [[1, 4]]
    # Least squares has no such problem.
    up = pmsolve.solve(f, K, R, method="memit", mu=1.0, backend=backend)
    assert torch.isfinite(up.B).all()


@given(
    d=st.integers(4, 48),
    frac=st.floats(0.05, 0.5),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["emmet", "rome"]),
)
@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_equality_methods_memorize_exactly(d, frac, seed, method):
    n = 1 if method == "rome" else max(1, int(frac * d))
    C = spd(d, cond=100, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    W0 = torch.randn(5, d, generator=g, dtype=F64)
    K = torch.randn(d, n, generator=g, dtype=F64)
    V = torch.randn(5, n, generator=g, dtype=F64)
    assume(kappa(K.mT @ torch.linalg.solve(C, K)) < 1e6)  # "well conditioned"
    for backend in pmsolve.available_backends():
        up = pmsolve.solve(pmsolve.factorize(C, backend=backend), K, V - W0 @ K, method=method, backend=backend)
        W = W0.clone()
        up.apply_(W)
        assert rel(W @ K, V) <= 1e-8
        assert up.diagnostics.residual <= 1e-8


# ---------------------------------------------------------------------------
# bad input -> typed errors
# ---------------------------------------------------------------------------


@pytest.mark.native
@pytest.mark.parametrize("d", [1, 65, 300, 701])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_native_symmetric_stats_match_torch(d, dtype):
    """The native one-pass check (threaded above d = 256) against the torch one, on
    contiguous, transposed and strided views of an asymmetric matrix."""
    native_or_skip()
    from pmsolve.backends import get_backend
    from pmsolve.backends.torch_backend import symmetric_stats_torch

    cpu = get_backend("cpu", torch.device("cpu"))
    g = torch.Generator().manual_seed(d)
    big = torch.randn(2 * d, 2 * d, generator=g, dtype=F64).to(dtype)
    for C in (big[:d, :d], big[:d, :d].mT, big[::2, ::2]):
        a, b = cpu.symmetric_stats(C), symmetric_stats_torch(C)
        ref = C.to(F64)
        # Column sums are summed in another order: a few ulps of the norm, scaled by d.
        assert a.norm1 == pytest.approx(b.norm1, rel=4 * d * EPS)
        assert a.norm1 == pytest.approx(float(ref.abs().sum(0).max()), rel=4 * d * EPS)
        assert a.amax == b.amax == float(ref.abs().max())
        assert a.asym == b.asym == float((ref - ref.mT).abs().max())
        i, j = a.asym_at
        assert i >= j and abs(float(ref[i, j] - ref[j, i])) == a.asym
        assert (a.diag_min, a.diag_min_at) == (b.diag_min, b.diag_min_at)
        assert a.nonfinite_at is None and b.nonfinite_at is None
    if d > 2:
        bad = big[:d, :d].clone()
        bad[d - 1, 0] = float("nan")  # later in row-major order than the two below
        bad[1, d - 1] = float("-inf")
        bad[2, 0] = float("inf")
        assert cpu.symmetric_stats(bad).nonfinite_at == symmetric_stats_torch(bad).nonfinite_at == (1, d - 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_C_raises_typed_errors(backend):
    C = spd(10)
    bad = C.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(InputError, match="NaN or Inf.*\\(2, 3\\)"):
        pmsolve.factorize(bad, backend=backend)
    bad[2, 3] = float("inf")
    with pytest.raises(InputError, match="NaN or Inf"):
        pmsolve.factorize(bad, backend=backend)
    with pytest.raises(InputError, match="square"):
        pmsolve.factorize(C[:, :9], backend=backend)
    with pytest.raises(InputError, match="2-D"):
        pmsolve.factorize(C[0], backend=backend)
    with pytest.raises(InputError, match="floating"):
        pmsolve.factorize(C.to(torch.int64), backend=backend)
    with pytest.raises(InputError, match="torch.Tensor"):
        pmsolve.factorize(C.numpy(), backend=backend)
    asym = C.clone()
    asym[0, 5] += 1.0
    with pytest.raises(InputError, match="not symmetric"):
        pmsolve.factorize(asym, backend=backend)
    indefinite = torch.eye(10, dtype=F64)
    indefinite[0, 1] = indefinite[1, 0] = 2.0  # eigenvalues -1 and 3, positive diagonal
    with pytest.raises(NotPositiveDefiniteError, match="indefinite"):
        pmsolve.factorize(indefinite, backend=backend)
    with pytest.raises(NotPositiveDefiniteError, match="negative diagonal"):
        pmsolve.factorize(-C, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_keys_raise_typed_errors(backend):
    d = 12
    f = pmsolve.factorize(spd(d), backend=backend)
    K, R = keys(d, 3)
    for name, args in {
        "K contains NaN or Inf": (K.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan"), dtype=F64)), R),
        "R contains NaN or Inf": (K, R.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(float("-inf"), dtype=F64))),
        "rows": (K[:5], R),
        "columns": (K, R[:, :2]),
        "floating": (K.to(torch.int32), R),
        "2-D": (K[:, 0], R),
        "no columns": (K[:, :0], R[:, :0]),
    }.items():
        with pytest.raises(InputError, match=name):
            pmsolve.solve(f, *args, backend=backend)
    with pytest.raises(InputError, match="at most 12"):
        pmsolve.solve(f, *keys(d, d + 1), method="emmet", backend=backend)
    pmsolve.solve(f, *keys(d, d + 1), method="memit", backend=backend)  # least squares: allowed
    with pytest.raises(InputError, match="n = 1"):
        pmsolve.solve(f, K, R, method="rome", backend=backend)
    with pytest.raises(InputError, match="method"):
        pmsolve.solve(f, K, R, method="alphaedit", backend=backend)
    with pytest.raises(InputError, match="mu"):
        pmsolve.solve(f, K, R, method="memit", mu=-1.0, backend=backend)
    with pytest.raises(InputError, match="pmsolve.Factor"):
        pmsolve.solve(f.L, K, R, backend=backend)
    with pytest.raises(InputError, match="unknown backend"):
        pmsolve.solve(f, K, R, backend="fortran")


# ---------------------------------------------------------------------------
# factor cache, updates, condition estimates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_factor_save_load_roundtrip_and_corruption(backend, tmp_path):
    f = pmsolve.factorize(spd(40, seed=9).to(torch.float32), backend=backend)
    path = tmp_path / "layer4.factor"
    f.save(path)
    g = pmsolve.Factor.load(path)
    assert torch.equal(g.L, f.L) and g.summary() == f.summary() and g.dtype == torch.float32
    data = path.read_bytes()
    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="unreadable or truncated"):
        pmsolve.Factor.load(tmp_path / "trunc")
    with pytest.raises(CacheError, match="does not exist"):
        pmsolve.Factor.load(tmp_path / "missing")
    torch.save([1, 2], tmp_path / "list")
    with pytest.raises(CacheError, match="not a pmsolve factor file"):
        pmsolve.Factor.load(tmp_path / "list")
    torch.save({"format": "pmsolve.factor/1", "L": f.L}, tmp_path / "nosummary")
    with pytest.raises(CacheError, match="incomplete"):
        pmsolve.Factor.load(tmp_path / "nosummary")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_update_apply_in_both_layouts(dtype):
    C = spd(30, seed=10)
    K, R = keys(30, 4, d_out=20)
    up = pmsolve.solve(pmsolve.factorize(C, backend="torch"), K, R, backend="torch")
    W = torch.randn(20, 30, dtype=dtype)
    expected = (W.to(F64) + up.dense()).to(dtype)
    # Rounded once, whatever the blocking: at most one ulp from the fp64 reference
    # (the GEMMs of U Bᵀ and B Uᵀ may sum their n = 4 terms in different orders).
    ulp = 2 * torch.finfo(dtype).eps * float(expected.abs().max())
    assert (up.apply_(W.clone(), block_rows=7) - expected).abs().max() <= ulp
    assert (up.apply_(W.mT.contiguous(), layout="in_out", block_rows=7) - expected.mT).abs().max() <= ulp
    with pytest.raises(InputError, match="layout"):
        up.apply_(W.clone(), layout="xy")
    with pytest.raises(InputError, match="shape"):
        up.apply_(W.mT.contiguous())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cond", [1.0, 1e3, 1e8])
def test_cond_estimate_is_a_tight_lower_bound(backend, cond):
    C = spd(120, cond=cond, seed=int(cond) % 97)
    f = pmsolve.factorize(C, backend=backend, jitter=None)
    true = float(torch.linalg.cond(C, 1))
    # DPOCON's estimate is a lower bound up to the rounding of the solves it does (κ·ε relative).
    assert f.cond <= true * (1 + 1e3 * EPS * cond)
    assert f.cond >= true / 10


@pytest.mark.native
@pytest.mark.parametrize("cond", [1.0, 1e3, 1e8])
def test_lapack_dpocon_equals_the_hager_iteration(cond):
    """_C.cond_estimate (LAPACK dpocon) and hager_cond_1norm (DLACN2 step for step on torch's
    solves, which the cpu backend uses) agree up to the rounding of the solves, on a row-major
    and a column-major factor."""
    mod = native_or_skip()
    from pmsolve.backends.torch_backend import hager_cond_1norm

    C = spd(150, cond=cond, seed=5)
    anorm = float(C.abs().sum(0).max())
    for L in (torch.linalg.cholesky(C), torch.linalg.cholesky(C).contiguous()):
        want = hager_cond_1norm(L, anorm)
        got = mod.cond_estimate(L.numpy() if L.is_contiguous() else L.mT.contiguous().mT.numpy(), anorm)
        assert got == pytest.approx(want, rel=1e3 * EPS * cond)


@pytest.fixture(params=["openblas", "avx512"])
def gemm_kernel(request):
    """The native triangular solves' GEMMs on OpenBLAS or on the AVX-512 fp64 kernel
    (csrc/f64_gemm.h; the default where OpenBLAS's kernels lack AVX-512, from 16 columns)."""
    mod = native_or_skip()
    if request.param == "avx512" and not mod.f64_gemm_available():
        pytest.skip("the CPU lacks AVX512-F")
    before = mod.f64_gemm()
    mod.f64_gemm(request.param == "avx512")
    yield request.param
    mod.f64_gemm(before)


@pytest.mark.native
@pytest.mark.parametrize("d,n,cutoff", [(1, 1, 1), (9, 4, 2), (300, 1, 8), (300, 17, 64), (700, 33, 256),
                                        (517, 100, 40)])  # fmt: skip
@pytest.mark.parametrize("cond", [1e2, 1e8])
def test_native_triangular_solve_matches_torch(d, n, cutoff, cond, gemm_kernel):
    """_C.triangular_solve (recursive halving onto GEMM) against torch.linalg.solve_triangular,
    both directions, row- and column-major factors; small cutoffs force deep recursion with odd
    splits. Two backward-stable triangular solves differ by at most c·ε·κ(L), κ(L) = √κ(C)."""
    mod = native_or_skip()
    C = spd(d, cond=cond, seed=9)
    L = torch.linalg.cholesky(C)  # column-major storage
    g = torch.Generator().manual_seed(d + n)
    for factor in (L, L.contiguous()):
        arr = factor.numpy() if factor.is_contiguous() else factor.mT.contiguous().mT.numpy()
        for transpose in (False, True):
            K = torch.randn(d, n, generator=g, dtype=F64)
            want = torch.linalg.solve_triangular(L.mT if transpose else L, K, upper=transpose)
            Z = K.clone()
            mod.triangular_solve(arr, Z.numpy(), transpose, cutoff)
            assert rel(Z, want) <= cond_tol(math.sqrt(cond)), (transpose, factor.is_contiguous())


@pytest.mark.native
@pytest.mark.parametrize("n,rows,leaf", [(1, 1, 1), (9, 5, 2), (40, 300, 8), (100, 7, 16), (300, 130, 64),
                                         (517, 200, 256)])  # fmt: skip
@pytest.mark.parametrize("cond", [1e2, 1e8])
def test_native_right_triangular_solve_matches_torch(n, rows, leaf, cond):
    """_C.f64_trsm_right (X := X·L⁻ᵀ or X·L⁻¹ by recursive halving onto the AVX-512 kernel; the
    Cholesky's panel solve and the solve's Z·(G + μI)⁻¹) against torch.linalg.solve_triangular
    with left=False; small leaves force deep recursion with odd splits. Bound as for the left
    solves: c·ε·κ(L), κ(L) = √κ(C)."""
    mod = native_or_skip()
    if not mod.f64_gemm_available():
        pytest.skip("the CPU lacks AVX512-F")
    L = torch.linalg.cholesky(spd(n, cond=cond, seed=n)).contiguous()
    g = torch.Generator().manual_seed(n + rows)
    for transpose in (False, True):
        Y = torch.randn(rows, n, generator=g, dtype=F64)
        want = torch.linalg.solve_triangular(L.mT if transpose else L, Y, upper=transpose, left=False)
        X = Y.clone()
        mod.f64_trsm_right(L.numpy(), X.numpy(), transpose, leaf)
        assert rel(X, want) <= cond_tol(math.sqrt(cond)), transpose


@pytest.mark.native
@pytest.mark.parametrize("d,n,method", [(200, 100, "emmet"), (700, 300, "emmet"), (300, 300, "memit"),
                                        (400, 20, "memit")])  # fmt: skip
def test_cpu_solve_matches_torch_on_both_gemm_kernels(d, n, method, gemm_kernel):
    """The whole native solve (the d × d triangular solves, G = ZᵀZ and Z·(G + μI)⁻¹ on the
    AVX-512 kernel from 16 keys, or on OpenBLAS) against the torch backend; n = d with MEMIT
    and n > 256 put the n × n solves through the kernel's recursion. κ(C) = 10, Gaussian keys."""
    native_or_skip()
    C = spd(d, cond=10, seed=d + n)
    K, R = keys(d, n)
    ft, fc = pmsolve.factorize(C, backend="torch"), pmsolve.factorize(C, backend="cpu")
    mu = None if method == "emmet" else 0.1 * float(torch.diagonal(K.mT @ torch.linalg.solve(C, K)).mean())
    ut = pmsolve.solve(ft, K, R, method=method, mu=mu, backend="torch")
    uc = pmsolve.solve(fc, K, R, method=method, mu=mu, backend="cpu")
    G = K.mT @ torch.linalg.solve(C, K) + (mu or 0.0) * torch.eye(n, dtype=F64)
    tol = cond_tol(10.0, kappa(G))
    assert rel(uc.B, ut.B) <= tol
    assert uc.diagnostics.cond_G == pytest.approx(ut.diagnostics.cond_G, rel=tol)
    if method == "emmet":  # equality: (W0 + Δ)K = V, so ΔK = R
        assert uc.diagnostics.residual <= tol
    else:  # least squares: the same residual on both backends
        assert uc.diagnostics.residual == pytest.approx(ut.diagnostics.residual, rel=tol)


@pytest.mark.native
@pytest.mark.parametrize("n", [4, 16, 100])
def test_cpu_residual_product_on_the_kernel(n, gemm_kernel):
    """The cpu backend hands the diagnostics BᵀK (the residual's check) from the AVX-512 kernel
    where the solve's GEMMs run on it, from F64_GEMM_SOLVE_MIN_KEYS keys, else leaves it to torch
    (None). It must equal torch's product within the bound of two fp64 sums of d products,
    2·γ_d·(|B|ᵀ|K|)."""
    from pmsolve.backends import get_backend

    mod = native_or_skip()
    d = 300
    L = torch.linalg.cholesky(spd(d, cond=10, seed=3)).contiguous()
    K, _ = keys(d, n)
    sol = get_backend("cpu", K.device).pm_solve(L, K, [0.0], 1e12)
    on_kernel = gemm_kernel == "avx512" and n >= mod.F64_GEMM_SOLVE_MIN_KEYS
    assert (sol.BtK is not None) == on_kernel
    if on_kernel:
        gamma = d * EPS / (1 - d * EPS)
        bound = 2 * gamma * (sol.B.abs().mT @ K.abs())
        assert bool(((sol.BtK - sol.B.mT @ K).abs() <= bound).all())


@pytest.mark.native
@pytest.mark.parametrize("d,k,zeros", [(1, 1, 0), (5, 2, 0), (300, 1, 0), (300, 3, 100), (700, 4, 0),
                                       (700, 6, 350), (1100, 2, 1099)])  # fmt: skip
@pytest.mark.parametrize("cond", [1e2, 1e8])
def test_native_spd_apply_inverse_matches_fp64_solve(d, k, zeros, cond):
    """_C.spd_apply_inverse (X := (LLᵀ)⁻¹X for X's rows, streamed in panels of 256 rows, the
    rectangles threaded, at most 4 vectors per pass) against an upcast solve with the same
    factor: d spans one and several panels, k one, two passes (6 = 4 + 2); leading zeros (the
    estimate's e_j) take the path that skips them. Two backward-stable solves with the same
    factor differ by at most c·ε·κ(C)."""
    mod = native_or_skip()
    C = spd(d, cond=cond, seed=3)
    L = torch.linalg.cholesky(C).contiguous()
    g = torch.Generator().manual_seed(d + k)
    X = torch.randn(k, d, generator=g, dtype=F64)
    X[:, :zeros] = 0.0
    want = torch.cholesky_solve(X.mT.to(torch.float64), L).mT
    got = X.clone()
    mod.spd_apply_inverse(L.numpy(), got.numpy())
    assert rel(got, want) <= cond_tol(cond)


@pytest.mark.native
@pytest.mark.parametrize("d", [300, 1100])
@pytest.mark.parametrize("cond", [1e2, 1e8])
def test_cpu_cond_estimate_equals_the_torch_oracle(d, cond, monkeypatch):
    """The cpu backend runs DLACN2's iteration on _C.spd_apply_inverse (switched on here whatever
    the CPU), the torch backend on torch's triangular solves: the same estimate up to the solves'
    rounding (c·ε·κ relative; a different sign or argmax decision would change it by far more),
    for a row-major factor (the kernel) and a column-major one (torch's solves)."""
    native_or_skip()
    from pmsolve.backends import cpu as cpu_backend
    from pmsolve.backends import get_backend

    monkeypatch.setattr(cpu_backend, "NATIVE_COND_SOLVES", True)
    from pmsolve.backends.torch_backend import TorchBackend

    C = spd(d, cond=cond, seed=11)
    anorm = float(C.abs().sum(0).max())
    L = torch.linalg.cholesky(C)
    want = TorchBackend().cond_estimate(L, anorm)
    cpu = get_backend("cpu", C.device)
    for factor in (L.contiguous(), L):
        assert cpu.cond_estimate(factor, anorm) == pytest.approx(want, rel=cond_tol(cond))
    assert want <= float(torch.linalg.cond(C, 1)) * (1 + cond_tol(cond))


@pytest.mark.native
def test_native_spd_apply_inverse_rejects_bad_arguments():
    mod = native_or_skip()
    L = torch.linalg.cholesky(spd(8, cond=10.0, seed=1))
    with pytest.raises(ValueError, match="row-major"):
        mod.spd_apply_inverse(L.mT.contiguous().mT.numpy(), torch.ones(1, 8, dtype=F64).numpy())
    with pytest.raises(ValueError, match="k x d"):
        mod.spd_apply_inverse(L.contiguous().numpy(), torch.ones(8, 1, dtype=F64).numpy())
    with pytest.raises(TypeError, match="float64"):
        mod.spd_apply_inverse(L.contiguous().numpy(), torch.ones(1, 8, dtype=torch.float32).numpy())


# ---------------------------------------------------------------------------
# missing native module
# ---------------------------------------------------------------------------


def test_missing_native_module_falls_back_to_torch_with_one_warning(tmp_path):
    bad = tmp_path / "_C.cpython-bad.so"
    bad.write_text("not an ELF file")
    script = textwrap.dedent(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import pmsolve
            C = torch.eye(4, dtype=torch.float64)
            f = pmsolve.factorize(C)
            u = pmsolve.solve(f, torch.ones(4, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))
        native = [x for x in w if issubclass(x.category, pmsolve.errors.NativeUnavailableWarning)]
        print(len(native), f.backend, u.diagnostics.backend, pmsolve.available_backends())
        print(native[0].message)
        """
    )
    env = {**os.environ, "PMSOLVE_NATIVE_LIB": str(bad)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, message = out.stdout.splitlines()[:2]
    assert first == "1 torch torch ['torch']"
    assert "cannot be loaded" in message and "pip install -e ." in message


def test_outdated_native_build_is_not_picked(monkeypatch):
    """A loadable _C that lacks the solver kernels (a stale build) falls back to torch with a reason."""
    import types

    from pmsolve import backends
    from pmsolve.backends.cpu import CpuBackend

    stale = types.ModuleType("pmsolve._C")
    stale.__file__ = "/old/_C.so"
    with pytest.raises(pmsolve.BackendUnavailableError, match="outdated build"):
        CpuBackend(stale)
    monkeypatch.setattr(backends, "native", lambda: stale)
    monkeypatch.delitem(backends._instances, "cpu", raising=False)
    monkeypatch.setattr(pmsolve._native, "_warned", False)
    with pytest.warns(pmsolve.errors.NativeUnavailableWarning, match="outdated build"):
        be = backends.get_backend("auto", torch.device("cpu"))
    assert be.name == "torch"


def test_finite_check_survives_an_overflowing_sum_and_locates_bad_entries():
    from pmsolve.solver import _check_finite

    big = torch.full((4, 3), 1e308, dtype=F64)  # finite entries whose sum overflows to inf
    _check_finite("K", big)
    big[2, 1] = float("nan")
    with pytest.raises(InputError, match=r"first at index \(2, 1\)"):
        _check_finite("K", big)
    mixed = torch.zeros(5, 2, dtype=F64)
    mixed[1, 0], mixed[3, 1] = float("inf"), float("-inf")  # the sum is NaN, not ±inf
    with pytest.raises(InputError, match=r"first at index \(1, 0\)"):
        _check_finite("R", mixed)


def test_settings_process_wide_defaults_and_thread_local_overrides():
    """set_value reaches every thread; a with-block overrides only its own thread, nests, and
    restores on exit (also on an exception)."""
    import threading

    seen: dict[str, float] = {}
    inside, release = threading.Event(), threading.Event()

    def other_thread():
        seen["default"] = settings.get("max_cond")
        inside.wait(5)
        seen["while_main_overrides"] = settings.get("max_cond")
        release.set()

    default = settings.get("max_cond")
    settings.set_value("max_cond", 1e9)
    try:
        t = threading.Thread(target=other_thread)
        t.start()
        with settings.max_cond(1e5):
            with settings.max_cond(1e3):
                assert settings.get("max_cond") == 1e3
            assert settings.get("max_cond") == 1e5
            inside.set()
            release.wait(5)
        t.join(5)
        assert seen == {"default": 1e9, "while_main_overrides": 1e9}
        with pytest.raises(RuntimeError), settings.max_cond(7.0):
            raise RuntimeError
        assert settings.get("max_cond") == 1e9
    finally:
        settings.set_value("max_cond", default)
    with pytest.raises(KeyError, match="unknown pmsolve setting"):
        settings.set_value("max_condition", 1.0)


# ---------------------------------------------------------------------------
# low-rank extension (Factor.extend): C + δI + w·UUᵀ without refactoring
# ---------------------------------------------------------------------------


def _extended_case(d, k, weight, cond=1e3, seed=0):
    C = spd(d, cond=cond, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    U = torch.randn(d, k, generator=g, dtype=F64) * math.sqrt(float(torch.diagonal(C).mean()))
    return C, U, C + weight * U @ U.mT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,k,n,weight", [(8, 1, 2, 1.0), (64, 5, 13, 0.3), (300, 40, 100, 1e3), (300, 40, 1, 1e6),
                                          (512, 100, 64, 1e-4)])
def test_extended_solve_matches_the_closed_form_of_the_summed_matrix(backend, d, k, n, weight):
    """Every method with an extended factor equals its textbook formula on C_e = C + w·UUᵀ,
    computed densely in fp64. Tolerance: cond_tol with κ(C_e), κ(G) and κ(C) (the extended
    solve passes through C's factor; C_e ⪰ C, so its κ is at most κ(C)·(1 + w‖U‖²/λmax(C)))."""
    C, U, Ce = _extended_case(d, k, weight)
    K, R = keys(d, n, seed=k)
    f = pmsolve.factorize(C, backend=backend).extend(U, weight)
    assert f.lowrank is not None and f.lowrank.rank == k
    ref, G = emmet_ref(Ce, K, R)
    tol = cond_tol(kappa(Ce), kappa(G), 1e3)
    up = pmsolve.solve(f, K, R, method="emmet", backend=backend)
    assert rel(up.dense(), ref) <= tol
    assert up.diagnostics.residual <= tol
    lam = float(torch.diagonal(G).mean())
    up = pmsolve.solve(f, K, R, method="memit", mu=lam, backend=backend)
    assert rel(up.dense(), memit_ref(Ce, K, R, lam)) <= cond_tol(kappa(Ce), kappa(G), 1e3, kappa(lam * Ce + K @ K.mT))
    assert rel(f.solve(K), torch.linalg.solve(Ce, K)) <= cond_tol(kappa(Ce), 1e3)
    # preservation cost is tr(Δ C_e Δᵀ): the extension is part of what is preserved.
    D = up.dense()
    assert up.diagnostics.preservation_cost == pytest.approx(float(torch.trace(D @ Ce @ D.mT)), rel=tol)


@pytest.mark.native
@pytest.mark.parametrize("n", [1, 3, 16, 200])  # both of the cpu backend's paths (torch solves below 4 keys)
def test_extended_cpu_matches_torch(n):
    native_or_skip()
    C, U, _ = _extended_case(400, 30, 2.0, cond=10)
    K, R = keys(400, n)
    ft = pmsolve.factorize(C, backend="torch").extend(U, 2.0)
    fc = pmsolve.factorize(C, backend="cpu").extend(U, 2.0)
    for method, mu in (("emmet", None), ("memit", 10.0)):
        ut = pmsolve.solve(ft, K, R, method=method, mu=mu, backend="torch")
        uc = pmsolve.solve(fc, K, R, method=method, mu=mu, backend="cpu")
        assert rel(uc.B, ut.B) <= 1e-10  # κ(C) = 10, κ(C_e) ≲ 1e2: 1e3·ε·Σκ ≈ 3e-11
        assert uc.diagnostics.cond_G == pytest.approx(ut.diagnostics.cond_G, rel=1e-10)


def test_extending_twice_equals_extending_once():
    C, U, Ce = _extended_case(120, 20, 1.0)
    f = pmsolve.factorize(C, backend="torch")
    once = f.extend(U, 0.5)
    twice = f.extend(U[:, :7], 0.5).extend(U[:, 7:], 0.5)
    assert twice.lowrank.rank == 20
    K, _ = keys(120, 9)
    assert rel(twice.solve(K), once.solve(K)) <= cond_tol(kappa(Ce))
    assert f.lowrank is None  # extend returns a new factor; the original is untouched


def test_extension_with_dependent_columns_and_zero_columns():
    """Duplicate and zero columns make Z = L⁻¹U rank deficient: zero singular values give a
    zero correction (c = 0), nothing is divided by them."""
    C, U, _ = _extended_case(80, 6, 1.0)
    U = torch.cat([U, U[:, :2], torch.zeros(80, 1, dtype=F64)], 1)
    Ce = C + U @ U.mT
    f = pmsolve.factorize(C, backend="torch").extend(U)
    K, R = keys(80, 5)
    ref, G = emmet_ref(Ce, K, R)
    assert rel(pmsolve.solve(f, K, R, backend="torch").dense(), ref) <= cond_tol(kappa(Ce), kappa(G))


def test_extension_past_the_rank_limit_refactors():
    C, U, Ce = _extended_case(64, 20, 1.0)
    f = pmsolve.factorize(C, backend="torch")
    with settings.max_lowrank_fraction(0.25):  # 20 > 16 columns: a dense refactor is cheaper
        g = f.extend(U)
    assert g.lowrank is None
    assert rel(g.L @ g.L.mT, Ce) <= 1e3 * EPS * kappa(Ce)
    with settings.max_lowrank_fraction(0.5):
        assert f.extend(U).lowrank is not None


@pytest.mark.parametrize("weight", [1e-3, 1.0, 1e4])
def test_extended_cond_estimate_is_a_lower_bound_within_a_small_factor(weight):
    """The estimate multiplies two Hager estimates (‖C_e‖₁ and ‖C_e⁻¹‖₁), each a lower bound
    usually within 3×: so a lower bound, within 9× in the worst usual case."""
    C, U, Ce = _extended_case(200, 10, weight, cond=1e5)
    f = pmsolve.factorize(C, backend="torch").extend(U, weight)
    true = float(torch.linalg.cond(Ce, p=1))
    assert true / 9 <= f.cond <= true * (1 + 1e-8)


def test_extended_factor_save_load_roundtrip(tmp_path):
    C, U, _ = _extended_case(50, 4, 3.0)
    f = pmsolve.factorize(C, backend="torch").extend(U, 3.0)
    f.save(tmp_path / "f")
    g = pmsolve.Factor.load(tmp_path / "f")
    assert g.lowrank is not None and torch.equal(g.lowrank.U, f.lowrank.U) and g.summary() == f.summary()
    K, _ = keys(50, 3)
    assert torch.equal(g.solve(K), f.solve(K))
    payload = torch.load(tmp_path / "f", weights_only=True)
    assert payload["format"] == "pmsolve.factor/2"  # a /1 reader would drop U silently: it refuses /2
    payload["U"] = payload["U"][:, :2]
    torch.save(payload, tmp_path / "bad")
    with pytest.raises(CacheError, match="low-rank term"):
        pmsolve.Factor.load(tmp_path / "bad")
    plain = pmsolve.factorize(C, backend="torch")
    plain.save(tmp_path / "plain")
    assert torch.load(tmp_path / "plain", weights_only=True)["format"] == "pmsolve.factor/1"


def test_extend_rejects_bad_input():
    f = pmsolve.factorize(spd(20), backend="torch")
    U = torch.randn(20, 3, dtype=F64)
    with pytest.raises(InputError, match="rows"):
        f.extend(U[:19])
    bad = U.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        f.extend(bad)
    for w in (-1.0, float("inf"), True, "1"):
        with pytest.raises(InputError, match="weight"):
            f.extend(U, w)
    assert f.extend(U, 0.0) is f and f.extend(U[:, :0]) is f
