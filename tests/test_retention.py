"""Hard retention of earlier edits (pmsolve.RetainedKeys): each batch keeps the outputs at every
retained key exactly while meeting its own constraints.

Reference: the dense fp64 saddle-point (KKT) system of the equality-constrained problem
min tr(ΔCΔᵀ) s.t. Δ [K_prev, K] = [0, R]:

    [Δ Λ] [[C, K_all], [K_allᵀ, 0]] = [0, [0, R]],

solved by LU on the (d + m + n)-sized matrix: it shares no step with pmsolve's route (Cholesky
of C once, whitened keys projected against an orthonormal basis of the retained ones). Both are
backward stable, so their difference is bounded by a small multiple of ε times the condition of
the problem, which neither route's condition number underestimates by much: the tests allow
10·ε·max(κ(KKT matrix), cond_G) (and at least 1e-12). The retained outputs themselves are checked
tightly: ‖ΔK_prev‖ ≤ 1e-11·‖Δ‖‖K_prev‖ up to κ(C) = 1e10 (measured ≤ 4e-13 there: the
projection leaves ε-sized components along Q, magnified by at most κ(L) = √κ(C)).
"""

from __future__ import annotations

import math

import pytest
import torch

import pmsolve
from pmsolve import settings
from pmsolve.errors import CapacityError, ConflictingConstraintsError, InputError, NumericalWarning

F64 = torch.float64
EPS = torch.finfo(F64).eps


