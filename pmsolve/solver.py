"""The unified preservation–memorization solve.

Every member of the family (ROME, EMMET, MEMIT) is one formula

    G = Kᵀ C⁻¹ K,        Δ = R (G + μI)⁻¹ (C⁻¹ K)ᵀ = R Bᵀ

with μ = λ for MEMIT and μ = 0 (or the smallest ridge that works) for the
equality methods. C is factored once (:func:`factorize`); each edit batch
then costs O(d²n) (:func:`solve`). The update is kept as the pair (R, B)
and only formed densely when asked.

Policy (validation, jitter and ridge schedules, consistency checks,
diagnostics) lives here; the numerical kernels live in the backends.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import settings
from ._io import atomic_write
from .backends import get_backend
from .backends.base import CholeskyResult, SolverBackend
from .backends.torch_backend import apply_inv_sqrt_, first_nonfinite, hager_norm1
from .errors import (
    CacheError,
    ConflictingConstraintsError,
    InputError,
    NotPositiveDefiniteError,
    NumericalError,
    NumericalWarning,
)

Method = Literal["emmet", "memit", "rome", "alphaedit"]  # alphaedit: with a NullSpaceFactor
METHODS = ("emmet", "memit", "rome")
DEFAULT_MEMIT_LAMBDA = 15000.0  # the reference GPT-J setting; sweep it (docs/design.md §2.5)
_FACTOR_FORMAT = "pmsolve.factor/1"
_FACTOR_FORMAT_LOWRANK = "pmsolve.factor/2"  # /1 plus the columns U of a low-rank term


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def _check_float_matrix(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def _nonfinite_error(name: str, x: torch.Tensor, at: tuple[int, int]) -> InputError:
    return InputError(f"{name} contains NaN or Inf (first at index {at}, value {x[at].item()})")


def _check_finite(name: str, x: torch.Tensor) -> None:
    bad = first_nonfinite(x)
    if bad is not None:
        raise _nonfinite_error(name, x, bad)


def _validate_C(C: Any, be: SolverBackend) -> tuple[torch.Tensor, float, bool]:
    """The checked C, its 1-norm (computed on the way, for the condition estimate) and whether it
    is exactly symmetric."""
    C = _check_float_matrix("C", C)
    if C.shape[0] != C.shape[1]:
        raise InputError(f"C must be square, got shape {tuple(C.shape)}")
    if C.shape[0] == 0:
        raise InputError("C is empty (d = 0)")
    st = be.symmetric_stats(C)
    if st.nonfinite_at is not None:
        raise _nonfinite_error("C", C, st.nonfinite_at)
    if not (math.isfinite(st.amax) and math.isfinite(st.norm1)):
        raise InputError(f"C is finite but its column sums overflow float64 (max|C| = {st.amax:.3g})")
    rtol = settings.get("symmetry_rtol")
    if st.asym > rtol * st.amax:
        i, j = st.asym_at
        raise InputError(
            f"C is not symmetric: |C[{i},{j}] - C[{j},{i}]| = {st.asym:.3g} "
            f"exceeds {rtol:g} * max|C| = {rtol * st.amax:.3g}; symmetrise it ((C + C.T) / 2) if that is rounding"
        )
    if st.diag_min < 0:
        i = st.diag_min_at
        raise NotPositiveDefiniteError(
            f"C has a negative diagonal entry C[{i},{i}] = {st.diag_min:.3g}: it is not a second-moment matrix",
            matrix="C",
        )
    return C, st.norm1, st.asym == 0.0


# ---------------------------------------------------------------------------
# factor
# ---------------------------------------------------------------------------


@dataclass
class LowRankTerm:
    """A term UUᵀ added to a factored matrix without refactoring it.

    LLᵀ + UUᵀ = L (I + ZZᵀ) Lᵀ with Z = L⁻¹U = P diag(σ) Wᵀ (thin SVD), so its solves are those
    with L plus S = (I + ZZᵀ)^(-1/2) = I − P diag(c) Pᵀ, c = 1 − (1 + σ²)^(-1/2), applied
    after the forward and before the backward triangular solve: O(d·k·n) extra per solve of n
    keys, O(d²k) once. S is applied as a projection, not as Woodbury's difference C⁻¹ − (...),
    so G = ZᵀS²Z stays a Gram matrix (symmetric PSD by construction) however large σ is.
    """

    U: torch.Tensor  # d × k fp64: the added columns, weights folded in
    Z: torch.Tensor  # d × k: L⁻¹U
    P: torch.Tensor  # d × r orthonormal (r = min(d, k))
    sigma: torch.Tensor  # r singular values of Z

    @classmethod
    def build(cls, L: torch.Tensor, U: torch.Tensor, Z: torch.Tensor | None = None) -> LowRankTerm:
        if Z is None:
            Z = torch.linalg.solve_triangular(L, U, upper=False)
        P, sigma, _ = torch.linalg.svd(Z, full_matrices=False)
        return cls(U=U, Z=Z, P=P, sigma=sigma)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def inv_sqrt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, c) with c = 1 − 1/s, s = √(1 + σ²), written σ²/(s(s + 1)): no cancellation for small σ."""
        s2 = 1.0 + self.sigma.square()
        s = s2.sqrt()
        return self.P, self.sigma.square() / (s * (s + 1.0))

    def to(self, device: torch.device | str) -> LowRankTerm:
        return LowRankTerm(*(t.to(device) for t in (self.U, self.Z, self.P, self.sigma)))


