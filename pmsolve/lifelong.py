"""Lifelong (sequential) editing at the solver level: AlphaEdit's null-space projected update and
hard retention of earlier edits, both on the factor-once core of :mod:`pmsolve.solver`.

AlphaEdit (Fang et al., ICLR 2025) as a member of the PM family
---------------------------------------------------------------

U (d × r) spans the approximate null space of the preservation statistics C: the eigenvectors
whose eigenvalues lie below a cut. P = UUᵀ. With the keys of earlier edits K_p (C_p = K_p K_pᵀ,
accumulated per layer) and a ridge α > 0, the paper's update is

    Δ = R Kᵀ P (K Kᵀ P + C_p P + α I)⁻¹.                                          (1)

Write A = KKᵀ + C_p and X = Δ. From X (AP + αI) = R Kᵀ P, multiplying on the right by (I − P)
(P(I − P) = 0) leaves α X (I − P) = R Kᵀ P (I − P) = 0, so X = X P: the update lives in the
null space, X = Y Uᵀ with Y = X U (d_out × r). Multiplying (1)'s equation on the right by U
(UᵀU = I) gives Y (Uᵀ A U + α I) = R (UᵀK)ᵀ, i.e. with K_r = UᵀK (r × n) and

    A_r = α I + Uᵀ C_p U        (r × r, symmetric positive definite),

    Y = R K_rᵀ (A_r + K_r K_rᵀ)⁻¹ = R (K_rᵀ A_r⁻¹ K_r + I)⁻¹ (A_r⁻¹ K_r)ᵀ

(the push-through identity, as for MEMIT). That is the PM solve with preservation matrix A_r,
keys K_r and μ = 1: one Cholesky of A_r (:func:`pmsolve.factorize` on αI), each batch
O(r²n + d·r·n), earlier edits added to A_r by :meth:`pmsolve.Factor.extend` (a rank-n update,
not a refactor). The result is Δ = Y Uᵀ = R (U B_r)ᵀ: an ordinary :class:`pmsolve.Update` with
B = U B_r. A general μ ≥ 0 weighs the preservation against the memorization:
min ‖ΔK − R‖² + μ(α‖Δ‖² + ‖ΔK_p‖²) over Δ = ΔP, i.e. Δ = R Kᵀ P (KKᵀP + μC_pP + μαI)⁻¹; μ = 1
is the paper, μ = 0 makes the memorization an equality (EMMET inside the null space, n ≤ r).

C inside the kept directions. When C has no true null space (a small model's full-rank C), the
kept directions still carry preserved variance, and (1) puts no weight on it: an update there is
free however much it moves the preserved outputs. γ ≥ 0 (``c_weight``) adds γ·tr(ΔCΔᵀ) to the
preservation term, i.e. C_p → C_p + γC in (1); with Δ = YUᵀ this is γ·UᵀCU = γ·diag(λ_kept) on
A_r's diagonal, so nothing else changes. γ = 0 is the paper; γ = MEMIT's λ is MEMIT restricted to
the kept directions, with AlphaEdit's earlier-keys term and ridge.

The threshold. The paper's code cuts eigenvalues of the *mean* second moment below an absolute
1e-2 (2e-2 in its Llama3-8B configuration). An absolute cut is not scale free: the scale of MLP
hidden activations differs by orders of magnitude between models and layers (GELU outputs vs
SiLU-gated products; on SmolLM2 the mean eigenvalue is 0.101 at layer 2 and 0.015 at layer 4),
so one number keeps most directions in one layer and none in another. pmsolve's default is
relative: eigenvalues below ``threshold`` × (mean eigenvalue of C) = threshold · tr(C)/d, the same
unit as the jitter on C (mean(diag C)), with threshold 0.5. Measured on SmolLM2's C (100k tokens,
layers 3–6, d = 1536; C is full rank there, smallest eigenvalue ≈ 0.1 × the mean): the paper's
absolute 1e-2 falls at 0.48–0.97 × the mean eigenvalue and keeps r = 899–1141 directions holding
14–32 % of tr(C); 0.5 × mean keeps r = 770–921 holding 15 % of tr(C) in every one of those
layers. ("Null space" is a misnomer at this scale: C has none; the projection keeps the
low-variance directions.) ``relative_to="energy"`` keeps the most low-variance directions whose
eigenvalues sum to at most threshold · tr(C) (a bound on the share of preservation variance
an update there can touch); ``"max"`` measures from the largest eigenvalue; ``"absolute"``
reproduces the paper's cut. The absolute cut, the dimension kept and the share of tr(C) in the
kept directions are reported (:meth:`NullSpace.summary`, and in every solve's diagnostics).

Hard retention of earlier edits
-------------------------------

Each new batch keeps the outputs at every retained key exactly:

    Δ = argmin tr(Δ C Δᵀ)  s.t.  Δ K_prev = 0,  (W0 + Δ) K = V  (Δ K = R).

This is EMMET on the stacked keys [K_prev, K] with residuals [0, R]. With C = L Lᵀ (the cached
factor, with its jitter and low-rank term: whitening S L⁻¹), in whitened coordinates
Δ̃ = Δ L S⁻¹, Z = S L⁻¹ K, Z_p = S L⁻¹ K_prev, the problem is min ‖Δ̃‖_F² s.t. Δ̃ Z_p = 0,
Δ̃ Z = R. Its minimiser has rows in span(Z_p, Z) orthogonal to Z_p, i.e. in span(Ẑ) with
Ẑ = (I − QQᵀ) Z, Q an orthonormal basis of span(Z_p). Writing Δ̃ = Y Ẑᵀ, Δ̃ Z = Y ẐᵀZ = Y ẐᵀẐ,
so Y = R (ẐᵀẐ)⁻¹ and

    Δ = R (Ĝ + μI)⁻¹ (L⁻ᵀ S Ẑ)ᵀ,      Ĝ = ẐᵀẐ.

Q is kept and grown per batch (an orthonormal basis of the new Ẑ, appended), so a batch of n
keys against m retained ones costs O(d²n) for the two triangular solves plus O(d·m·n) for the
projection: no refactor and no (m + n)² system. μ > 0 ("memit") minimises
μ tr(ΔCΔᵀ) + ‖ΔK − R‖² under the same retention constraints, with the same formula. In every
case Δ Z_p = 0 holds by construction (rows of Δ̃ ⟂ Q), also when a ridge relaxes the new
constraints: the retained outputs do not move. Capacity: at most d independent equality
constraints fit in a d-dimensional key space; m + n > d is refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import settings
from ._io import atomic_write, read_safetensors, tensor_checksum
from .backends import get_backend
from .backends.torch_backend import apply_inv_sqrt_, hager_cond_1norm
from .errors import (
    CacheError,
    CapacityError,
    ConflictingConstraintsError,
    InputError,
    NumericalError,
    NumericalWarning,
)
from .solver import (
    DEFAULT_MEMIT_LAMBDA,
    Factor,
    SolveDiagnostics,
    Update,
    _check_finite,
    _check_float_matrix,
    _conflicting_groups,
    _preservation_cost,
    _validate_C,
    factorize,
    solve,
)

F64 = torch.float64
RELATIVE_TO = ("mean", "max", "energy", "absolute")
DEFAULT_NULLSPACE_THRESHOLD = 0.5  # × the mean eigenvalue; see the module docstring
DEFAULT_ALPHA = 1.0  # the ridge of the paper's closed form (its code's Llama3-8B setting: 10)
_NULLSPACE_FORMAT = "pmsolve.nullspace/1"
_ALPHAEDIT_FORMAT = "pmsolve.alphaedit/1"  # a NullSpace plus A_r and α
_RETAINED_FORMAT = "pmsolve.retained/1"
RETENTION_METHODS = ("emmet", "memit")


def _check_number(name: str, x: Any, *, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise InputError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {x!r}")
    return float(x)


def _check_keys(name: str, K: Any, d: int, device: torch.device, what: str) -> torch.Tensor:
    K = _check_float_matrix(name, K)
    if K.shape[0] != d:
        raise InputError(f"{name} has {K.shape[0]} rows but {what} is for keys of width d_in = {d}")
    if K.device != device:
        raise InputError(f"{name} ({K.device}) must be on {what}'s device {device}")
    _check_finite(name, K)
    return K


def _check_batch(K: Any, R: Any, d: int, device: torch.device, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    K = _check_keys("K", K, d, device, what)
    R = _check_float_matrix("R", R)
    if R.shape[1] != K.shape[1]:
        raise InputError(f"K has {K.shape[1]} columns (edits) but R has {R.shape[1]}; they must match")
    if K.shape[1] == 0:
        raise InputError("K has no columns: nothing to edit")
    if R.device != device:
        raise InputError(f"R ({R.device}) must be on {what}'s device {device}")
    _check_finite("R", R)
    return K.to(F64), R.to(F64)


# ---------------------------------------------------------------------------
# null space (AlphaEdit)
# ---------------------------------------------------------------------------


@dataclass(eq=False)  # tensors inside: identity, not elementwise ==
class NullSpace:
    """Orthonormal basis U (d × r) of the approximate null space of C, computed once per layer.

    Attributes:
        U: d × r fp64, the eigenvectors of C whose eigenvalues lie below ``cut``.
        eigenvalues: all d eigenvalues of C (fp64, ascending); the first r belong to U.
        threshold, relative_to: as given to :func:`null_space`.
        scale: the unit the threshold was measured in (tr(C)/d, λ_max or 1).
        cut: the absolute eigenvalue cut, threshold · scale; kept: λ < cut.
        meta: what the caller recorded (model, layer, statistics...), saved with the file.
    """

    U: torch.Tensor
    eigenvalues: torch.Tensor
    threshold: float
    relative_to: str
    scale: float
    cut: float
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.U.shape[0]

    @property
    def r(self) -> int:
        return self.U.shape[1]

    @property
    def device(self) -> torch.device:
        return self.U.device

    @property
    def kept_energy(self) -> float:
        """Share of tr(C) in the kept directions: the preservation an edit there can disturb."""
        lam = self.eigenvalues.clamp_min(0)
        total = float(lam.sum())
        return float(lam[: self.r].sum()) / total if total > 0 else 0.0

    def project(self, K: torch.Tensor) -> torch.Tensor:
        """Uᵀ K (r × n, fp64): keys in null-space coordinates."""
        K = _check_keys("K", K, self.d, self.device, "the null space")
        return self.U.mT @ K.to(F64)

    def factorize(self, alpha: float = DEFAULT_ALPHA, *, keys: torch.Tensor | None = None, weight: float = 1.0,
                  c_weight: float = 0.0, backend: str = "auto") -> NullSpaceFactor:
        """The per-layer AlphaEdit factor: Cholesky of
        A_r = αI + c_weight·UᵀCU + weight·Uᵀ keys keysᵀ U (r × r), UᵀCU = diag(kept eigenvalues).

        ``keys`` (d × m) are earlier edits' keys, if any; more are added later with
        :meth:`NullSpaceFactor.extend`. ``c_weight`` γ ≥ 0 weighs C itself inside the kept
        directions (module docstring); 0 is the paper's AlphaEdit.
        """
        alpha = _check_number("alpha", alpha, positive=True)
        c_weight = _check_number("c_weight", c_weight)
        if c_weight < 0:
            raise InputError(f"c_weight must be >= 0, got {c_weight:g}")
        A = torch.eye(self.r, dtype=F64, device=self.device).mul_(alpha)
        if c_weight > 0:
            A.diagonal().add_(self.eigenvalues[: self.r].clamp_min(0), alpha=c_weight)
        f = NullSpaceFactor(self, factorize(A, jitter=None, backend=backend), alpha, 0, A, backend, c_weight)
        return f.extend(keys, weight) if keys is not None else f

    def summary(self) -> dict[str, Any]:
        lam = self.eigenvalues
        return {
            "d": self.d,
            "r": self.r,
            "threshold": self.threshold,
            "relative_to": self.relative_to,
            "scale": self.scale,
            "cut": self.cut,
            "kept_energy": self.kept_energy,
            "eigenvalue_min": float(lam[0]),
            "eigenvalue_max": float(lam[-1]),
            "largest_kept": float(lam[self.r - 1]),
            "smallest_cut_off": float(lam[self.r]) if self.r < self.d else None,
            "seconds": self.seconds,
            **self.meta,
        }

    def to(self, device: torch.device | str) -> NullSpace:
        return replace(self, U=self.U.to(device), eigenvalues=self.eigenvalues.to(device))

    def _info(self) -> dict[str, Any]:
        return {"d": self.d, "r": self.r, "threshold": self.threshold, "relative_to": self.relative_to,
                "scale": self.scale, "cut": self.cut, "seconds": self.seconds}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"U": self.U, "eigenvalues": self.eigenvalues}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomic safetensors file: U, the eigenvalues, the cut and ``meta`` (checked on load)."""
        _write_file(path, _NULLSPACE_FORMAT, self._tensors(), self._info(), self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, expect: dict[str, Any] | None = None,
             map_location: str | torch.device = "cpu") -> NullSpace:
        """Read a file written by :meth:`save`. ``expect``: entries that ``meta`` must hold
        (e.g. ``{"model": ..., "layer": 4}``); a mismatch is a CacheError naming the entry."""
        tensors, info, meta = _read_file(path, _NULLSPACE_FORMAT, {"U", "eigenvalues"}, "null-space", expect)
        return cls._from_file(path, tensors, info, meta, map_location)

    @classmethod
    def _from_file(cls, path, tensors, info, meta, map_location) -> NullSpace:
        try:
            d, r, cut = int(info["d"]), int(info["r"]), float(info["cut"])
            threshold, relative_to, scale = float(info["threshold"]), str(info["relative_to"]), float(info["scale"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CacheError(f"file {path} has malformed null-space metadata: {exc}") from exc
        U, lam = tensors["U"], tensors["eigenvalues"]
        if (U.shape != (d, r) or lam.shape != (d,) or U.dtype != F64 or lam.dtype != F64
                or int((lam < cut).sum()) != r):
            raise CacheError(f"file {path} is inconsistent: U {tuple(U.shape)}, {lam.numel()} eigenvalues, "
                             f"d = {d}, r = {r}")
        return cls(U=U.to(map_location), eigenvalues=lam.to(map_location), threshold=threshold,
                   relative_to=relative_to, scale=scale, cut=cut, seconds=float(info.get("seconds", 0.0)), meta=meta)


def _write_file(path: str | os.PathLike[str], fmt: str, tensors: dict[str, torch.Tensor], info: dict[str, Any],
                meta: dict[str, Any]) -> None:
    """Atomic safetensors file: fp64 tensors, ``info`` (what the object needs) and ``meta`` (what
    the caller recorded) as JSON, and a SHA-256 of the tensor bytes."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", F64).contiguous() for k, v in tensors.items()}
    metadata = {"format": fmt, "info": json.dumps(info), "meta": json.dumps(meta), "sha256": tensor_checksum(tensors)}
    atomic_write(path, save(tensors, metadata=metadata))


def _read_file(path: str | os.PathLike[str], fmt: str, names: set[str], what: str,
               expect: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Inverse of _write_file; CacheError for a missing, truncated, corrupt or foreign file, and for
    ``expect`` entries that ``meta`` does not hold."""
    tensors, metadata = read_safetensors(path, what)
    if metadata.get("format") != fmt:
        raise CacheError(f"{path} is not a pmsolve {what} file (format {metadata.get('format')!r}, expected {fmt!r})")
    if set(tensors) != names or tensor_checksum(tensors) != metadata.get("sha256"):
        raise CacheError(f"{what} file {path} is corrupt: its tensors or their checksum do not match")
    try:
        info, meta = json.loads(metadata["info"]), json.loads(metadata["meta"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CacheError(f"{what} file {path} has malformed metadata: {exc}") from exc
    for k, v in (expect or {}).items():
        if meta.get(k) != v:
            raise CacheError(f"{what} file {path} was computed for {k} = {meta.get(k)!r}, expected {v!r}")
    return tensors, info, meta


def _factor_fingerprint(f: Factor) -> str:
    """A hash of what whitening depends on, from O(d + d·k) entries: the diagonal, first column
    and last row of L, the jitter, and the low-rank term's columns."""
    L = f.L.detach().to("cpu", F64)
    parts = [torch.diagonal(L), L[:, 0], L[-1, :], torch.tensor([f.jitter], dtype=F64)]
    if f.lowrank is not None:
        parts.append(f.lowrank.U.detach().to("cpu", F64).flatten())
    h = hashlib.sha256()
    for t in parts:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def null_space(
    C: torch.Tensor,
    *,
    threshold: float = DEFAULT_NULLSPACE_THRESHOLD,
    relative_to: str = "mean",
    meta: dict[str, Any] | None = None,
) -> NullSpace:
    """The approximate null space of the preservation statistics C (d × d, symmetric PSD).

    One fp64 eigendecomposition (O(d³), once per layer; cache it with :meth:`NullSpace.save`).
    Kept: eigenvectors with eigenvalue < cut, cut = threshold × (tr(C)/d for ``"mean"``, the
    largest eigenvalue for ``"max"``, 1 for ``"absolute"``: the paper's absolute cut on the mean
    second moment, 1e-2 in the paper, 2e-2 in its Llama3-8B configuration). ``"energy"``: the r
    smallest eigenvalues with the largest r whose sum is ≤ threshold · tr(C) (threshold ≤ 1);
    ``cut`` is then the smallest eigenvalue left out. See the module docstring for the default.

    Raises:
        InputError: C not a square, finite, symmetric float matrix; threshold not > 0;
            relative_to unknown; C all zero with a relative cut.
        NotPositiveDefiniteError: a negative diagonal entry (not a second moment).
        CapacityError: no eigenvalue below the cut (empty null space), naming d, the eigenvalue
            range and the cut.
    """
    t0 = time.perf_counter()
    threshold = _check_number("threshold", threshold, positive=True)
    if relative_to not in RELATIVE_TO:
        raise InputError(f"relative_to must be one of {RELATIVE_TO}, got {relative_to!r}")
    C = _check_float_matrix("C", C)
    C, _, _ = _validate_C(C, get_backend("torch", C.device))
    A = C.to(F64)
    A = 0.5 * (A + A.mT)
    lam, V = torch.linalg.eigh(A)
    d = A.shape[0]
    if relative_to == "energy" and threshold > 1:
        raise InputError(f"threshold is a share of tr(C) with relative_to='energy': at most 1, got {threshold:g}")
    if relative_to == "mean":
        scale = float(lam.sum()) / d
    elif relative_to == "max":
        scale = float(lam[-1])
    elif relative_to == "energy":
        energy = torch.cumsum(lam.clamp_min(0), 0)
        scale = float(energy[-1])  # the cumulative sum's own total: threshold 1 keeps every direction
    else:
        scale = 1.0
    if scale <= 0:
        raise InputError(f"C is zero (tr(C) = {float(lam.sum()):.3g}): a cut relative to its {relative_to} "
                         "eigenvalue is meaningless; pass relative_to='absolute'")
    if relative_to == "energy":
        # ascending eigenvalues: the longest prefix within the budget, ties at its end left out
        r = int((energy <= threshold * scale).sum())
        cut = float(lam[r]) if r < d else math.inf
        r = int((lam < cut).sum())
        unit = "x tr(C) =" if r else "x tr(C): the smallest eigenvalue alone exceeds that share of"
    else:
        cut = threshold * scale
        r = int((lam < cut).sum())
        unit = f"x {relative_to} eigenvalue"
    if r == 0:
        raise CapacityError(
            f"the null space of C is empty: all d = {d} eigenvalues lie in "
            f"[{float(lam[0]):.3g}, {float(lam[-1]):.3g}], none below the cut {cut:.3g} (threshold {threshold:g} "
            f"{unit} {scale:.3g}); raise the threshold, or use a method without projection",
            required=1,
            available=0,
        )
    return NullSpace(U=V[:, :r].contiguous(), eigenvalues=lam, threshold=threshold, relative_to=relative_to,
                     scale=scale, cut=cut, seconds=time.perf_counter() - t0, meta=dict(meta or {}))


@dataclass(eq=False)  # tensors inside: identity, not elementwise ==
class NullSpaceFactor:
    """AlphaEdit's per-layer state: the null space U and the Cholesky factor of
    A_r = αI + Uᵀ C_p U (r × r), C_p = Σ weight·k kᵀ over the earlier edits' keys.

    Pass it to ``pmsolve.solve(nsf, K, R, method="alphaedit")``. Immutable like
    :class:`pmsolve.Factor`: :meth:`extend` returns a new one.
    """

    null_space: NullSpace
    factor: Factor
    alpha: float
    earlier_keys: int = 0
    A: torch.Tensor | None = None  # A_r itself (r × r fp64), for refactoring without forming LLᵀ
    backend: str = "auto"
    c_weight: float = 0.0  # γ: the weight of C inside the kept directions (0: the paper)

    @property
    def d(self) -> int:
        return self.null_space.d

    @property
    def r(self) -> int:
        return self.null_space.r

    @property
    def device(self) -> torch.device:
        return self.null_space.device

    def extend(self, keys: torch.Tensor | None, weight: float = 1.0) -> NullSpaceFactor:
        """Add earlier edits' keys (d × m) to C_p: A_r + weight·(Uᵀkeys)(Uᵀkeys)ᵀ.

        While the accumulated added columns stay within r/16 (_LOWRANK_SHARE), a rank-m
        extension of the r × r factor (:meth:`pmsolve.Factor.extend`, O(r²m) plus an SVD of the
        r × k term); past that, a Cholesky of the kept A_r (r³/3, on the backend's native
        kernel). At r ~ 10·n the refactor is the cheaper: at r = 952 with 100 new keys both took
        ~0.21 s at best, the extension 1.3–2.0 s median against 0.7 s for the refactor on a loaded
        2-core machine (its many small steps suffer most from contention), and 19 batches of
        extend + solve took 14.8 s with the r/16 rule against 29.6 s with Factor.extend's own
        1/4 (whose refactor also forms LLᵀ first, r³ more). Both routes are exact.
        """
        weight = _check_number("weight", weight)
        if keys is None:
            return self
        keys = _check_keys("keys", keys, self.d, self.device, "the null space")
        if keys.shape[1] == 0 or weight == 0:
            return self
        Kr = self.null_space.U.mT @ keys.to(F64)
        A = self.A if self.A is not None else _dense(self.factor)
        A = torch.addmm(A, Kr, Kr.mT, alpha=weight)  # a new tensor: this object stays as it was
        cols = (self.factor.lowrank.rank if self.factor.lowrank is not None else 0) + Kr.shape[1]
        if cols <= _LOWRANK_SHARE * self.r:
            inner = self.factor.extend(Kr, weight)
        else:
            inner = factorize(A, jitter=None, backend=self.backend)
        return NullSpaceFactor(self.null_space, inner, self.alpha, self.earlier_keys + keys.shape[1], A, self.backend,
                               self.c_weight)

    def to(self, device: torch.device | str) -> NullSpaceFactor:
        return NullSpaceFactor(self.null_space.to(device), self.factor.to(device), self.alpha, self.earlier_keys,
                               self.A.to(device) if self.A is not None else None, self.backend, self.c_weight)

    def summary(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "c_weight": self.c_weight, "earlier_keys": self.earlier_keys,
                "null_space": self.null_space.summary(),
                "factor": self.factor.summary()}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomic safetensors file: the null space, A_r, α, γ and the count of earlier keys (the null
        space's ``meta`` is the file's); :meth:`load` refactors A_r (r³/3)."""
        A = self.A if self.A is not None else _dense(self.factor)
        info = {**self.null_space._info(), "alpha": self.alpha, "c_weight": self.c_weight,
                "earlier_keys": self.earlier_keys}
        _write_file(path, _ALPHAEDIT_FORMAT, {**self.null_space._tensors(), "A": A}, info, self.null_space.meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, expect: dict[str, Any] | None = None,
             backend: str = "auto") -> NullSpaceFactor:
        """Read a file written by :meth:`save` (on the CPU); ``expect`` as for NullSpace.load."""
        tensors, info, meta = _read_file(path, _ALPHAEDIT_FORMAT, {"U", "eigenvalues", "A"}, "AlphaEdit state",
                                         expect)
        ns = NullSpace._from_file(path, tensors, info, meta, "cpu")
        A = tensors["A"]
        try:
            alpha, earlier = float(info["alpha"]), int(info["earlier_keys"])
            c_weight = float(info.get("c_weight", 0.0))  # files from before γ existed: the paper's 0
        except (KeyError, ValueError, TypeError) as exc:
            raise CacheError(f"AlphaEdit state file {path} has malformed metadata: {exc}") from exc
        if A.shape != (ns.r, ns.r):
            raise CacheError(f"AlphaEdit state file {path} is inconsistent: A_r is {tuple(A.shape)}, r = {ns.r}")
        return cls(ns, factorize(A, jitter=None, backend=backend), alpha, earlier, A, backend, c_weight)


# NullSpaceFactor.extend: low-rank extension up to this share of r accumulated columns, then a
# Cholesky of A_r (see its docstring).
_LOWRANK_SHARE = 1 / 16


def _dense(f: Factor) -> torch.Tensor:
    """The matrix a factor stands for, LLᵀ (+ UUᵀ), for a NullSpaceFactor built without A."""
    L = torch.tril(f.L)
    A = L @ L.mT
    if f.lowrank is not None:
        A.addmm_(f.lowrank.U, f.lowrank.U.mT)
    return A


def solve_alphaedit(
    factor: NullSpaceFactor,
    K: torch.Tensor,
    R: torch.Tensor,
    *,
    mu: float | None = None,
    backend: str = "auto",
    method: str = "alphaedit",
) -> Update:
    """Δ = R Kᵀ P (K Kᵀ P + μ (C_p + γC) P + μ α I)⁻¹ by the PM solve in null-space coordinates
    (module docstring); μ defaults to 1 (the paper). What ``pmsolve.solve(..., method="alphaedit")``
    calls.

    Diagnostics: ``residual`` ‖ΔK − R‖/‖R‖; ``preservation_cost`` that of the projected problem,
    tr(Y A_r Yᵀ) = α‖Δ‖² + γ tr(ΔCΔᵀ) + ‖ΔK_p‖²; ``cond_C`` the condition estimate of A_r; ``extra`` the
    null-space dimension r and cut, the share of tr(C) kept, the preservation cost on C itself
    tr(ΔCΔᵀ) (what the projection leaves), the share ‖UᵀK‖/‖K‖ of the keys inside the null space,
    α, γ and the number of earlier keys.

    Raises:
        InputError: not a NullSpaceFactor, another method, keys of the wrong width, bad R or μ.
        CapacityError: μ = 0 with more edits than null-space dimensions.
        ConflictingConstraintsError, NumericalError: as :func:`pmsolve.solve` on the projected keys.
    """
    t0 = time.perf_counter()
    if not isinstance(factor, NullSpaceFactor):
        raise InputError(
            "method='alphaedit' solves in the null space of C: pass the NullSpaceFactor of "
            f"pmsolve.null_space(C).factorize(alpha), not a {type(factor).__name__}"
        )
    if method != "alphaedit":
        raise InputError(f"a NullSpaceFactor solves method='alphaedit' only, got method={method!r}")
    K, R = _check_batch(K, R, factor.d, factor.device, "the null space")
    mu = 1.0 if mu is None else _check_number("mu", mu)
    ns, n = factor.null_space, K.shape[1]
    if mu == 0 and n > ns.r:
        raise CapacityError(
            f"alphaedit with mu = 0 imposes n = {n} equality constraints inside a null space of dimension "
            f"r = {ns.r} (d = {ns.d}): at most r can hold; use mu > 0 (the paper's mu = 1) or a larger threshold",
            required=n,
            available=ns.r,
        )
    Kr = ns.U.mT @ K
    inner = solve(factor.factor, Kr, R, method="memit" if mu > 0 else "emmet", mu=mu, backend=backend)
    Br = inner.B
    B = ns.U @ Br
    # tr(Δ C Δᵀ) with Δ = R Brᵀ Uᵀ and UᵀCU = diag(λ_kept): tr((Brᵀ Λ Br)(RᵀR)), n × n work.
    lam = ns.eigenvalues[: ns.r].clamp_min(0).unsqueeze(1)
    cost_c = float(((Br.mT @ (lam * Br)) * (R.mT @ R)).sum())
    knorm = float(torch.linalg.matrix_norm(K))
    extra = {
        "null_space_dim": ns.r,
        "eigenvalue_cut": ns.cut,
        "threshold": ns.threshold,
        "relative_to": ns.relative_to,
        "kept_energy": ns.kept_energy,
        "key_share_in_null_space": float(torch.linalg.matrix_norm(Kr)) / knorm if knorm > 0 else 0.0,
        "preservation_cost_C": cost_c,
        "alpha": factor.alpha,
        "c_weight": factor.c_weight,
        "earlier_keys": factor.earlier_keys,
    }
    diag = replace(inner.diagnostics, method="alphaedit", d_in=ns.d, seconds=time.perf_counter() - t0, extra=extra)
    return Update(U=inner.U, B=B, diagnostics=diag)


# ---------------------------------------------------------------------------
# hard retention
# ---------------------------------------------------------------------------


def _native_solver(L: torch.Tensor, n: int) -> Any | None:
    """The cpu backend when it runs triangular solves of n columns natively (the recursive solve
    on GEMM that pmsolve.solve uses; MKL's dtrsm through torch runs at about half that rate on
    AMD CPUs), else None (torch solves)."""
    if L.device.type != "cpu" or L.requires_grad:
        return None
    try:
        from .backends import cpu as cpu_backend
    except ImportError:  # no native module
        return None
    if n < cpu_backend.NATIVE_TRSM_MIN_N:
        return None
    be = get_backend("auto", L.device)
    mod = getattr(be, "_C", None)
    return be if be.name == "cpu" and mod is not None and hasattr(mod, "triangular_solve") else None


def _triangular(L: torch.Tensor, X: torch.Tensor, *, transpose: bool) -> torch.Tensor:
    """L⁻¹X (L⁻ᵀX with ``transpose``) into a new d × n tensor, natively where _native_solver says so."""
    be = _native_solver(L, X.shape[1])
    if be is None:
        return torch.linalg.solve_triangular(L.mT if transpose else L, X, upper=transpose)
    be._sync_threads()
    L_arr = L.numpy() if L.is_contiguous() else L.mT.contiguous().mT.numpy()  # no copy either way
    Z = X.to(F64).clone(memory_format=torch.contiguous_format)
    be._C.triangular_solve(L_arr, Z.numpy(), transpose)
    return Z


def _whiten(factor: Factor, K: torch.Tensor) -> torch.Tensor:
    """S L⁻¹ K: keys in the coordinates where the preservation metric is the identity."""
    return apply_inv_sqrt_(_triangular(factor.L, K, transpose=False), factor.inv_sqrt)


def _unwhiten(factor: Factor, W: torch.Tensor) -> torch.Tensor:
    """L⁻ᵀ S W (W is overwritten)."""
    return _triangular(factor.L, apply_inv_sqrt_(W, factor.inv_sqrt), transpose=True)


def _col_norms2(Z: torch.Tensor) -> torch.Tensor:
    """Squared column norms without a d × n temporary (Z.square() would allocate one)."""
    return torch.linalg.vector_norm(Z, dim=0).square_()


# A column that keeps less than this share of its length in the first Gram–Schmidt pass is
# projected a second time (see _project_out).
_REORTHOGONALISE_BELOW = 0.1


def _project_out(Q: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """(I − QQᵀ) Z in place by classical Gram–Schmidt, with a second pass where it matters.

    One pass with an orthonormal Q leaves components along Q of order ε√m‖z‖ (rounding in QᵀZ
    and in the subtraction). A retained output then moves by a relative ε√m‖z‖/‖ẑ‖ (through
    ẐᵀZ_prev), and the memorization is off by ε√m(‖z‖/‖ẑ‖)² (Ĝ = ẐᵀẐ differs from ẐᵀZ by
    (ẐᵀQ)(QᵀZ)). Columns that kept ≥ 10 % of their length stay within 100·ε√m (≤ 1e-12 for
    m ≤ 2000) after one pass; the others get a second pass, which brings the components along Q
    to ε√m‖ẑ‖ ("twice is enough"). A second pass on every column would double the projection's
    4·d·m·n flops: at m ≈ d that is four times the batch's two triangular solves.
    """
    if Q.shape[1] == 0 or Z.shape[1] == 0:
        return Z
    before = _col_norms2(Z)
    Z.addmm_(Q, Q.mT @ Z, alpha=-1.0)  # in place: no d × n temporary
    redo = (_col_norms2(Z) < _REORTHOGONALISE_BELOW**2 * before).nonzero().flatten()
    if redo.numel() == Z.shape[1]:
        Z.addmm_(Q, Q.mT @ Z, alpha=-1.0)
    elif redo.numel():
        Zr = Z[:, redo]
        Zr.addmm_(Q, Q.mT @ Zr, alpha=-1.0)
        Z[:, redo] = Zr
    return Z


# eigh of ẐᵀẐ resolves singular values of Ẑ down to about √ε·σ_max; each round of _grow_basis
# keeps those above 1e-6·σ_max of what is left and passes the remainder to the next round.
_ROUND_RESOLUTION = 1e-12  # on eigenvalues: (1e-6)²
_MAX_ROUNDS = 4


def _cholqr2(W: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning W (d × k, well conditioned: κ ≲ 1.1 here) by Cholesky QR done
    twice: two k × k Cholesky factors and triangular solves, GEMM-rate work. Orthonormal to ~ε
    when κ(W)²ε ≪ 1 (Yamamoto et al. 2015); the first pass brings κ to ~1, the second cleans up."""
    for _ in range(2):
        G = W.mT @ W
        L = torch.linalg.cholesky(0.5 * (G + G.mT))
        W = torch.linalg.solve_triangular(L.mT, W, upper=True, left=False)  # W L⁻ᵀ
    return W


def _grow_basis(Q: torch.Tensor, Zh: torch.Tensor, zmax: float, rtol: float) -> torch.Tensor:
    """Q with an orthonormal basis of span(Ẑ) appended (Ẑ already ⟂ Q).

    Directions with singular value ≤ rtol·max‖z_j‖ are dropped: there Ẑ is rounding noise of the
    projection (whitened keys carry relative errors up to ε·κ(L)), and constraining noise would
    spend capacity on directions no retained key has. A dropped direction d of a key k leaves
    |Δ̃ d| ≤ rtol·‖Δ̃‖·‖z‖ at that key: the retention error it allows.

    Only GEMMs and k × k factorisations: torch's LAPACK SVD and QR of a tall d × k matrix took
    0.65 s and 0.26 s at d = 1536, k = 100 on a loaded 2-core machine (MKL's threads waiting on
    each other; 10 and 3 ms single-threaded), more than the whole batch's solve. Per round:
    eigh(RᵀR) gives the directions whose singular values eigh resolves (≥ 1e-6 of the largest
    left), W = R V Λ^(-1/2) (unit columns, mutual products ≲ 1e-4), a pass against the basis so
    far where needed, Cholesky QR twice; the remainder R − W WᵀR goes to the next round.
    """
    if Zh.shape[1] == 0 or zmax == 0:
        return Q
    tol2 = (rtol * zmax) ** 2
    basis = Q
    R = Zh
    for _ in range(_MAX_ROUNDS):
        G = R.mT @ R
        lam, V = torch.linalg.eigh(0.5 * (G + G.mT))
        top = float(lam[-1])
        if top <= tol2:
            break
        keep = lam > max(tol2, _ROUND_RESOLUTION * top)
        W = (R @ V[:, keep]) / lam[keep].sqrt()
        # W ⟂ basis only to about ε√m·zmax/σ: one more pass (4·d·m·k flops) where that may
        # exceed ~1e-11, i.e. σ < 1e-4·zmax; in the first round (the basis is Q) usually not.
        if basis.shape[1] and float(lam[keep].min()) < (1e-4 * zmax) ** 2:
            W = W - basis @ (basis.mT @ W)
        W = W[:, _col_norms2(W) > 0.25]  # collapsed: already in the basis (the space is full)
        if W.shape[1] == 0:
            break
        W = _cholqr2(W)
        basis = torch.cat([basis, W], 1)
        if W.shape[1] == R.shape[1]:  # full column rank: nothing can be left
            break
        R = R - W @ (W.mT @ R)
    return basis


def _grow_basis_factored(Q: torch.Tensor, W: torch.Tensor, zmax: float, inv_norm: float) -> torch.Tensor:
    """_grow_basis when the solve has factored ẐᵀẐ = M Mᵀ (no ridge): W = Ẑ M⁻ᵀ is orthonormal up
    to ε·κ(Ĝ) ≤ ε·max_cond (Cholesky QR), and one more Cholesky QR pass makes it orthonormal to ε.
    Every direction is kept: the solve accepted σ_min(Ẑ)² ≥ max‖z‖²/max_cond, far above the
    rank cut. Against Q, as in _grow_basis: one more pass where σ_min < 1e-4·zmax
    (σ_min² ≥ 1/‖Ĝ⁻¹‖₁ ≥ 1/inv_norm, so that is tested on inv_norm)."""
    if Q.shape[1] and 1.0 / inv_norm < (1e-4 * zmax) ** 2:
        W = W - Q @ (Q.mT @ W)
    G = W.mT @ W
    L = torch.linalg.cholesky(0.5 * (G + G.mT))
    return torch.cat([Q, torch.linalg.solve_triangular(L.mT, W, upper=True, left=False)], 1)


@dataclass(eq=False)  # tensors inside: identity, not elementwise ==
class RetainedKeys:
    """Keys whose outputs later batches keep exactly (hard retention), for one layer.

    ``RetainedKeys(factor)`` starts empty, ``RetainedKeys(factor, keys)`` retains ``keys`` (d × m).
    :meth:`solve` edits a new batch without moving the outputs at the retained keys;
    :meth:`extend` adds keys (usually the batch just applied) and returns a new object. The
    object holds the raw keys (d × count, fp64; :meth:`with_factor` rebuilds the basis for
    another factor) and an orthonormal basis Q (d × rank) of the whitened keys S L⁻¹ keys.

    Attributes:
        factor: the factor of C (+ jitter, + any low-rank term) the basis belongs to.
        keys: every retained key, d × count fp64.
        Q: orthonormal basis of the whitened retained keys, d × rank fp64 (built from ``keys``;
            passed in only by :meth:`extend`).
        rank_rtol: relative singular-value cut below which a retained key adds no direction
            (it is already in the span; see _grow_basis).
    """

    factor: Factor
    keys: torch.Tensor | None = None
    Q: torch.Tensor | None = None
    rank_rtol: float = 1e-10
    _last: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.factor, Factor):
            raise InputError("factor must be a pmsolve.Factor (from pmsolve.factorize), "
                             f"got {type(self.factor).__name__}")
        self.rank_rtol = _check_number("rank_rtol", self.rank_rtol)
        d, dev = self.factor.d, self.factor.device
        if self.keys is None:
            self.keys = torch.zeros(d, 0, dtype=F64, device=dev)
        else:
            self.keys = _check_keys("keys", self.keys, d, dev, "the factor").to(F64, copy=True)  # not the caller's
        if self.Q is None:  # in blocks of 256 keys: the k × k eigenproblems stay small
            Q = torch.zeros(d, 0, dtype=F64, device=dev)
            for j in range(0, self.count, 256):
                Z, zmax = self._whitened_projected(self.keys[:, j : j + 256], Q)
                Q = _grow_basis(Q, Z, zmax, self.rank_rtol)
            self.Q = Q

    @property
    def d(self) -> int:
        return self.factor.d

    @property
    def count(self) -> int:
        """Keys retained (with duplicates and dependent ones)."""
        return self.keys.shape[1]

    @property
    def rank(self) -> int:
        """Independent directions they constrain (≤ d)."""
        return self.Q.shape[1]

    @property
    def capacity(self) -> int:
        """Equality constraints a new batch may still add: d − rank."""
        return self.d - self.rank

    def _whitened_projected(self, K: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, float]:
        Z = _whiten(self.factor, K.to(F64))
        zmax = float(_col_norms2(Z).max().sqrt()) if Z.shape[1] else 0.0
        return _project_out(Q, Z), zmax

    def with_factor(self, factor: Factor) -> RetainedKeys:
        """The same keys on another factor (e.g. after Factor.extend): the basis is rebuilt, O(d²·count)."""
        return RetainedKeys(factor, self.keys, rank_rtol=self.rank_rtol)

    def extend(self, keys: torch.Tensor) -> RetainedKeys:
        """Retain ``keys`` (d × m) as well. Right after :meth:`solve` with the same tensor (not
        modified since), its projected keys are reused: O(d·m² + d·rank·m) instead of another
        O(d²m) triangular solve."""
        keys = _check_keys("keys", keys, self.d, self.factor.device, "the factor")
        last = self._last
        if last is not None and last[0] is keys and last[1] == keys._version:
            Zh, zmax, ZMt, inv_norm = last[2:]
        else:
            Zh, zmax = self._whitened_projected(keys, self.Q)
            ZMt = None
        if ZMt is not None:
            Q = _grow_basis_factored(self.Q, ZMt, zmax, inv_norm)
        else:
            Q = _grow_basis(self.Q, Zh, zmax, self.rank_rtol)
        return RetainedKeys(self.factor, torch.cat([self.keys, keys.to(F64)], 1), Q, self.rank_rtol)

    def summary(self) -> dict[str, Any]:
        return {"d": self.d, "count": self.count, "rank": self.rank, "capacity": self.capacity,
                "rank_rtol": self.rank_rtol}

    def save(self, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None) -> None:
        """Atomic safetensors file: the retained keys, the basis Q and a fingerprint of the factor
        Q belongs to (``meta``: what the caller records, e.g. model and layer)."""
        info = {"d": self.d, "count": self.count, "rank": self.rank, "rank_rtol": self.rank_rtol,
                "factor": _factor_fingerprint(self.factor)}
        _write_file(path, _RETAINED_FORMAT, {"keys": self.keys, "Q": self.Q}, info, dict(meta or {}))

    @classmethod
    def load(cls, path: str | os.PathLike[str], factor: Factor, *, expect: dict[str, Any] | None = None,
             rebuild: bool = False) -> RetainedKeys:
        """Read a file written by :meth:`save` for ``factor``. A file saved with another factor (C,
        its jitter or its low-rank term differ) is a CacheError, unless ``rebuild``: then the basis
        is rebuilt from the keys for this factor (O(d²·count))."""
        if not isinstance(factor, Factor):
            raise InputError(f"factor must be a pmsolve.Factor, got {type(factor).__name__}")
        tensors, info, _ = _read_file(path, _RETAINED_FORMAT, {"keys", "Q"}, "retained-keys", expect)
        keys, Q = tensors["keys"], tensors["Q"]
        try:
            d, count, rank, rtol = int(info["d"]), int(info["count"]), int(info["rank"]), float(info["rank_rtol"])
            fingerprint = str(info["factor"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CacheError(f"retained-keys file {path} has malformed metadata: {exc}") from exc
        if keys.shape != (d, count) or Q.shape != (d, rank):
            raise CacheError(f"retained-keys file {path} is inconsistent: keys {tuple(keys.shape)}, "
                             f"Q {tuple(Q.shape)}, d = {d}, {count} keys, rank {rank}")
        if d != factor.d:
            raise CacheError(f"retained-keys file {path} holds keys of width {d}; the factor is for d = {factor.d}")
        keys, Q = keys.to(factor.device), Q.to(factor.device)
        if fingerprint != _factor_fingerprint(factor):
            if not rebuild:
                raise CacheError(f"retained-keys file {path} was saved with another factor (C, its jitter or its "
                                 "low-rank term differ); pass rebuild=True to rebuild the basis for this one")
            return cls(factor, keys, rank_rtol=rtol)
        return cls(factor, keys, Q, rtol)

    def solve(self, K: torch.Tensor, R: torch.Tensor, *, method: str = "emmet", mu: float | None = None) -> Update:
        """Δ = argmin tr(ΔCΔᵀ) s.t. Δ K_retained = 0, ΔK = R (``"emmet"``, μ = 0 or the smallest
        ridge that works), or μ tr(ΔCΔᵀ) + ‖ΔK − R‖² under the same retention (``"memit"``,
        μ = λ, default 15000). The retained outputs stay exact in both (module docstring).

        Diagnostics as :func:`pmsolve.solve`, with ``cond_G`` the 1-norm condition estimate of
        Ĝ + μI measured against the unprojected keys' scale max‖z_j‖² (a batch pushed into the
        retained span counts as ill-conditioned), and ``extra``: retained keys and rank, capacity
        left, ``retained_residual`` ‖ΔK_retained‖_F/‖R‖_F (on every retained key up to 256 of
        them, else on every k-th, 256 in all), and ``min_novelty``: the smallest
        share ‖ẑ_j‖²/‖z_j‖² of a new key outside the retained span.

        Raises:
            InputError: keys of the wrong width, bad R, method or μ.
            CapacityError: rank + n > d under equality (rank = d under least squares).
            ConflictingConstraintsError: new keys (nearly) in the span of the retained keys, or of
                each other, ask for different outputs than the retained ones keep.
            NumericalError: no ridge in the schedule makes Ĝ + μI usable.
        """
        t0 = time.perf_counter()
        factor, d = self.factor, self.d
        K_given = K
        K, R = _check_batch(K, R, d, factor.device, "the factor")
        if method not in RETENTION_METHODS:
            raise InputError(f"hard retention solves method 'emmet' or 'memit', got {method!r}")
        mu0 = (DEFAULT_MEMIT_LAMBDA if method == "memit" else 0.0) if mu is None else _check_number("mu", mu)
        n, m = K.shape[1], self.rank
        if method == "emmet" and m + n > d:
            raise CapacityError(
                f"hard retention past capacity: {m} independent retained keys ({self.count} retained in all) + "
                f"{n} new equality constraints = {m + n} > d_in = {d}; retain fewer keys at this layer, spread the "
                "edit over more layers, or use method='memit'",
                required=m + n,
                available=d,
            )
        if m >= d:
            raise CapacityError(f"hard retention leaves no direction to edit: the {self.count} retained keys span "
                                f"all d_in = {d} dimensions", required=m + 1, available=d)
        Z = _whiten(factor, K)
        znorm2 = _col_norms2(Z)  # diag of the unprojected G = KᵀC⁻¹K
        zmax = float(znorm2.max().sqrt())
        Zh = _project_out(self.Q, Z)
        Gh = Zh.mT @ Zh
        Gh = 0.5 * (Gh + Gh.mT)
        novelty = torch.diagonal(Gh) / znorm2.clamp_min(torch.finfo(F64).tiny)
        g_scale = float(znorm2.mean()) or 1.0
        ref = float(znorm2.max())
        max_cond = settings.get("max_cond")
        ridges = [mu0] + [mu0 + s * g_scale for s in settings.get("ridge_schedule")]
        anorm = float(Gh.abs().sum(0).max())
        eye = torch.eye(n, dtype=F64, device=K.device)
        M, mu_used, cond = None, math.nan, math.inf
        for mu_try in ridges:
            Mt, info = torch.linalg.cholesky_ex(Gh + mu_try * eye)
            if int(info) != 0:
                continue
            c = hager_cond_1norm(Mt, 1.0) * (max(anorm, ref) + mu_try)  # ‖(Ĝ+μI)⁻¹‖₁ · scale
            if c <= max_cond:
                M, mu_used, cond = Mt, mu_try, c
                break
        if M is None or (method == "emmet" and mu_used > mu0):
            groups, worst = _conflicting_groups(Gh, R, max_cond, scale=ref)
            if groups:
                inside = sorted({j for g in groups for j in g if float(novelty[j]) < 1e-6})
                where = (f"; edits {inside} lie (nearly) in the span of the {self.count} retained keys, whose "
                         "outputs are held fixed" if inside else "")
                raise ConflictingConstraintsError(
                    f"equality constraints conflict under hard retention: the keys of edits {groups} are (nearly) "
                    f"dependent on each other or on the retained keys but ask for different outputs (relative "
                    f"inconsistency {worst:.3g}){where}",
                    columns=groups,
                )
            if M is None:
                raise NumericalError(
                    f"Ĝ + μI (new keys projected against {m} retained directions) stayed singular or too "
                    f"ill-conditioned (cond > {max_cond:g}) for every μ up to {ridges[-1]:.3g}"
                )
        if mu_used > mu0:
            warnings.warn(
                f"the new keys, projected against the retained ones, are (nearly) dependent: used ridge "
                f"μ = {mu_used:.3g} instead of {mu0:g}; the retained outputs stay exact",
                NumericalWarning,
                stacklevel=2,
            )
        ZMt = torch.linalg.solve_triangular(M.mT, Zh, upper=True, left=False)  # Ẑ M⁻ᵀ
        W = torch.linalg.solve_triangular(M, ZMt, upper=False, left=False)  # Ẑ (Ĝ + μI)⁻¹
        B = _unwhiten(factor, W)
        # For extend(K_given) right after this solve: the same projected keys, no second solve with L.
        # Ẑ M⁻ᵀ with M the Cholesky factor of Ĝ itself (μ = 0, accepted with cond ≤ max_cond
        # against max‖z‖²) is Ẑ orthonormalised by Cholesky QR: extend needs only a cleanup pass
        # (_grow_basis_factored), no eigendecomposition and no further solve with M.
        inv_norm = cond / (max(anorm, ref) + mu_used)  # ‖Ĝ⁻¹‖₁ estimate
        self._last = (K_given, K_given._version, Zh, zmax, ZMt if mu_used == 0 else None, inv_norm)
        rnorm = max(float(torch.linalg.matrix_norm(R)), 1e-300)
        residual = float(torch.linalg.matrix_norm(R @ (B.mT @ K) - R)) / rnorm
        # The retained outputs' check, from the final B and the raw keys: on at most 256 of them
        # (every k-th; all of them cost 2·d·n·count, at 1400 keys as much as the projection).
        sample = self.keys[:, :: max(1, -(-self.count // 256))]
        retained = float(torch.linalg.matrix_norm(R @ (B.mT @ sample))) / rnorm if self.count else 0.0
        diag = SolveDiagnostics(
            method=f"{method}-retain",
            backend="cpu" if _native_solver(factor.L, n) is not None else "torch",
            n=n,
            d_in=d,
            d_out=R.shape[0],
            mu_requested=mu0,
            mu=mu_used,
            mu_relative=mu_used / g_scale,
            ridge_fallback=mu_used > mu0,
            cond_G=cond,
            jitter=factor.jitter,
            cond_C=factor.cond,
            residual=residual,
            preservation_cost=_preservation_cost(B, Gh, M, R, factor.jitter),
            seconds=time.perf_counter() - t0,
            peak_bytes=sum(t.numel() * t.element_size() for t in (Zh, W, B, Gh, M)),
            extra={
                "retained_keys": self.count,
                "retained_rank": m,
                "capacity_left": d - m - n,
                "retained_residual": retained,
                "min_novelty": float(novelty.min()),
            },
        )
        return Update(U=R.clone(), B=B, diagnostics=diag)