def spd(d: int, cond: float, seed: int) -> torch.Tensor:
    """Random SPD C with eigenvalues log-spaced in [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = torch.logspace(0, -math.log10(cond), d, dtype=F64)
    C = (V * lam) @ V.mT
    return 0.5 * (C + C.mT)


def rnd(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def kkt_equality(C, Kp, K, R):
    """Dense KKT solution of min tr(ΔCΔᵀ) s.t. ΔK_prev = 0, ΔK = R; returns (Δ, κ of the KKT matrix)."""
    d, do = C.shape[0], R.shape[0]
    Ka = torch.cat([Kp, K], 1)
    N = Ka.shape[1]
    A = torch.cat([torch.cat([C, Ka], 1), torch.cat([Ka.mT, torch.zeros(N, N, dtype=F64)], 1)], 0)
    rhs = torch.cat([torch.zeros(do, d + Kp.shape[1], dtype=F64), R], 1)
    return torch.linalg.solve(A, rhs, left=False)[:, :d], float(torch.linalg.cond(A))


def kkt_least_squares(C, Kp, K, R, lam):
    """Dense KKT solution of min λ tr(ΔCΔᵀ) + ‖ΔK − R‖² s.t. ΔK_prev = 0:
    [Δ Λ] [[λC + KKᵀ, K_prev], [K_prevᵀ, 0]] = [R Kᵀ, 0]."""
    d, m = C.shape[0], Kp.shape[1]
    A = torch.cat([torch.cat([lam * C + K @ K.mT, Kp], 1),
                   torch.cat([Kp.mT, torch.zeros(m, m, dtype=F64)], 1)], 0)
    rhs = torch.cat([R @ K.mT, torch.zeros(R.shape[0], m, dtype=F64)], 1)
    return torch.linalg.solve(A, rhs, left=False)[:, :d], float(torch.linalg.cond(A))


def held(delta: torch.Tensor, Kp: torch.Tensor) -> float:
    """‖ΔK_prev‖ relative to ‖Δ‖‖K_prev‖: how far the retained outputs moved."""
    norms = torch.linalg.matrix_norm(delta) * torch.linalg.matrix_norm(Kp)
    return float(torch.linalg.matrix_norm(delta @ Kp) / norms)


# ---------------------------------------------------------------------------
# against the dense KKT solution
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [1e2, 1e5, 1e8, 1e10])
@pytest.mark.parametrize("d,m,n", [(40, 0, 5), (40, 10, 5), (120, 60, 30), (200, 150, 40), (64, 63, 1)])
def test_equality_matches_dense_kkt(d, m, n, cond):
    C = spd(d, cond, seed=d + m)
    Kp, K, R = rnd(d, m, 1), rnd(d, n, 2), rnd(7, n, 3)
    rk = pmsolve.RetainedKeys(pmsolve.factorize(C, jitter=None), Kp)
    assert (rk.count, rk.rank, rk.capacity) == (m, m, d - m)
    upd = rk.solve(K, R)
    ref, kappa = kkt_equality(C, Kp, K, R)
    tol = max(1e-12, 10 * EPS * max(kappa, upd.diagnostics.cond_G))
    assert rel(upd.dense(), ref) <= tol
    if m:
        assert held(upd.dense(), Kp) <= 1e-11
    dg = upd.diagnostics
    assert dg.method == "emmet-retain" and dg.residual <= 1e-11 and not dg.ridge_fallback
    assert dg.extra["retained_rank"] == m and dg.extra["capacity_left"] == d - m - n
    if m:  # ‖ΔK_prev‖/‖R‖: the same quantity as held(), in units of the edit's residual
        scale = float(torch.linalg.matrix_norm(upd.dense()) * torch.linalg.matrix_norm(Kp)
                      / torch.linalg.matrix_norm(R))
        assert dg.extra["retained_residual"] <= 1e-11 * scale


@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_batches_in_sequence(cond):
    """Lifelong use: after each batch its keys are retained (extend right after solve reuses the
    projected keys); every batch matches the dense KKT over all earlier batches, and the outputs
    at every earlier key stay where they were."""
    d, n, batches = 96, 12, 7  # 84 retained + 12 new = 96 = d: the last batch fills the space
    C = spd(d, cond, seed=5)
    rk = pmsolve.RetainedKeys(pmsolve.factorize(C, jitter=None))
    W = torch.zeros(6, d, dtype=F64)
    seen = []
    for b in range(batches + 1):
        K, R = rnd(d, n, 100 + b), rnd(6, n, 200 + b)
        upd = rk.solve(K, R)
        Kp = torch.cat(seen, 1) if seen else torch.zeros(d, 0, dtype=F64)
        ref, kappa = kkt_equality(C, Kp, K, R)
        assert rel(upd.dense(), ref) <= max(1e-12, 10 * EPS * max(kappa, upd.diagnostics.cond_G)), b
        before = W @ Kp
        W = W + upd.dense()
        if seen:
            assert float(torch.linalg.matrix_norm(W @ Kp - before)) <= 1e-10 * float(torch.linalg.matrix_norm(before))
        assert rel(W @ K, (W - upd.dense()) @ K + R) <= 1e-10
        rk = rk.extend(K)
        seen.append(K)
    assert rk.rank == d and rk.capacity == 0
    with pytest.raises(CapacityError):
        rk.solve(rnd(d, 1, 999), rnd(6, 1, 998))


def test_extend_after_solve_equals_fresh_extend_and_rebuild():
    d = 50
    C = spd(d, 1e4, seed=7)
    f = pmsolve.factorize(C, jitter=None)
    rk = pmsolve.RetainedKeys(f, rnd(d, 8, 8))
    K = rnd(d, 6, 9)
    rk.solve(K, rnd(3, 6, 10))
    cached = rk.extend(K)  # reuses the solve's projected keys
    fresh = pmsolve.RetainedKeys(f, rk.keys).extend(K)  # no cache: whitens K again
    rebuilt = pmsolve.RetainedKeys(f, torch.cat([rk.keys, K], 1))  # all keys at once
    for other in (fresh, rebuilt):
        assert other.rank == cached.rank == 14
        P1, P2 = cached.Q @ cached.Q.mT, other.Q @ other.Q.mT  # same subspace
        assert float(torch.linalg.matrix_norm(P1 - P2)) <= 1e-12
    eye = torch.eye(cached.rank, dtype=F64)
    assert float(torch.linalg.matrix_norm(cached.Q.mT @ cached.Q - eye)) <= 1e-13
    K.mul_(2.0)  # modified in place: the cache must not be used
    assert torch.equal(rk.extend(K).keys[:, -6:], K)


@pytest.mark.parametrize("lam", [1.0, 1e2, 1.5e4])
def test_least_squares_retention_matches_dense_kkt(lam):
    d, m, n = 80, 30, 60
    C = spd(d, 1e4, seed=11)
    Kp, K, R = rnd(d, m, 12), rnd(d, n, 13), rnd(5, n, 14)
    upd = pmsolve.RetainedKeys(pmsolve.factorize(C, jitter=None), Kp).solve(K, R, method="memit", mu=lam)
    ref, kappa = kkt_least_squares(C, Kp, K, R, lam)
    assert rel(upd.dense(), ref) <= max(1e-12, 10 * EPS * max(kappa, upd.diagnostics.cond_G))
    assert held(upd.dense(), Kp) <= 1e-12
    assert upd.diagnostics.method == "memit-retain" and upd.diagnostics.mu == lam


def test_extended_factor_and_jitter():
    """The whitening includes Factor.extend's low-rank term and the jitter: the reference uses
    C + δI + w·PPᵀ. C is singular (rank 40 of 60); δ is fixed at 1e-3 of mean(diag C): with the
    automatic δ ≈ 1e-12 the whitened keys would be ~1e6 times longer along null(C) than elsewhere
    and the problem conditioned beyond max_cond (correctly refused, not tested here)."""
    d, m, n = 60, 20, 10
    g = torch.Generator().manual_seed(15)
    K0 = torch.randn(d, 40, generator=g, dtype=F64)
    C = K0 @ K0.mT / 40
    f = pmsolve.factorize(C, jitter=1e-3 * float(torch.diagonal(C).mean()))
    assert f.jitter > 0
    Pk = rnd(d, 5, 16)
    fx = f.extend(Pk, weight=0.3)
    assert fx.lowrank is not None
    Kp, K, R = rnd(d, m, 17), rnd(d, n, 18), rnd(4, n, 19)
    upd = pmsolve.RetainedKeys(fx, Kp).solve(K, R)
    Ceff = C + f.jitter * torch.eye(d, dtype=F64) + 0.3 * Pk @ Pk.mT
    ref, kappa = kkt_equality(Ceff, Kp, K, R)
    assert rel(upd.dense(), ref) <= max(1e-12, 10 * EPS * max(kappa, upd.diagnostics.cond_G))
    D = upd.dense()
    C_without_jitter = Ceff - f.jitter * torch.eye(d, dtype=F64)
    cost = float(torch.trace(D @ C_without_jitter @ D.mT))
    assert math.isclose(upd.diagnostics.preservation_cost, cost, rel_tol=1e-8)
    # a retention built on the plain factor is rebuilt for the extended one
    moved = pmsolve.RetainedKeys(f, Kp).with_factor(fx)
    assert rel(moved.solve(K, R).dense(), D) <= 1e-12


# ---------------------------------------------------------------------------
# dependent keys, conflicts, capacity
# ---------------------------------------------------------------------------


def test_near_dependent_new_key_matches_dense_kkt():
    """A new key 1e-4 away (relatively) from the span of the retained ones: a large but well-defined
    update, still agreeing with the dense solution within the problem's condition."""
    d, m = 40, 12
    C = spd(d, 1e3, seed=21)
    Kp = rnd(d, m, 22)
    k = Kp @ rnd(m, 1, 23)
    k = k + 1e-4 * float(k.norm()) * rnd(d, 1, 24) / math.sqrt(d)
    K = torch.cat([k, rnd(d, 3, 25)], 1)
    R = rnd(5, 4, 26)
    upd = pmsolve.RetainedKeys(pmsolve.factorize(C, jitter=None), Kp).solve(K, R)
    ref, kappa = kkt_equality(C, Kp, K, R)
    assert rel(upd.dense(), ref) <= max(1e-12, 10 * EPS * max(kappa, upd.diagnostics.cond_G))
    assert upd.diagnostics.extra["min_novelty"] < 1e-6
    assert held(upd.dense(), Kp) <= 1e-11