@dataclass
class Factor:
    """Cholesky factor of C + δI (fp64), with what it took to get it.

    A factor may carry a low-rank term (:meth:`extend`): it then stands for C + δI + UUᵀ, and
    :func:`solve`, :meth:`solve` and ``cond`` are those of that matrix.

    Attributes:
        L: lower-triangular d × d fp64 factor (of C + δI, without any low-rank term).
        jitter: δ actually added to the diagonal (absolute).
        jitter_relative: δ / mean(diag C).
        cond: 1-norm condition estimate of C + δI (pocon-style; a lower bound, usually within 3×),
            or of C + δI + UUᵀ for an extended factor.
        scale: mean(diag C), the unit of the jitter schedule.
        dtype: dtype of the C this was computed from.
        backend: backend that factored it.
        seconds: wall time of the factorisation.
        norm1: ‖C + δI‖₁ (nan for factors saved before it was recorded).
        lowrank: the added term UUᵀ, or None.
    """

    L: torch.Tensor
    jitter: float
    jitter_relative: float
    cond: float
    scale: float
    dtype: torch.dtype
    backend: str
    seconds: float = 0.0
    workspace_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    norm1: float = math.nan
    lowrank: LowRankTerm | None = None

    @property
    def d(self) -> int:
        return self.L.shape[0]

    @property
    def device(self) -> torch.device:
        return self.L.device

    def to(self, device: torch.device | str) -> Factor:
        f = Factor(**{**self.__dict__})
        f.L = self.L.to(device)
        f.lowrank = self.lowrank.to(device) if self.lowrank is not None else None
        return f

    @property
    def inv_sqrt(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the backends apply between their triangular solves (None: a plain factor)."""
        return self.lowrank.inv_sqrt if self.lowrank is not None else None

    def solve(self, K: torch.Tensor) -> torch.Tensor:
        """(C + δI)⁻¹ K in fp64 (K is d × n), with the low-rank term if there is one."""
        K = _check_float_matrix("K", K).to(device=self.device, dtype=torch.float64)
        if self.lowrank is None:
            return torch.cholesky_solve(K, self.L)
        inv_sqrt = self.inv_sqrt
        Z = apply_inv_sqrt_(torch.linalg.solve_triangular(self.L, K, upper=False), inv_sqrt)
        return torch.linalg.solve_triangular(self.L.mT, apply_inv_sqrt_(Z, inv_sqrt), upper=True)

    def extend(self, keys: torch.Tensor, weight: float = 1.0) -> Factor:
        """The factor of C + δI + weight·keys·keysᵀ (keys: d × m), without refactoring.

        Costs O(d²m) (one triangular solve with m columns) where refactoring costs O(d³), and
        allocates no d × d matrix; each later solve of n keys costs O(d·k·n) more, k the total
        number of added columns. Past ``settings.max_lowrank_fraction``·d columns a dense
        refactor is cheaper, and is what this returns (a plain factor of the summed matrix).
        Extending an extended factor adds to its term. The condition estimate is recomputed
        (Hager's iteration on the extended matrix and on its inverse, O(d²) each step).

        Raises:
            InputError: keys not a finite d × m float matrix on the factor's device, or weight not
                a finite number ≥ 0.
        """
        keys = _check_float_matrix("keys", keys)
        if keys.shape[0] != self.d:
            raise InputError(f"keys has {keys.shape[0]} rows but the factor is for d = {self.d}")
        if keys.device != self.device:
            raise InputError(f"keys ({keys.device}) must be on the factor's device {self.device}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise InputError(f"weight must be a finite number >= 0, got {weight!r}")
        _check_finite("keys", keys)
        if keys.shape[1] == 0 or weight == 0:
            return self
        t0 = time.perf_counter()
        U = keys.to(torch.float64) * math.sqrt(weight)
        if self.lowrank is not None:
            U = torch.cat([self.lowrank.U, U], 1)
        if U.shape[1] > settings.get("max_lowrank_fraction") * self.d:
            return self._refactored(U, t0)  # before any triangular solve: the refactor needs none
        Z = torch.linalg.solve_triangular(self.L, U[:, -keys.shape[1]:], upper=False)  # new columns only
        if self.lowrank is not None:
            Z = torch.cat([self.lowrank.Z, Z], 1)
        f = Factor(**{**self.__dict__})
        f.lowrank = LowRankTerm.build(self.L, U, Z)
        f.cond = _cond_extended(f)
        f.seconds = time.perf_counter() - t0
        return f

    def _refactored(self, U: torch.Tensor, t0: float) -> Factor:
        L = torch.tril(self.L)
        C = L @ L.mT
        C.addmm_(U, U.mT)
        f = factorize(C, overwrite_c=True)  # C is ours: no second d × d buffer
        f.seconds = time.perf_counter() - t0
        return f

    def summary(self) -> dict[str, Any]:
        return {
            "d": self.d,
            "norm1": self.norm1,
            "lowrank_rank": self.lowrank.rank if self.lowrank is not None else 0,
            "jitter": self.jitter,
            "jitter_relative": self.jitter_relative,
            "cond": self.cond,
            "scale": self.scale,
            "dtype": str(self.dtype).removeprefix("torch."),
            "backend": self.backend,
            "seconds": self.seconds,
            **self.meta,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (see pmsolve._io.atomic_write)."""
        payload = {"format": _FACTOR_FORMAT, "L": self.L.detach().cpu(), "summary": self.summary()}
        if self.lowrank is not None:  # a reader of format /1 would silently drop U: another format
            payload.update(format=_FACTOR_FORMAT_LOWRANK, U=self.lowrank.U.detach().cpu())
        atomic_write(path, lambda fh: torch.save(payload, fh))

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> Factor:
        try:
            payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise CacheError(f"factor file {path} does not exist") from None
        except Exception as exc:
            raise CacheError(f"factor file {path} is unreadable or truncated: {exc}") from exc
        fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        if fmt not in (_FACTOR_FORMAT, _FACTOR_FORMAT_LOWRANK):
            raise CacheError(f"{path} is not a pmsolve factor file (format {fmt!r})")
        known = {"d", "jitter", "jitter_relative", "cond", "scale", "dtype", "backend", "seconds"}
        optional = {"norm1", "lowrank_rank"}
        s, L = payload.get("summary"), payload.get("L")
        if not isinstance(s, dict) or not known <= s.keys() or not isinstance(L, torch.Tensor):
            raise CacheError(f"factor file {path} is incomplete: summary or factor missing")
        if L.shape != (s["d"], s["d"]) or L.dtype != torch.float64:
            raise CacheError(f"factor file {path} is inconsistent: L has shape {tuple(L.shape)}, d = {s['d']}")
        U = payload.get("U")
        if fmt == _FACTOR_FORMAT_LOWRANK and not (
            isinstance(U, torch.Tensor) and U.dtype == torch.float64 and U.ndim == 2 and U.shape[0] == s["d"]
            and U.shape[1] == s.get("lowrank_rank")
        ):
            raise CacheError(f"factor file {path} is inconsistent: its low-rank term is missing or malformed")
        return cls(
            L=L,
            jitter=s["jitter"],
            jitter_relative=s["jitter_relative"],
            cond=s["cond"],
            scale=s["scale"],
            dtype=getattr(torch, s["dtype"]),
            backend=s["backend"],
            seconds=s["seconds"],
            meta={k: v for k, v in s.items() if k not in known | optional},
            norm1=s.get("norm1", math.nan),
            lowrank=LowRankTerm.build(L, U) if fmt == _FACTOR_FORMAT_LOWRANK else None,
        )


def _cond_extended(f: Factor) -> float:
    """1-norm condition estimate of LLᵀ + UUᵀ: Hager's estimates of its norm and its inverse's
    norm (each a lower bound, usually within 3×), through products and solves that never
    form the d × d matrix."""
    L, U = f.L, f.lowrank.U

    def apply(X: torch.Tensor) -> torch.Tensor:
        return L @ (L.mT @ X) + U @ (U.mT @ X)

    anorm = hager_norm1(apply, f.d, L.dtype, L.device)
    ainv = hager_norm1(f.solve, f.d, L.dtype, L.device)
    return anorm * ainv if ainv > 0 else math.inf


def _jitter_shifts(jitter: str | float | None, scale: float) -> list[float]:
    if jitter == "auto":
        return [0.0] + [r * scale for r in settings.get("jitter_schedule")]
    if jitter is None:
        return [0.0]
    if isinstance(jitter, (int, float)) and not isinstance(jitter, bool) and jitter >= 0 and math.isfinite(jitter):
        return [float(jitter)]
    raise InputError(f"jitter must be 'auto', None or a finite non-negative number, got {jitter!r}")


def _cholesky_in_place(be: SolverBackend, C: torch.Tensor, shifts: list[float],
                       exactly_symmetric: bool) -> CholeskyResult:
    kernel = getattr(be, "cholesky_jittered_inplace", None)
    if kernel is not None:
        return kernel(C, shifts, exactly_symmetric=exactly_symmetric)
    res = be.cholesky_jittered(C, shifts)
    if res.L is None:
        return res
    with torch.no_grad():
        C.copy_(res.L)
    return CholeskyResult(C, res.shift_index, res.workspace_bytes)


def factorize(
    C: torch.Tensor,
    *,
    jitter: str | float | None = "auto",
    backend: str = "auto",
    overwrite_c: bool = False,
) -> Factor:
    """Cholesky-factor the preservation matrix C (d × d, symmetric PSD) once per layer.

    Args:
        C: the (mean) second moment of preservation keys, any float dtype, on any device.
        jitter: "auto" tries δ = 0, then δ = r·mean(diag C) for r in
            ``settings.jitter_schedule`` until the factorisation succeeds; a number fixes δ;
            None forbids jitter.
        backend: "auto", "cpu", "cuda" or "torch".
        overwrite_c: factor in C's own storage (C must be a contiguous float64 tensor); the
            returned ``factor.L`` *is* C afterwards. On the cpu backend no d × d buffer is
            allocated: half the peak memory, and none of the cost of fresh pages (up to 1 s per
            d = 6400 matrix on some VMs, docs/design.md §10). Other backends factor as usual and
            copy the factor into C. C is checked before it is touched: bad input leaves it as
            it was; if no δ works, C holds the symmetric matrix of its lower triangle (C itself
            when it was exactly symmetric).

    Raises:
        InputError: C is not a square, finite, symmetric float matrix; overwrite_c with a C
            that is not contiguous float64.
        NotPositiveDefiniteError: no allowed δ makes C + δI positive definite.
    """
    t0 = time.perf_counter()
    C = _check_float_matrix("C", C)
    if overwrite_c and (C.dtype != torch.float64 or not C.is_contiguous()):
        raise InputError(f"overwrite_c=True needs a contiguous float64 C to hold the fp64 factor, got "
                         f"{C.dtype}{'' if C.is_contiguous() else ', not contiguous'}")
    be = get_backend(backend, C.device)
    C, c_norm, exactly_symmetric = _validate_C(C, be)
    scale = float(torch.diagonal(C).to(torch.float64).mean())
    if scale <= 0:
        raise NotPositiveDefiniteError("C has an all-zero diagonal: no preservation statistics in it", matrix="C")
    shifts = _jitter_shifts(jitter, scale)
    res = _cholesky_in_place(be, C, shifts, exactly_symmetric) if overwrite_c else be.cholesky_jittered(C, shifts)
    if res.shift_index < 0 or res.L is None:
        raise NotPositiveDefiniteError(
            f"C + δI is not positive definite for any allowed δ (largest tried {shifts[-1]:.3g} = "
            f"{shifts[-1] / scale:.3g} * mean(diag C)); C is indefinite, not merely singular",
            matrix="C",
            tried=tuple(shifts),
        )
    delta = shifts[res.shift_index]
    if delta > 0 and jitter == "auto":
        warnings.warn(
            f"C is singular or nearly so: factored C + δI with δ = {delta:.3g} ({delta / scale:.1e} * mean(diag C))",
            NumericalWarning,
            stacklevel=2,
        )
    anorm = c_norm + delta  # = ‖C + δI‖₁ exactly, since diag C ≥ 0
    cond = be.cond_estimate(res.L, anorm)
    return Factor(
        L=res.L,
        jitter=delta,
        jitter_relative=delta / scale,
        cond=cond,
        scale=scale,
        dtype=C.dtype,
        backend=be.name,
        seconds=time.perf_counter() - t0,
        workspace_bytes=res.workspace_bytes,
        norm1=anorm,
    )


# ---------------------------------------------------------------------------
# solve
# ---------------------------------------------------------------------------


@dataclass
class SolveDiagnostics:
    """What one solve did and how good its answer is.

    residual: ‖ΔK − R‖_F / ‖R‖_F in fp64, before any rounding to the weight dtype.
    preservation_cost: tr(Δ C Δᵀ) with the C the factor stands for (δ removed; a low-rank
        term added by Factor.extend is part of that C).
    mu: μ actually used; ridge_fallback: True when μ had to be raised above the requested value.
    extra: what a variant of the solve adds (null-space projection, retained keys; see
        pmsolve.lifelong), empty for the plain solve.
    """

    method: str
    backend: str
    n: int
    d_in: int
    d_out: int
    mu_requested: float
    mu: float
    mu_relative: float
    ridge_fallback: bool
    cond_G: float
    jitter: float
    cond_C: float
    residual: float
    preservation_cost: float
    seconds: float
    peak_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Update:
    """A rank-n update Δ = U Bᵀ (U = R is d_out × n, B is d_in × n, both fp64).

    Never forms the d_out × d_in matrix unless :meth:`dense` is called;
    :meth:`apply_` adds it to a weight in row blocks.
    """

    U: torch.Tensor
    B: torch.Tensor
    diagnostics: SolveDiagnostics

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.B.shape[0])

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return (self.U @ self.B.mT).to(dtype)

    def to(self, device: torch.device | str) -> Update:
        return Update(self.U.to(device), self.B.to(device), self.diagnostics)

    def apply_(
        self,
        weight: torch.Tensor,
        *,
        layout: Literal["out_in", "in_out"] = "out_in",
        alpha: float = 1.0,
        block_rows: int = 1024,
    ) -> torch.Tensor:
        """weight += alpha·Δ in place, for nn.Linear ("out_in", d_out × d_in) or GPT-2 Conv1D ("in_out").

        The product is formed in fp64 one block of rows at a time and rounded once.
        """
        if layout == "out_in":
            left, right = self.U, self.B
        elif layout == "in_out":
            left, right = self.B, self.U
        else:
            raise InputError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
        expected = (left.shape[0], right.shape[0])
        if tuple(weight.shape) != expected:
            raise InputError(f"weight has shape {tuple(weight.shape)}, the update is {expected} in layout {layout!r}")
        left = left.to(weight.device)
        right = right.to(weight.device)
        with torch.no_grad():
            for i in range(0, expected[0], block_rows):
                blk = weight[i : i + block_rows]
                delta = alpha * (left[i : i + block_rows] @ right.mT)
                blk.copy_((blk.to(torch.float64) + delta).to(weight.dtype))
        return weight


def _resolve_mu(method: str, mu: float | None, n: int, d: int) -> float:
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if method == "rome" and n != 1:
        raise InputError(f"ROME edits one fact at a time (n = 1), got n = {n}; use method='emmet' for batches")
    if method in ("rome", "emmet") and n > d:
        raise InputError(
            f"{method} imposes n = {n} equality constraints on a d_in = {d} dimensional key space: "
            f"at most {d} can hold; use method='memit' or smaller batches"
        )
    if mu is None:
        mu = DEFAULT_MEMIT_LAMBDA if method == "memit" else 0.0
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
        raise InputError(f"mu must be a finite non-negative number, got {mu!r}")
    return float(mu)


def _conflicting_groups(G: torch.Tensor, R: torch.Tensor, max_cond: float,
                        scale: float | None = None) -> tuple[list[list[int]], float]:
    """Null directions z of G (keys dependent in the C⁻¹ metric) along which R z ≠ 0.

    Returns the groups of columns involved in inconsistent directions and the
    largest relative inconsistency ‖R z‖ / (‖R‖ ‖z‖). ``scale``: the eigenvalue that counts as
    "large" (default G's largest; a projected G passes the unprojected one's, since projection
    can shrink every eigenvalue).
    """
    evals, evecs = torch.linalg.eigh(G)
    top = scale if scale is not None else (float(evals[-1]) if evals.numel() else 0.0)
    # Called after the 1-norm estimate exceeded max_cond; κ₂ ≥ κ₁ / n, hence the factor n.
    null = evals <= top * G.shape[0] / max_cond
    groups: list[list[int]] = []
    worst = 0.0
    rnorm = float(torch.linalg.matrix_norm(R)) or 1.0
    for j in null.nonzero().flatten().tolist():
        z = evecs[:, j]
        bad = float(torch.linalg.vector_norm(R @ z)) / rnorm
        if bad > 1e-6:
            worst = max(worst, bad)
            cols = (z.abs() > 0.1 * z.abs().max()).nonzero().flatten().tolist()
            if cols not in groups:
                groups.append(cols)
    return groups, worst


def _prepare_keys(factor: Factor, K: Any, R: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(factor, Factor):
        raise InputError(f"factor must be a pmsolve.Factor (from pmsolve.factorize), got {type(factor).__name__}")
    K = _check_float_matrix("K", K)
    R = _check_float_matrix("R", R)
    if K.shape[0] != factor.d:
        raise InputError(f"K has {K.shape[0]} rows but the factor is for d_in = {factor.d}")
    if R.shape[1] != K.shape[1]:
        raise InputError(f"K has {K.shape[1]} columns (edits) but R has {R.shape[1]}; they must match")
    if K.shape[1] == 0:
        raise InputError("K has no columns: nothing to edit")
    if K.device != factor.device or R.device != factor.device:
        raise InputError(f"K ({K.device}) and R ({R.device}) must be on the factor's device {factor.device}")
    _check_finite("K", K)
    _check_finite("R", R)
    return K.to(torch.float64), R.to(torch.float64)


def solve(
    factor: Factor,
    K: torch.Tensor,
    R: torch.Tensor,
    *,
    method: Method = "emmet",
    mu: float | None = None,
    backend: str = "auto",
) -> Update:
    """Solve one edit batch: Δ = R (KᵀC⁻¹K + μI)⁻¹ (C⁻¹K)ᵀ.

    Args:
        factor: from :func:`factorize` (C + δI = LLᵀ).
        K: edit keys, d_in × n.  R: residuals V − W0 K, d_out × n.
        method: "emmet" (equality, batch), "rome" (equality, n = 1) or "memit" (least squares).
        mu: ridge on G. Defaults: 0 for equality methods (raised to the smallest ridge that
            works if G is singular, and reported), λ = 15000 for MEMIT.

    ``method="alphaedit"`` takes the :class:`pmsolve.NullSpaceFactor` of
    ``pmsolve.null_space(C).factorize(alpha)`` in place of ``factor`` and solves AlphaEdit's
    null-space projected update on this same core (μ defaults to 1; see pmsolve.lifelong).

    Raises:
        InputError: shapes, dtypes, devices, NaN/Inf, n > d for an equality method.
        ConflictingConstraintsError: dependent keys asked for different values under equality.
        NumericalError: no μ in the schedule gives a usable factorisation.
    """
    if method == "alphaedit" or not isinstance(factor, Factor):
        from .lifelong import NullSpaceFactor, solve_alphaedit  # lifelong builds on this module

        if method == "alphaedit" or isinstance(factor, NullSpaceFactor):
            return solve_alphaedit(factor, K, R, mu=mu, backend=backend, method=method)
    t0 = time.perf_counter()
    K, R = _prepare_keys(factor, K, R)
    n = K.shape[1]
    mu0 = _resolve_mu(method, mu, n, factor.d)
    be = get_backend(backend, K.device)
    max_cond = settings.get("max_cond")
    # The ridge schedule is relative to mean(diag G), which is known only once G is. The
    # requested μ almost always works, so try it alone first and pay for a second solve
    # (with the exact scale from that G) only when it fails, instead of estimating the
    # scale up front with an extra pass over the d × d factor on every call.
    sol = be.pm_solve(factor.L, K, [mu0], max_cond, factor.inv_sqrt)
    g_scale = _g_scale(sol.G)
    ridges = [mu0]
    if sol.mu_index < 0:
        ridges = [mu0] + [mu0 + r * g_scale for r in settings.get("ridge_schedule")]
        sol = be.pm_solve(factor.L, K, ridges[1:], max_cond, factor.inv_sqrt)
        sol.mu_index = sol.mu_index + 1 if sol.mu_index >= 0 else -1
    if sol.mu_index < 0 or sol.B is None:
        _raise_singular(method, sol.G, R, max_cond, ridges)
    mu_used = ridges[sol.mu_index]
    if sol.mu_index > 0 and method in ("emmet", "rome"):
        groups, worst = _conflicting_groups(sol.G, R, max_cond)
        if groups:
            raise ConflictingConstraintsError(
                f"equality constraints conflict: the keys of edits {groups} are (nearly) linearly dependent "
                f"but their residuals differ (relative inconsistency {worst:.3g}); the same subject cannot take "
                "two values. Remove the duplicates or use method='memit' (least squares).",
                columns=groups,
            )
    if mu_used > mu0:
        warnings.warn(
            f"G = KᵀC⁻¹K is singular or ill-conditioned for this batch: used ridge μ = {mu_used:.3g} "
            f"instead of {mu0:g} ({(mu_used - mu0) / g_scale:.1e} * mean(diag G))",
            NumericalWarning,
            stacklevel=2,
        )
    U = R.clone()
    diag = _diagnostics(factor, K, R, sol, method, be.name, mu0, mu_used, g_scale, time.perf_counter() - t0)
    return Update(U=U, B=sol.B, diagnostics=diag)


def _g_scale(G: torch.Tensor) -> float:
    """mean(diag G) = mean ‖L⁻¹k_i‖², the unit of the ridge schedule (1 for an all-zero G)."""
    s = float(torch.diagonal(G).mean())
    return s if s > 0 else 1.0


def _raise_singular(method: str, G: torch.Tensor, R: torch.Tensor, max_cond: float, ridges: list[float]) -> None:
    if method in ("emmet", "rome"):
        groups, worst = _conflicting_groups(G, R, max_cond)
        if groups:
            raise ConflictingConstraintsError(
                f"equality constraints conflict: the keys of edits {groups} are (nearly) linearly dependent but "
                f"their residuals differ (relative inconsistency {worst:.3g})",
                columns=groups,
            )
    raise NumericalError(
        f"G + μI stayed singular or too ill-conditioned (cond > {max_cond:g}) for every μ up to {ridges[-1]:.3g}; "
        "the edit keys are degenerate (check for zero or duplicated keys)"
    )


def _preservation_cost(B: torch.Tensor, G: torch.Tensor, M: torch.Tensor, R: torch.Tensor, jitter: float) -> float:
    """tr(Δ C Δᵀ) for Δ = R Bᵀ, from n × n and d_out × n work (plus one d-sized product when δ > 0).

    Bᵀ(C + δI)B = X G X with X = (G + μI)⁻¹ = (M Mᵀ)⁻¹, so with S = R X the cost is
    tr(S G Sᵀ) − δ‖B Rᵀ‖²_F. S comes from M by two triangular solves (d_out·n² flops), not from
    X's explicit inverse and two n³ products (at n = 1024 that took 90 of the solve's 940 ms).
    """
    S = torch.cholesky_solve(R.mT, M).mT  # R X (X symmetric)
    cost = float(((S @ G) * S).sum())
    if jitter:  # tr(RᵀR BᵀB) = ‖B Rᵀ‖²: through whichever inner product is smaller
        n, d_out = B.shape[1], R.shape[0]
        jitter_term = float(((R.mT @ R) * (B.mT @ B)).sum()) if n <= d_out else float(torch.sum((B @ R.mT) ** 2))
        cost -= jitter * jitter_term
    return cost


def _diagnostics(
    factor: Factor,
    K: torch.Tensor,
    R: torch.Tensor,
    sol: Any,
    method: str,
    backend: str,
    mu0: float,
    mu: float,
    g_scale: float,
    seconds: float,
) -> SolveDiagnostics:
    B, G = sol.B, sol.G
    # n × n: Δ K = R (Bᵀ K); the d × n² product from the final B is the honest check of the solves.
    BtK = sol.BtK if sol.BtK is not None else B.mT @ K
    residual = float(torch.linalg.matrix_norm(R @ BtK - R)) / max(float(torch.linalg.matrix_norm(R)), 1e-300)
    cost = _preservation_cost(B, G, sol.M, R, factor.jitter)
    return SolveDiagnostics(
        method=method,
        backend=backend,
        n=K.shape[1],
        d_in=K.shape[0],
        d_out=R.shape[0],
        mu_requested=mu0,
        mu=mu,
        mu_relative=mu / g_scale,
        ridge_fallback=mu > mu0,
        cond_G=sol.cond,
        jitter=factor.jitter,
        cond_C=factor.cond,
        residual=residual,
        preservation_cost=cost,
        seconds=seconds,
        peak_bytes=sol.workspace_bytes,
    )
