"""Pure-torch reference backend: always available, runs on any device, the oracle in tests.

Written for clarity over speed, but with the same algorithm (and therefore
the same regularisation decisions) as the native backends.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .base import CholeskyResult, InvSqrt, PMSolution, SymStats


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def hager_cond_1norm(L: torch.Tensor, anorm: float, max_iter: int = 5) -> float:
    """1-norm condition estimate of A = L Lᵀ from its factor and ‖A‖₁, exactly as LAPACK's DPOCON.

    The iteration is LAPACK's DLACN2 (Hager's method with Higham's refinements),
    step for step (hager_norm1), so that this oracle, the cpu backend (the same
    iteration on native solves) and LAPACK's DPOCON take the same accept/reject
    decisions. A lower bound on the true condition number, usually within a factor of 3.
    """
    if L.shape[0] == 0:
        return 1.0
    if anorm == 0:
        return math.inf

    def apply_inv(X: torch.Tensor) -> torch.Tensor:  # A⁻¹ X; A symmetric, so A⁻ᵀ = A⁻¹
        # Two triangular solves, not torch.cholesky_solve: on CPU that took 1.2–1.7 s per
        # vector at d = 6400 (it copies the factor each call), the two solves 0.02 s.
        return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, X, upper=False), upper=True)

    return reciprocal_cond(hager_norm1(apply_inv, L.shape[0], L.dtype, L.device, max_iter), anorm)


def hager_norm1(apply: Callable[[torch.Tensor], torch.Tensor], n: int, dtype: torch.dtype, device: torch.device,
                max_iter: int = 5) -> float:
    """Estimate of ‖A‖₁ for a *symmetric* n × n operator given as X ↦ A X on n × k blocks (DLACN2's
    iteration; a lower bound, usually within a factor of 3). Applied to X ↦ A⁻¹X it gives DPOCON's
    ‖A⁻¹‖₁. DLACN2's last test vector rides along with its first (one block of two columns): where
    applying A means reading a factor from memory, two columns cost little more than one."""

    def signs(x: torch.Tensor) -> torch.Tensor:  # Fortran SIGN(1, x): zero counts as positive
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    def apply1(x: torch.Tensor) -> torch.Tensor:
        return apply(x.unsqueeze(1)).squeeze(1)

    ones = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    if n == 1:
        return float(apply1(ones).abs().sum())
    # Higham's alternating-sign test vector guards against the method's bad cases.
    i = torch.arange(n, dtype=dtype, device=device)
    alt = (1 + i / (n - 1)) * torch.where(i % 2 == 0, 1.0, -1.0).to(dtype)
    first = apply(torch.stack([ones, alt], dim=1))
    x, alt_est = first[:, 0], 2.0 * float(first[:, 1].abs().sum()) / (3.0 * n)
    est = float(x.abs().sum())
    sgn = signs(x)
    j = int(apply1(sgn).abs().argmax())
    for it in range(2, max_iter + 1):
        e_j = torch.zeros(n, dtype=dtype, device=device)
        e_j[j] = 1.0
        x = apply1(e_j)
        est_old, est = est, float(x.abs().sum())
        new_sgn = signs(x)
        if bool((new_sgn == sgn).all()) or est <= est_old:
            break  # repeated sign vector (converged) or no progress (cycling)
        sgn = new_sgn
        z = apply1(sgn)
        j_last, j = j, int(z.abs().argmax())
        if float(z[j_last]) == float(z[j].abs()) or it == max_iter:
            break
    return max(est, alt_est)


def apply_inv_sqrt_(Z: torch.Tensor, inv_sqrt: InvSqrt | None) -> torch.Tensor:
    """Z := (I − P diag(c) Pᵀ) Z in place: the inverse square root of I + (L⁻¹U)(L⁻¹U)ᵀ, which
    turns a solve with L into one with the factor of LLᵀ + UUᵀ (see pmsolve.solver.LowRankTerm)."""
    if inv_sqrt is not None and inv_sqrt[0].shape[1]:
        P, c = inv_sqrt
        W = P.mT @ Z
        W.mul_(c.unsqueeze(1))
        Z.sub_(P @ W)
    return Z


def reciprocal_cond(ainv_norm: float, anorm: float) -> float:
    """1 / DPOCON's rcond = (1/‖A⁻¹‖)/‖A‖, with its convention that rcond = 0 means inf."""
    if ainv_norm == 0:
        return math.inf
    rcond = (1.0 / ainv_norm) / anorm
    return 1.0 / rcond if rcond > 0 else math.inf