def test_new_key_in_retained_span_with_other_value_conflicts():
    d, m = 30, 6
    C = spd(d, 1e2, seed=31)
    Kp = rnd(d, m, 32)
    K = torch.cat([rnd(d, 2, 33), Kp[:, 2:3] * 1.5], 1)  # edit 2 re-uses a retained key
    R = rnd(4, 3, 34)
    rk = pmsolve.RetainedKeys(pmsolve.factorize(C, jitter=None), Kp)
    msg = r"edits \[2\] lie \(nearly\) in the span of the 6 retained"
    with pytest.raises(ConflictingConstraintsError, match=msg) as e:
        rk.solve(K, R)
    assert e.value.columns == [[2]]
    # the same key asking for no change is consistent: ridge fallback, retained outputs exact
    R[:, 2] = 0
    with pytest.warns(NumericalWarning, match="retained outputs stay exact"):
        upd = rk.solve(K, R)
    assert upd.diagnostics.ridge_fallback and upd.diagnostics.residual <= 1e-6
    assert held(upd.dense(), Kp) <= 1e-12


def test_duplicate_keys_within_a_batch_conflict():
    d = 25
    rk = pmsolve.RetainedKeys(pmsolve.factorize(spd(d, 10, seed=41), jitter=None), rnd(d, 4, 42))
    k = rnd(d, 1, 43)
    K = torch.cat([k, rnd(d, 2, 44), k], 1)
    with pytest.raises(ConflictingConstraintsError) as e:
        rk.solve(K, rnd(3, 4, 45))
    assert e.value.columns == [[0, 3]]


