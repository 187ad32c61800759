"""Pure-torch reference backend: always available, runs on any device, the oracle in tests.

Written for clarity over speed, but with the same algorithm (and therefore
the same regularisation decisions) as the native backends.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import CholeskyResult, PMSolution


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def hager_cond_1norm(L: torch.Tensor, anorm: float, max_iter: int = 5) -> float:
    """Hager/Higham estimate of ‖A⁻¹‖₁ (A = L Lᵀ SPD) times ‖A‖₁, as LAPACK's xPOCON does.

    A lower bound on the true condition number, usually within a factor of 3.
    """
    n = L.shape[0]
    if n == 0:
        return 1.0

    def apply_inv(x: torch.Tensor) -> torch.Tensor:  # A⁻¹ x; A symmetric, so A⁻ᵀ = A⁻¹
        return torch.cholesky_solve(x.unsqueeze(1), L).squeeze(1)

    x = torch.full((n,), 1.0 / n, dtype=L.dtype, device=L.device)
    est = 0.0
    last_j = -1
    for _ in range(max_iter):
        y = apply_inv(x)
        new_est = float(y.abs().sum())
        if new_est <= est:
            break
        est = new_est
        z = apply_inv(torch.sign(y) + (y == 0).to(y.dtype))
        j = int(z.abs().argmax())
        if j == last_j:
            break
        last_j = j
        x = torch.zeros_like(x)
        x[j] = 1.0
    # Higham's extra check with an alternating-sign vector guards against bad cases.
    alt = torch.arange(n, dtype=L.dtype, device=L.device)
    alt = (1 + alt / max(n - 1, 1)) * torch.where(alt % 2 == 0, 1.0, -1.0).to(L.dtype)
    est = max(est, 2.0 * float(apply_inv(alt).abs().sum()) / (3.0 * n))
    return est * anorm


class TorchBackend:
    name = "torch"

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

    def pm_solve(self, L: torch.Tensor, K: torch.Tensor, mus: Sequence[float], max_cond: float) -> PMSolution:
        Z = torch.linalg.solve_triangular(L, K, upper=False)
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
            Y = torch.linalg.solve_triangular(M, Z.mT, upper=False)  # M⁻¹ Zᵀ
            Y = torch.linalg.solve_triangular(M.mT, Y, upper=True)  # (G+μI)⁻¹ Zᵀ
            B = torch.linalg.solve_triangular(L.mT, Y.mT, upper=True)
            return PMSolution(B, G, M, i, cond, _nbytes(Z, G, M, Y, B))
        return PMSolution(None, G, None, -1, float("inf"), _nbytes(Z, G))
