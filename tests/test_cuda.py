"""CUDA backend against the torch reference backend, on the same CUDA inputs.

Tests marked gpu skip where torch sees no CUDA device or pmsolve._C was built
without CUDA (tools/build_cuda.sh builds one; bench/gpu_check.sh runs these on
a GPU machine). The availability checks at the end run everywhere.
"""

from __future__ import annotations

import types

import pytest
import torch

import pmsolve
from pmsolve._native import native, unavailable_reason
from pmsolve.backends.cuda import CudaBackend
from pmsolve.backends.torch_backend import TorchBackend
from pmsolve.errors import BackendUnavailableError, InputError

EPS = torch.finfo(torch.float64).eps
MAX_COND = 1e12


def cond_tol(*conds: float) -> float:
    """Tolerance on the relative difference of two fp64 results computed in different orders.

    Cholesky, triangular and SPD solves are backward stable, so each backend's forward
    error is at most a modest multiple of κ·ε (Higham, Accuracy and Stability of Numerical
    Algorithms, §8 and §10); B = (C + δI)⁻¹ K (G + μI)⁻¹ goes through both factors, so the
    condition numbers add. The factor 1e3 covers the dimension-dependent constants at
    d ≤ 1024 (observed differences are ~1e-2 of the bound) and the estimate being a lower
    bound (within 3× of κ₁).
    """
    return 1e3 * EPS * max(1.0, sum(conds))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.fixture
def cuda_backend(gpu_only: torch.device) -> CudaBackend:
    mod = native()
    if mod is None:
        pytest.skip(f"pmsolve._C unavailable: {unavailable_reason()}")
    if not hasattr(mod, "cuda_pm_solve"):
        pytest.skip("pmsolve._C was built without CUDA (tools/build_cuda.sh builds one)")
    return CudaBackend(mod)