def test_dependent_retained_keys_spend_no_capacity():
    d = 20
    f = pmsolve.factorize(spd(d, 1e3, seed=51), jitter=None)
    Kp = rnd(d, 8, 52)
    rk = pmsolve.RetainedKeys(f, torch.cat([Kp, Kp[:, :3] * 2.0, Kp @ rnd(8, 4, 53)], 1))
    assert (rk.count, rk.rank, rk.capacity) == (15, 8, 12)
    rk2 = rk.extend(Kp[:, :2])  # already retained: nothing new
    assert (rk2.count, rk2.rank) == (17, 8)


def test_capacity_error_names_the_counts():
    d = 16
    rk = pmsolve.RetainedKeys(pmsolve.factorize(spd(d, 10, seed=61), jitter=None), rnd(d, 12, 62))
    msg = r"12 independent retained keys \(12 retained in all\) \+ 5 new .* = 17 > d_in = 16"
    with pytest.raises(CapacityError, match=msg) as e:
        rk.solve(rnd(d, 5, 63), rnd(3, 5, 64))
    assert (e.value.required, e.value.available) == (17, 16)
    rk.solve(rnd(d, 4, 65), rnd(3, 4, 66))  # 12 + 4 = 16 fits
    full = rk.extend(rnd(d, 4, 67))
    assert full.capacity == 0
    with pytest.raises(CapacityError, match="no direction to edit"):
        full.solve(rnd(d, 1, 68), rnd(3, 1, 69), method="memit")


def test_bad_input_is_typed():
    d = 12
    f = pmsolve.factorize(spd(d, 10, seed=71), jitter=None)
    rk = pmsolve.RetainedKeys(f)
    with pytest.raises(InputError, match="K has 13 rows but the factor is for keys of width d_in = 12"):
        rk.solve(rnd(d + 1, 2, 72), rnd(3, 2, 73))
    with pytest.raises(InputError, match="keys has 11 rows"):
        rk.extend(rnd(d - 1, 2, 74))
    with pytest.raises(InputError, match="keys has 11 rows"):
        pmsolve.RetainedKeys(f, rnd(d - 1, 2, 74))
    with pytest.raises(InputError, match="pmsolve.Factor"):
        pmsolve.RetainedKeys("not a factor")
    with pytest.raises(InputError, match="'emmet' or 'memit'"):
        rk.solve(rnd(d, 2, 75), rnd(3, 2, 76), method="rome")
    with pytest.raises(InputError, match="mu"):
        rk.solve(rnd(d, 2, 75), rnd(3, 2, 76), mu=math.inf)
    with pytest.raises(InputError, match="R has 1"):
        rk.solve(rnd(d, 2, 75), rnd(3, 1, 76))
    with pytest.raises(InputError, match="NaN"):
        rk.extend(torch.full((d, 1), math.nan, dtype=F64))


def test_ridge_schedule_setting_applies():
    """The fallback ridge follows settings.ridge_schedule (relative to mean diag G)."""
    d = 20
    rk = pmsolve.RetainedKeys(pmsolve.factorize(spd(d, 10, seed=81), jitter=None), rnd(d, 3, 82))
    k = rnd(d, 1, 83)
    K, R = torch.cat([k, k], 1), torch.cat([rnd(2, 1, 84)] * 2, 1)  # duplicate, same value: consistent
    with settings.ridge_schedule((1e-6,)), pytest.warns(NumericalWarning):
        upd = rk.solve(K, R)
    assert math.isclose(upd.diagnostics.mu_relative, 1e-6, rel_tol=1e-12)


