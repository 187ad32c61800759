"""What each edited layer preserves while batches are edited one after another.

One object per layer, immutable: ``solve`` computes the layer's update for a batch, ``after``
returns the state for the next batch once the batch's keys are in the model. The three kinds
are the three answers pmsolve gives to "how do later batches treat earlier edits":

    SoftRetention     C + β·Σ k kᵀ over the keys already edited (``preserve_edits`` β): earlier
                      edits weigh in the preservation term like β times the statistics' mean
                      token; β = 0 is the plain PM family (ROME, MEMIT, EMMET).
    NullSpaceUpdate   AlphaEdit: the update lives in the approximate null space of C and pays
                      weight·‖Δ k‖² for every earlier key (pmsolve.lifelong.NullSpaceFactor).
    HardRetention     every earlier key's output kept exactly (equality constraints with zero
                      residual, pmsolve.lifelong.RetainedKeys); at most d_in independent keys fit
                      in a layer, so each state reports its capacity and the editor spreads a
                      batch only over layers that can still take it.

The solver core (pmsolve.solver, pmsolve.lifelong) does the algebra; this module only decides
which of its objects a layer carries and how a batch's keys enter it.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import CacheError, InputError
from ..lifelong import (DEFAULT_ALPHA, DEFAULT_NULLSPACE_THRESHOLD, NullSpace, NullSpaceFactor, RetainedKeys,
                        null_space)
from ..solver import Factor, Update, solve

RETENTION = ("soft", "hard")
F64 = torch.float64


class LayerPreservation(Protocol):
    factor: Factor  # the factor of C (as extended so far): what the balanced distribution measures

    def solve(self, K: torch.Tensor, R: torch.Tensor, method: str, mu: float | None, *,
              prompt_keys: torch.Tensor | None = None, preserve_prompts: float = 0.0) -> Update: ...

    def after(self, K: torch.Tensor) -> LayerPreservation: ...

    def capacity(self) -> int | None: ...

    def summary(self) -> dict[str, Any]: ...


def _prompt_term(prompt_keys: torch.Tensor | None, alpha: float, device: torch.device
                 ) -> tuple[torch.Tensor, float] | None:
    """(Pᵀ as d × m fp64, α/m) for the batch's own prompt-token keys P (m × d), or None."""
    if alpha <= 0 or prompt_keys is None or prompt_keys.shape[0] == 0:
        return None
    return prompt_keys.to(device, F64).T, alpha / prompt_keys.shape[0]


def with_prompt_preservation(factor: Factor, P: torch.Tensor, alpha: float) -> Factor:
    """The factor of C + α·PᵀP/m (P: m × d keys of the batch's own prompt tokens), from the
    factor of C by a low-rank extension: O(d²m) per batch and layer instead of an O(d³)
    refactorisation (Factor.extend refactors only when m is a large fraction of d, where
    that is cheaper)."""
    term = _prompt_term(P, alpha, factor.device)
    return factor if term is None else factor.extend(*term)


class _OnFactor:
    factor: Factor

    @property
    def device(self) -> torch.device:
        return self.factor.device


@dataclass(frozen=True, eq=False)
class SoftRetention(_OnFactor):
    factor: Factor
    beta: float = 0.0

    def solve(self, K, R, method, mu, *, prompt_keys=None, preserve_prompts=0.0) -> Update:
        f = with_prompt_preservation(self.factor, prompt_keys, preserve_prompts) if preserve_prompts > 0 else self.factor
        K, R = K.to(f.device, F64), R.to(f.device, F64)
        # ROME is EMMET with one column; a fact with a start key has two.
        return solve(f, K, R, method="emmet" if method == "rome" and K.shape[1] > 1 else method, mu=mu)

    def after(self, K) -> SoftRetention:
        return self if self.beta <= 0 else SoftRetention(self.factor.extend(K.to(self.factor.device, F64),
                                                                             self.beta), self.beta)

    def capacity(self) -> int | None:
        return None

    def summary(self) -> dict[str, Any]:
        lr = self.factor.lowrank
        return {"retention": "soft", "beta": self.beta, "extended_columns": lr.rank if lr is not None else 0}


@dataclass(frozen=True, eq=False)
class NullSpaceUpdate(_OnFactor):
    factor: Factor
    nsf: NullSpaceFactor
    weight: float = 1.0  # of earlier keys in C_p: the paper's closed form has 1

    def solve(self, K, R, method, mu, *, prompt_keys=None, preserve_prompts=0.0) -> Update:
        nsf = self.nsf
        term = _prompt_term(prompt_keys, preserve_prompts, nsf.device)
        if term is not None:  # the batch's prompt tokens join C_p for this batch only
            nsf = nsf.extend(*term)
        return solve(nsf, K.to(nsf.device, F64), R.to(nsf.device, F64), method="alphaedit", mu=mu)

    def after(self, K) -> NullSpaceUpdate:
        return NullSpaceUpdate(self.factor, self.nsf.extend(K.to(self.nsf.device, F64), self.weight), self.weight)

    def capacity(self) -> int | None:
        return None  # a least-squares fit inside the null space: any number of keys

    def summary(self) -> dict[str, Any]:
        return {"retention": "null-space", "weight": self.weight, "earlier_keys": self.nsf.earlier_keys,
                **{k: v for k, v in self.nsf.null_space.summary().items() if k in ("d", "r", "cut", "kept_energy")}}


