"""Per-batch solve cost in lifelong editing (pmsolve.lifelong): does a batch stay O(d²n) as edits
accumulate?

d = 1536 (SmolLM2's MLP width), n = 100 keys per batch (AlphaEdit's batch size), one layer.
C has eigenvalues log-spaced over three decades (the default cut, 0.5 × the mean eigenvalue,
then keeps r ≈ 0.62·d directions, as it keeps 770–921 of 1536 on SmolLM2's layers 3–6).

- AlphaEdit: batch 1 (no earlier keys) against batch 20 (1900 earlier keys in C_p). Per batch the
  loop does ``f = f.extend(previous K)`` then ``solve(f, K, R, method="alphaedit")``; both are timed
  ("extend+solve"), and the solve alone.
- Hard retention: batch 1 (nothing retained) against batch 15 (1400 retained keys: 1400 + 100
  ≤ d = 1536; 1900 retained keys, batch 20, would exceed d and is refused with CapacityError).
  Per batch: ``rk.solve(K, R)`` then ``rk = rk.extend(K)`` (reusing the solve's projected keys).
- Baseline: the plain EMMET solve of the same batch on the same cached factor of C.

The eigendecomposition (null_space) and the Cholesky of C are paid once per layer and excluded.
On a shared machine the load drifts between tests: the later-batch tests also time batch 1
interleaved with their own step (``ratio_interleaved`` in extra_info, median of per-round
ratios), which is the number to quote.

    pytest bench/test_bench_lifelong.py --benchmark-json bench/results/lifelong.json
"""

from __future__ import annotations

import math

import pytest
import torch

import pmsolve

D, N, D_OUT = 1536, 100, 576
F64 = torch.float64


def _rnd(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    lam = torch.logspace(0, -3, D, dtype=F64)
    C = (V * lam) @ V.mT
    C = 0.5 * (C + C.mT)
    scale = math.sqrt(float(torch.diagonal(C).mean()))  # keys of the size C's statistics have
    batches = [(_rnd(D, N, 100 + b) * scale, _rnd(D_OUT, N, 200 + b)) for b in range(20)]
    return {"C": C, "factor": pmsolve.factorize(C), "null_space": pmsolve.null_space(C), "batches": batches}


def _alphaedit_state(layer, batch: int) -> pmsolve.NullSpaceFactor:
    """The AlphaEdit factor at the start of ``batch`` (1-based), with the keys of batches
    1 .. batch−2 in C_p (batch−1's are added inside the timed step)."""
    f = layer["null_space"].factorize(1.0)
    for K, _ in layer["batches"][: max(batch - 2, 0)]:
        f = f.extend(K)
    return f


def _retention_state(layer, batch: int) -> pmsolve.RetainedKeys:
    keys = [K for K, _ in layer["batches"][: batch - 1]]
    return pmsolve.RetainedKeys(layer["factor"], torch.cat(keys, 1) if keys else None)


def _interleaved_ratio(late, first, rounds: int = 7) -> float:
    """Median over rounds of time(late)/time(first), the two run back to back in each round."""
    ratios = []
    for _ in range(rounds):
        t_late, t_first = _time(late), _time(first)
        ratios.append(t_late / t_first)
    return sorted(ratios)[len(ratios) // 2]


def _alphaedit_step(layer, batch: int):
    f0 = _alphaedit_state(layer, batch)
    prev = layer["batches"][batch - 2][0] if batch > 1 else None
    K, R = layer["batches"][batch - 1]

    def step():
        f = f0.extend(prev) if prev is not None else f0
        return pmsolve.solve(f, K, R, method="alphaedit")

    return f0, prev, K, R, step


@pytest.mark.parametrize("batch", [1, 20])
def test_alphaedit_per_batch(benchmark, layer, batch):
    f0, prev, K, R, step = _alphaedit_step(layer, batch)

    benchmark.group = "lifelong-alphaedit"
    upd = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    f = f0.extend(prev) if prev is not None else f0
    solve_only = min(_time(lambda: pmsolve.solve(f, K, R, method="alphaedit")) for _ in range(5))
    benchmark.extra_info.update(d=D, n=N, batch=batch, earlier_keys=f.earlier_keys, r=f.r,
                                solve_only_seconds=solve_only, residual=upd.diagnostics.residual,
                                lowrank_columns=f.factor.lowrank.rank if f.factor.lowrank is not None else 0)
    if batch > 1:
        first = _alphaedit_step(layer, 1)[-1]
        benchmark.extra_info["ratio_interleaved"] = _interleaved_ratio(step, first)
        f1 = layer["null_space"].factorize(1.0)
        K1, R1 = layer["batches"][0]
        benchmark.extra_info["solve_only_ratio_interleaved"] = _interleaved_ratio(
            lambda: pmsolve.solve(f, K, R, method="alphaedit"), lambda: pmsolve.solve(f1, K1, R1, method="alphaedit"))


@pytest.mark.parametrize("batch", [1, 15])
def test_hard_retention_per_batch(benchmark, layer, batch):
    rk0 = _retention_state(layer, batch)
    K, R = layer["batches"][batch - 1]

    def step():
        upd = rk0.solve(K, R)
        return upd, rk0.extend(K)

    benchmark.group = "lifelong-retention"
    upd, rk1 = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(d=D, n=N, batch=batch, retained=rk0.count, rank_after=rk1.rank,
                                residual=upd.diagnostics.residual,
                                retained_residual=upd.diagnostics.extra["retained_residual"])
    if batch > 1:
        first0 = _retention_state(layer, 1)
        K1, R1 = layer["batches"][0]
        benchmark.extra_info["ratio_interleaved"] = _interleaved_ratio(
            step, lambda: (first0.solve(K1, R1), first0.extend(K1)))
        K0, R0 = layer["batches"][0]
        benchmark.extra_info["ratio_vs_emmet_interleaved"] = _interleaved_ratio(
            step, lambda: pmsolve.solve(layer["factor"], K0, R0, method="emmet"))


def test_hard_retention_past_capacity_is_refused(layer):
    """Batch 20 would need 1900 + 100 independent equality constraints in d = 1536."""
    rk = pmsolve.RetainedKeys(layer["factor"], torch.cat([K for K, _ in layer["batches"][:19]], 1))
    assert rk.rank == D
    with pytest.raises(pmsolve.CapacityError):
        rk.solve(*layer["batches"][19])


def test_emmet_baseline(benchmark, layer):
    K, R = layer["batches"][0]
    benchmark.group = "lifelong-baseline"
    benchmark.pedantic(lambda: pmsolve.solve(layer["factor"], K, R, method="emmet"), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(d=D, n=N)


def _time(fn) -> float:
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