def test_native_and_torch_triangular_solves_agree():
    """The whitening runs on the native recursive solve where the cpu backend is in use (tests pin
    its threshold at 4 columns, conftest.py) and on torch's otherwise; both are backward stable,
    so they agree within a few ε·κ(L) (κ(C) = 1e4 here: κ(L) = 100)."""
    from pmsolve._native import native

    if native() is None:
        pytest.skip("pmsolve._C unavailable")
    d = 64
    f = pmsolve.factorize(spd(d, 1e4, seed=91), jitter=None, backend="cpu")
    rk = pmsolve.RetainedKeys(f, rnd(d, 20, 92))
    K, R = rnd(d, 8, 93), rnd(5, 8, 94)
    with settings.backend("cpu"):
        a = rk.solve(K, R)
    with settings.backend("torch"):
        b = rk.solve(K, R)
    assert (a.diagnostics.backend, b.diagnostics.backend) == ("cpu", "torch")
    assert rel(a.dense(), b.dense()) <= 1e-12


@pytest.mark.parametrize("tiny,adds", [(1e-8, True), (1e-13, False)])
def test_basis_resolves_small_directions(tiny, adds):
    """A retained key whose whitened part outside the others' span is 1e-8 of its length: below
    what one eigh of ẐᵀẐ resolves (~1e-6), found by the basis growth's second round and kept
    (rank_rtol = 1e-10); at 1e-13 it is rounding noise and adds no direction. Either way the
    basis stays orthonormal and the retained outputs held."""
    d, m = 40, 10
    C = spd(d, 1e2, seed=101)
    f = pmsolve.factorize(C, jitter=None)
    A = rnd(d, m, 102)
    L = f.L
    # the extra key's whitened vector: a combination of the others' plus a tiny orthogonal part
    ZA = torch.linalg.solve_triangular(L, A, upper=False)
    z = ZA @ rnd(m, 1, 103)
    e = rnd(d, 1, 104)
    e -= ZA @ torch.linalg.lstsq(ZA, e).solution
    z = z + tiny * float(z.norm()) * e / float(e.norm())
    k = L @ z
    others = rnd(d, 5, 105)
    rk = pmsolve.RetainedKeys(f, A).extend(torch.cat([k, others], 1))
    assert rk.rank == m + 5 + (1 if adds else 0)
    eye = torch.eye(rk.rank, dtype=F64)
    assert float(torch.linalg.matrix_norm(rk.Q.mT @ rk.Q - eye)) <= 1e-12
    upd = rk.solve(rnd(d, 3, 106), rnd(4, 3, 107))
    assert held(upd.dense(), rk.keys) <= 1e-10


def test_save_load_roundtrip_and_checks(tmp_path):
    d = 30
    C = spd(d, 1e3, seed=111)
    f = pmsolve.factorize(C, jitter=None)
    rk = pmsolve.RetainedKeys(f, rnd(d, 12, 112))
    p = tmp_path / "state" / "layer4.retained.safetensors"
    rk.save(p, meta={"layer": 4})
    back = pmsolve.RetainedKeys.load(p, f, expect={"layer": 4})
    assert torch.equal(back.keys, rk.keys) and torch.equal(back.Q, rk.Q) and back.rank_rtol == rk.rank_rtol
    K, R = rnd(d, 4, 113), rnd(3, 4, 114)
    assert torch.equal(back.solve(K, R).B, rk.solve(K, R).B)
    f2 = pmsolve.factorize(C + 0.01 * torch.eye(d, dtype=F64), jitter=None)  # another C
    with pytest.raises(pmsolve.CacheError, match="another factor"):
        pmsolve.RetainedKeys.load(p, f2)
    rebuilt = pmsolve.RetainedKeys.load(p, f2, rebuild=True)
    assert rel(rebuilt.solve(K, R).dense(), pmsolve.RetainedKeys(f2, rk.keys).solve(K, R).dense()) <= 1e-12
    with pytest.raises(pmsolve.CacheError, match="another factor"):  # a low-rank term changes it too
        pmsolve.RetainedKeys.load(p, f.extend(rnd(d, 2, 115)))
    with pytest.raises(pmsolve.CacheError, match="layer = 4, expected 5"):
        pmsolve.RetainedKeys.load(p, f, expect={"layer": 5})
    with pytest.raises(pmsolve.CacheError, match="width 30; the factor is for d = 20"):
        pmsolve.RetainedKeys.load(p, pmsolve.factorize(spd(20, 10, seed=116), jitter=None))
    with pytest.raises(pmsolve.CacheError, match="does not exist"):
        pmsolve.RetainedKeys.load(tmp_path / "none.safetensors", f)
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0x01
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(pmsolve.CacheError, match="corrupt"):
        pmsolve.RetainedKeys.load(bad, f)
