"""The contract every solver backend fulfils.

Backends are numerical kernels only: they take fp64 (or, for C, any float)
tensors that pmsolve.solver has already validated, and never decide policy.
The jitter and ridge schedules are computed by the caller and tried in order,
so every backend regularises exactly the same way and the pure-torch backend
is a faithful oracle for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

# (P, c): the operator I − P diag(c) Pᵀ applied after the forward and before the backward
# triangular solve when the factored matrix carries a low-rank term (pmsolve.solver.LowRankTerm).
InvSqrt = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CholeskyResult:
    L: torch.Tensor | None  # lower-triangular fp64 factor of C + shift*I (upper triangle zero), None on failure
    shift_index: int  # index into the shifts tried; -1 when every shift failed
    workspace_bytes: int  # bytes the backend allocated (the factor included)


@dataclass
class SymStats:
    """What factorize checks in C, measured in one pass (policy decides what to do with it)."""

    norm1: float  # ‖C‖₁: max column sum of |C|, both triangles
    amax: float  # max |C_ij|
    asym: float  # max |C_ij − C_ji|
    asym_at: tuple[int, int]  # where (i ≥ j)
    nonfinite_at: tuple[int, int] | None  # first NaN/Inf in row-major order; None when all are finite
    diag_min: float
    diag_min_at: int


@dataclass
class PMSolution:
    B: torch.Tensor | None  # d × n, fp64: C⁻¹K (G + mu I)⁻¹, so that Δ = R Bᵀ
    G: torch.Tensor  # n × n, fp64: Kᵀ C⁻¹ K (symmetric, both triangles filled)
    M: torch.Tensor | None  # n × n lower Cholesky factor of G + mu I, None on failure
    mu_index: int  # index into the mus tried; -1 when none gave a factor with cond <= max_cond
    cond: float  # 1-norm condition estimate of G + mu I for the accepted mu (inf on failure)
    workspace_bytes: int
    # Bᵀ K from the final B and the keys as given (the residual's check), when the backend has a
    # faster product than torch's; None: the diagnostics form it with torch.
    BtK: torch.Tensor | None = None


class SolverBackend(Protocol):
    name: str

    def symmetric_stats(self, C: torch.Tensor) -> SymStats:
        """Norms, asymmetry, diagonal minimum and first non-finite entry of a square C (any float dtype)."""
        ...

    def cholesky_jittered(self, C: torch.Tensor, shifts: Sequence[float]) -> CholeskyResult:
        """Cholesky of C + s I for the first s in ``shifts`` that succeeds.

        Reads only the lower triangle of C (any float dtype, d × d); C is not modified.
        """
        ...

    def cond_estimate(self, L: torch.Tensor, anorm: float) -> float:
        """1-norm condition estimate of A = L Lᵀ from its factor and ‖A‖₁ (LAPACK pocon-style, O(d²))."""
        ...

    def pm_solve(self, L: torch.Tensor, K: torch.Tensor, mus: Sequence[float], max_cond: float,
                 inv_sqrt: InvSqrt | None = None) -> PMSolution:
        """Z = L⁻¹K, G = ZᵀZ; the first mu with chol(G + mu I) succeeding and cond <= max_cond;
        B = L⁻ᵀ Z (G + mu I)⁻¹. K is d × n fp64. With ``inv_sqrt`` = (P, c), Z is multiplied by
        S = I − P diag(c) Pᵀ after the first solve and again before the last: the solve with the
        (non-triangular) factor L S⁻¹ of LLᵀ + UUᵀ."""
        ...