def spd(d: int, device: torch.device, *, seed: int = 0, tokens: int = 4) -> torch.Tensor:
    """A mean second moment K0 K0ᵀ / N of N = tokens·d random keys, as the pipeline makes it."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    K0 = torch.randn(d, tokens * d, generator=g, dtype=torch.float64)
    return (K0 @ K0.mT / K0.shape[1]).to(device)


def keys(d: int, n: int, device: torch.device, *, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(d, n, generator=g, dtype=torch.float64).to(device)


def jitter_schedule(C: torch.Tensor) -> list[float]:
    scale = float(torch.diagonal(C).double().mean())
    return [0.0] + [r * scale for r in pmsolve.settings.get("jitter_schedule")]


# ---------------------------------------------------------------------------
# Cholesky with jitter
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 7, 300, 1024])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cholesky_matches_torch(cuda_backend, gpu_only, d, dtype):
    S = spd(d, gpu_only).to(dtype)
    C = torch.tril(S) - 7.0 * torch.triu(S, 1)  # a wrong upper triangle: only the lower one may be read
    shifts = jitter_schedule(C)
    ref = TorchBackend().cholesky_jittered(C, shifts)
    got = cuda_backend.cholesky_jittered(C, shifts)
    assert got.shift_index == ref.shift_index == 0
    assert got.L.dtype == torch.float64 and got.L.device == C.device
    assert torch.count_nonzero(torch.triu(got.L, 1)) == 0
    cond = TorchBackend().cond_estimate(ref.L, float(S.double().abs().sum(0).max()))
    assert rel(got.L, ref.L) <= cond_tol(cond)
    assert got.workspace_bytes >= d * d * 8


@pytest.mark.gpu
def test_cholesky_dead_units_take_the_same_jitter(cuda_backend, gpu_only):
    C = spd(200, gpu_only)
    dead = torch.tensor([3, 50, 199], device=gpu_only)
    C[dead, :] = 0.0
    C[:, dead] = 0.0  # exactly singular: shift 0 fails in any order of operations
    shifts = jitter_schedule(C)
    ref = TorchBackend().cholesky_jittered(C, shifts)
    got = cuda_backend.cholesky_jittered(C, shifts)
    assert got.shift_index == ref.shift_index == 1
    # The dead units decouple (zero rows and columns), so although κ(C + δI) ≈ 1e12 the factor
    # is as accurate as that of the well-conditioned live block.
    assert rel(got.L, ref.L) <= cond_tol(1e2)


@pytest.mark.gpu
def test_cholesky_indefinite_fails_like_torch(cuda_backend, gpu_only):
    C = spd(64, gpu_only)
    C[10, 10] = -1.0  # far beyond any shift in the schedule
    shifts = jitter_schedule(C)
    assert TorchBackend().cholesky_jittered(C, shifts).shift_index == -1
    got = cuda_backend.cholesky_jittered(C, shifts)
    assert got.shift_index == -1 and got.L is None


def graded(d: int, device: torch.device, cond: float, *, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues from 1 to cond, log-spaced) Qᵀ: the estimator takes more steps on these."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return ((Q * torch.logspace(0, torch.log10(torch.tensor(cond)), d, dtype=torch.float64)) @ Q.mT).to(device)


@pytest.mark.gpu
def test_cond_estimate_matches_torch(cuda_backend, gpu_only):
    mats = [spd(d, gpu_only, seed=seed, tokens=2) for d, seed in [(1, 0), (2, 1), (5, 2), (400, 3)]]
    mats += [graded(d, gpu_only, cond, seed=d) for d, cond in [(3, 1e3), (64, 1e8), (300, 1e11)]]
    for C in mats:
        L = torch.linalg.cholesky(C)
        anorm = float(C.abs().sum(0).max())
        want = TorchBackend().cond_estimate(L, anorm)
        # The same DLACN2 steps; only rounding in the solves differs (≤ κ·ε relative).
        assert cuda_backend.cond_estimate(L, anorm) == pytest.approx(want, rel=1e-3)
    assert cuda_backend.cond_estimate(L, 0.0) == float("inf")


# ---------------------------------------------------------------------------
# PM solve
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("d,n", [(8, 1), (256, 1), (256, 16), (1024, 128), (2048, 1), (2048, 2)])
def test_pm_solve_matches_torch(cuda_backend, gpu_only, d, n):
    C = spd(d, gpu_only)
    L = torch.linalg.cholesky(C)
    K = keys(d, n, gpu_only)
    mus = [0.0, 1.0, 10.0]
    ref = TorchBackend().pm_solve(L, K, mus, MAX_COND)
    got = cuda_backend.pm_solve(L, K, mus, MAX_COND)
    assert got.mu_index == ref.mu_index == 0
    assert got.cond == pytest.approx(ref.cond, rel=1e-6)
    cond_c = TorchBackend().cond_estimate(L, float(C.abs().sum(0).max()))
    tol = cond_tol(cond_c, ref.cond)
    assert rel(got.G, ref.G) <= tol
    assert torch.equal(got.G, got.G.mT)
    assert rel(got.M, ref.M) <= tol
    assert torch.count_nonzero(torch.triu(got.M, 1)) == 0
    assert rel(got.B, ref.B) <= tol


@pytest.mark.gpu
def test_pm_solve_memit_ridge_matches_torch(cuda_backend, gpu_only):
    d, n = 512, 64
    C = spd(d, gpu_only, seed=3)
    L = torch.linalg.cholesky(C)
    K = keys(d, n, gpu_only, seed=4)
    ref = TorchBackend().pm_solve(L, K, [15000.0], MAX_COND)
    got = cuda_backend.pm_solve(L, K, [15000.0], MAX_COND)
    assert got.mu_index == ref.mu_index == 0
    cond_c = TorchBackend().cond_estimate(L, float(C.abs().sum(0).max()))
    assert rel(got.B, ref.B) <= cond_tol(cond_c, ref.cond)


@pytest.mark.gpu
def test_repeated_keys_take_the_same_ridge(cuda_backend, gpu_only):
    d, n = 300, 12
    C = spd(d, gpu_only, seed=5)
    L = torch.linalg.cholesky(C)
    K = keys(d, n, gpu_only, seed=6)
    K[:, 7] = K[:, 2]  # the same subject twice: G is exactly singular
    Z = torch.linalg.solve_triangular(L, K, upper=False)
    g = float((Z * Z).sum(0).mean())
    # Steps far from the acceptance boundary, so rounding cannot flip a decision:
    # cond(G) ≳ 1e14 > MAX_COND for the first two, ≈ 1e6·n for the last.
    mus = [0.0, 1e-14 * g, 1e-6 * g]
    ref = TorchBackend().pm_solve(L, K, mus, MAX_COND)
    got = cuda_backend.pm_solve(L, K, mus, MAX_COND)
    assert got.mu_index == ref.mu_index == 2
    assert got.cond == pytest.approx(ref.cond, rel=1e-6)
    assert rel(got.B, ref.B) <= cond_tol(ref.cond)


@pytest.mark.gpu
def test_no_ridge_works_fails_like_torch(cuda_backend, gpu_only):
    d = 64
    L = torch.linalg.cholesky(spd(d, gpu_only))
    K = keys(d, 4, gpu_only)
    K[:, 1] = 0.0  # a zero key: G has an exactly zero row for μ = 0
    ref = TorchBackend().pm_solve(L, K, [0.0], MAX_COND)
    got = cuda_backend.pm_solve(L, K, [0.0], MAX_COND)
    assert got.mu_index == ref.mu_index == -1
    assert got.B is None and got.M is None and got.cond == float("inf")
    assert rel(got.G, ref.G) <= cond_tol(1.0)


@pytest.mark.gpu
def test_public_api_on_cuda_matches_torch(cuda_backend, gpu_only):
    d, n = 384, 24
    C = spd(d, gpu_only, seed=7).float()
    K = keys(d, n, gpu_only, seed=8)
    R = keys(96, n, gpu_only, seed=9)
    fc = pmsolve.factorize(C, backend="cuda")
    ft = pmsolve.factorize(C, backend="torch")
    assert fc.backend == "cuda" and fc.jitter == ft.jitter
    assert fc.cond == pytest.approx(ft.cond, rel=1e-8)
    for method, mu in [("emmet", None), ("memit", 5000.0)]:
        uc = pmsolve.solve(fc, K, R, method=method, mu=mu, backend="cuda")
        ut = pmsolve.solve(ft, K, R, method=method, mu=mu, backend="torch")
        assert uc.diagnostics.backend == "cuda"
        assert uc.diagnostics.mu == ut.diagnostics.mu
        assert rel(uc.B, ut.B) <= cond_tol(fc.cond, ut.diagnostics.cond_G)
    assert uc.diagnostics.peak_bytes > 0


@pytest.mark.gpu
def test_extended_factor_on_cuda_matches_the_cpu(cuda_backend, gpu_only):
    """Factor.extend on a CUDA factor, solved on the cuda backend, equals the same extension
    on the CPU (torch backend)."""
    d, n, k = 384, 24, 40
    C = spd(d, gpu_only, seed=7)
    U = keys(d, k, gpu_only, seed=10)
    K = keys(d, n, gpu_only, seed=8)
    R = keys(96, n, gpu_only, seed=9)
    fc = pmsolve.factorize(C, backend="cuda").extend(U, 0.5)
    ft = pmsolve.factorize(C.cpu(), backend="torch").extend(U.cpu(), 0.5)
    assert fc.lowrank is not None and fc.cond == pytest.approx(ft.cond, rel=1e-6)
    uc = pmsolve.solve(fc, K, R, backend="cuda")
    ut = pmsolve.solve(ft, K.cpu(), R.cpu(), backend="torch")
    assert uc.diagnostics.backend == "cuda"
    assert rel(uc.B.cpu(), ut.B) <= cond_tol(ft.cond, ut.diagnostics.cond_G)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.gpu
def test_cpu_tensors_are_rejected(cuda_backend, gpu_only):
    C = spd(16, torch.device("cpu"))
    with pytest.raises(InputError, match="CUDA device"):
        cuda_backend.cholesky_jittered(C, [0.0])
    L = torch.linalg.cholesky(C).to(gpu_only)
    with pytest.raises(InputError, match="one CUDA device"):
        cuda_backend.pm_solve(L, keys(16, 2, torch.device("cpu")), [0.0], MAX_COND)


@pytest.mark.gpu
def test_shapes_are_checked(cuda_backend, gpu_only):
    with pytest.raises(InputError, match="square"):
        cuda_backend.cholesky_jittered(torch.ones(3, 4, device=gpu_only), [0.0])
    L = torch.eye(4, dtype=torch.float64, device=gpu_only)
    with pytest.raises(InputError, match="d × n"):
        cuda_backend.pm_solve(L, torch.ones(5, 2, dtype=torch.float64, device=gpu_only), [0.0], MAX_COND)


@pytest.mark.gpu
def test_native_argument_checks(cuda_backend, gpu_only):
    C_mod = native()
    dev = gpu_only.index
    stream = torch.cuda.current_stream(dev).cuda_stream
    C = spd(32, gpu_only)
    L = torch.empty_like(C)
    need = C_mod.cuda_cholesky_workspace_bytes(dev, stream, 32)
    work = torch.empty(need, dtype=torch.uint8, device=gpu_only)
    host = torch.empty(32, 32, dtype=torch.float64)
    args = dict(device=dev, stream=stream, C=C.data_ptr(), dtype="float64", d=32, L=L.data_ptr(),
                shifts=[0.0], work=work.data_ptr(), work_bytes=need)
    assert C_mod.cuda_cholesky_jittered(**args) == 0
    bad = [
        (dict(C=host.data_ptr()), "C is not CUDA device memory|C is not a CUDA pointer"),
        (dict(L=0), "L is a null pointer"),
        (dict(L=L.data_ptr() + 4), "L is not aligned"),
        (dict(work_bytes=need - 1), "workspace .* too small"),
        (dict(shifts=[]), "shifts is empty"),
        (dict(shifts=[float("nan")]), "finite non-negative"),
        (dict(dtype="float16"), "float32 or float64"),
        (dict(d=0), "d must be positive"),
        (dict(device=torch.cuda.device_count()), "does not exist"),
    ]
    for override, message in bad:
        with pytest.raises(ValueError, match=message):
            C_mod.cuda_cholesky_jittered(**{**args, **override})


def test_module_without_cuda_is_unavailable():
    with pytest.raises(BackendUnavailableError, match="built without CUDA"):
        CudaBackend(types.SimpleNamespace())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device message")
def test_no_device_is_unavailable():
    fake = types.SimpleNamespace(cuda_pm_solve=None, cuda_device_count=lambda: 0)
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        CudaBackend(fake)


def test_cuda_build_without_device_refuses_cleanly():
    mod = native()
    if mod is None or not hasattr(mod, "cuda_pm_solve"):
        pytest.skip("needs pmsolve._C built with CUDA (tools/build_cuda.sh)")
    if mod.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailableError):
        CudaBackend(mod)
    with pytest.raises(ValueError, match="device 0 does not exist"):
        mod.cuda_cholesky_workspace_bytes(0, 0, 8)