def _row_blocks(x: torch.Tensor) -> range:
    """Row offsets of blocks of about 1M elements: temporaries stay 8 MiB, not O(size of x)."""
    return range(0, x.shape[0], max(1, (1 << 20) // max(x.shape[1], 1)))


def first_nonfinite(x: torch.Tensor) -> tuple[int, int] | None:
    """(row, col) of the first NaN/Inf of a 2-D tensor in row-major order, or None."""
    # A finite sum proves every entry finite (NaN and ±Inf propagate through a sum), in one
    # read and without a boolean temporary; only a non-finite sum (bad entries, or an
    # overflow of the sum itself) pays for the scan that locates the first bad entry.
    if math.isfinite(float(x.sum(dtype=torch.float64))):
        return None
    step = _row_blocks(x).step
    for i in _row_blocks(x):
        finite = torch.isfinite(x[i : i + step])
        if not bool(finite.all()):
            r, c = (~finite).nonzero()[0].tolist()
            return i + r, c
    return None


def symmetric_stats_torch(C: torch.Tensor) -> SymStats:
    """SymStats of a square C with torch ops, on C's device: row blocks for the norms, square
    tiles on and below the diagonal against their mirror images for the asymmetry (each
    element pair compared once, temporaries one block or tile)."""
    d = C.shape[0]
    step = _row_blocks(C).step
    colsum = torch.zeros(d, dtype=torch.float64, device=C.device)
    amax = 0.0
    for i in _row_blocks(C):
        a = C[i : i + step].to(torch.float64).abs()
        colsum += a.sum(0)
        amax = max(amax, float(a.max()))
    tile = 1024  # few, large tiles: each torch op is a parallel region, costly on a busy machine
    worst, where = 0.0, (0, 0)
    for i in range(0, d, tile):
        for j in range(0, i + 1, tile):
            diff = (C[i : i + tile, j : j + tile].to(torch.float64) - C[j : j + tile, i : i + tile].mT).abs_()
            m = float(diff.max())
            if m > worst:
                r, c = divmod(int(diff.argmax()), diff.shape[1])
                worst, where = m, (i + r, j + c)
    diag = torch.diagonal(C)
    k = int(diag.argmin())
    return SymStats(norm1=float(colsum.max()), amax=amax, asym=worst, asym_at=where,
                    nonfinite_at=first_nonfinite(C), diag_min=float(diag[k]), diag_min_at=k)


class TorchBackend:
    name = "torch"

    def symmetric_stats(self, C: torch.Tensor) -> SymStats:
        return symmetric_stats_torch(C)

    def cholesky_jittered(self, C: torch.Tensor, shifts: Sequence[float]) -> CholeskyResult:
        A = torch.tril(C.to(torch.float64))
        A = A + torch.tril(A, -1).mT  # symmetric from the lower triangle
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        for i, s in enumerate(shifts):
            L, info = torch.linalg.cholesky_ex(A + s * eye if s else A)
            if int(info) == 0:
                return CholeskyResult(L, i, _nbytes(A, L, eye))
        return CholeskyResult(None, -1, _nbytes(A, eye))

    def cond_estimate(self, L: torch.Tensor, anorm: float) -> float:
        return hager_cond_1norm(L, anorm)

    def pm_solve(self, L: torch.Tensor, K: torch.Tensor, mus: Sequence[float], max_cond: float,
                 inv_sqrt: InvSqrt | None = None) -> PMSolution:
        Z = apply_inv_sqrt_(torch.linalg.solve_triangular(L, K, upper=False), inv_sqrt)
        G = Z.mT @ Z
        G = 0.5 * (G + G.mT)
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        anorm_g = float(G.abs().sum(0).max()) if G.numel() else 0.0
        for i, mu in enumerate(mus):
            M, info = torch.linalg.cholesky_ex(G + mu * eye)
            if int(info) != 0:
                continue
            cond = hager_cond_1norm(M, anorm_g + abs(mu))
            if cond > max_cond:
                continue
            # B = L⁻ᵀ Z M⁻ᵀ M⁻¹: two n-sized triangular solves on the right, one d-sized on the left.
            # From the right (left=False), W comes out column-major like Z, the layout the last
            # solve takes without a copy (d = 6400, n = 256 on the CPU: 188 -> 176 ms).
            W = torch.linalg.solve_triangular(M.mT, Z, upper=True, left=False)  # Z M⁻ᵀ
            W = torch.linalg.solve_triangular(M, W, upper=False, left=False)  # Z (G+μI)⁻¹
            B = torch.linalg.solve_triangular(L.mT, apply_inv_sqrt_(W, inv_sqrt), upper=True)
            return PMSolution(B, G, M, i, cond, _nbytes(Z, G, M, W, B))
        return PMSolution(None, G, None, -1, float("inf"), _nbytes(Z, G))