@dataclass(frozen=True, eq=False)
class HardRetention(_OnFactor):
    factor: Factor
    retained: RetainedKeys

    def solve(self, K, R, method, mu, *, prompt_keys=None, preserve_prompts=0.0) -> Update:
        if preserve_prompts > 0:  # refused in resolve; a guard for direct callers
            raise InputError("hard retention does not combine with preserve_prompts")
        f = self.factor
        return self.retained.solve(K.to(f.device, F64), R.to(f.device, F64),
                                   method="memit" if method == "memit" else "emmet", mu=mu)

    def after(self, K) -> HardRetention:
        return HardRetention(self.factor, self.retained.extend(K.to(self.factor.device, F64)))

    def capacity(self) -> int | None:
        return self.retained.capacity

    def summary(self) -> dict[str, Any]:
        return {"retention": "hard", **self.retained.summary()}


@dataclass(frozen=True)
class NullSpaceSettings:
    """AlphaEdit's projector, ridge α and weight γ of C inside the kept directions
    (pmsolve.lifelong.null_space / NullSpace.factorize; γ = 0 is the paper)."""

    threshold: float = DEFAULT_NULLSPACE_THRESHOLD
    relative_to: str = "mean"
    alpha: float = DEFAULT_ALPHA
    c_weight: float = 0.0


def dense_C(stats_matrix: Any) -> torch.Tensor:
    """C itself from what factor_stats was given for a layer (a tensor or a Factor): the null
    space needs the eigenvectors of C, not its Cholesky factor. From a Factor, LLᵀ (+ its
    low-rank term) is C plus the factor's jitter: a shift of every eigenvalue by the same
    small amount, which leaves the eigenvectors as they were."""
    if isinstance(stats_matrix, Factor):
        L = torch.tril(stats_matrix.L.to(F64))
        C = L @ L.mT
        if stats_matrix.lowrank is not None:
            C.addmm_(stats_matrix.lowrank.U, stats_matrix.lowrank.U.mT)
        return C
    return stats_matrix


def cached_null_space(C: torch.Tensor, settings: NullSpaceSettings, layer: int, folder: Path | None) -> NullSpace:
    """The null space of C under ``settings``, read from ``folder`` when computed before (the
    file is named by a hash of C's bytes and the settings, so other statistics never match),
    else computed (one fp64 eigendecomposition) and written there atomically."""
    C = C.to(F64)
    h = hashlib.sha256(f"{settings.threshold!r}:{settings.relative_to}:{tuple(C.shape)}".encode())
    h.update(C.detach().to("cpu").contiguous().numpy().tobytes())
    key = h.hexdigest()[:24]
    path = folder / f"nullspace-{key}.safetensors" if folder is not None else None
    if path is not None and path.is_file():
        with contextlib.suppress(CacheError):  # damaged or foreign: computed again below
            return NullSpace.load(path, expect={"key": key}, map_location=C.device)
    ns = null_space(C, threshold=settings.threshold, relative_to=settings.relative_to,
                    meta={"layer": layer, "key": key})
    if path is not None:
        with contextlib.suppress(OSError):  # a read-only cache costs time, not correctness
            path.parent.mkdir(parents=True, exist_ok=True)
            ns.save(path)
    return ns


def initial_states(method: str, retention: str, factors: dict[int, Factor], *, beta: float,
                   null_spaces: dict[int, NullSpace] | None = None, alpha: float = DEFAULT_ALPHA,
                   c_weight: float = 0.0) -> dict[int, LayerPreservation]:
    """Each layer's state before the first batch: for "alphaedit" the null space of every layer
    (``null_spaces``) with ridge ``alpha`` and weight ``c_weight`` of C inside it; else hard or
    soft retention (β = ``beta``)."""
    if method == "alphaedit":
        missing = sorted(set(factors) - set(null_spaces or {}))
        if missing:
            raise InputError(f"alphaedit needs the null space of C at layers {missing}")
        return {layer: NullSpaceUpdate(f, null_spaces[layer].to(f.device).factorize(alpha, c_weight=c_weight),
                                   beta)
                for layer, f in factors.items()}
    if retention == "hard":
        return {layer: HardRetention(f, RetainedKeys(f)) for layer, f in factors.items()}
    return {layer: SoftRetention(f, beta) for layer, f in factors.items()}
