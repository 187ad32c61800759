"""Low-rank extension of a factor (Factor.extend) against refactoring, on the same inputs.

The case: an edit batch whose preservation term gets k extra keys (the batch's own prompt
tokens, `preserve_prompts`), C_e = C + w·PᵀP/k. Per batch and layer, ours extends the cached
factor and solves; the alternatives refactor: "refactor from C" (C_e formed from C, then
factorize: the best a user holding C can do) and "rebuild from L" (C = LLᵀ rebuilt from the
cached factor, then refactored: what pmsolve did before `Factor.extend`). All three then solve the
same n = 64 keys; the ratio is per batch and layer, factor of C excluded (cached).

    pytest bench/test_bench_lowrank.py --benchmark-json bench/results/lowrank.json
    PMSOLVE_BENCH_DIMS=6400 pytest bench/test_bench_lowrank.py ...   # one size
"""

from __future__ import annotations

import os

import pytest
import torch

import pmsolve
from pmsolve._native import native

from test_bench_solver import Competitors, _run, peak_rss_increase, problem, rel_delta

DIMS = tuple(int(x) for x in os.environ.get("PMSOLVE_BENCH_DIMS", "1536,4096").split(","))
KS = (64, 256)
N = 64
WEIGHT = 2.0
ROUNDS = {1536: 5, 4096: 3, 6400: 3}

pytestmark = pytest.mark.skipif(native() is None, reason="pmsolve._C unavailable")


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("d", DIMS)
def test_extend_vs_refactor(benchmark, d, k):
    C, _, _, factor, _ = problem(d)
    g = torch.Generator().manual_seed(d + k)
    P = torch.randn(d, k, generator=g, dtype=torch.float64) * float(torch.diagonal(C).mean()) ** 0.5
    K = torch.randn(d, N, generator=g, dtype=torch.float64)
    R = torch.randn(1024, N, generator=g, dtype=torch.float64)
    w = WEIGHT / k

    def _solve(f):
        return pmsolve.solve(f, K, R, method="emmet", backend="cpu")

    def ours():
        return _solve(factor.extend(P, w))

    def refactor_from_c():
        Ce = torch.addmm(C, P, P.mT, alpha=w)
        return _solve(pmsolve.factorize(Ce, overwrite_c=True, backend="cpu"))

    def rebuild_from_l():
        L = torch.tril(factor.L)
        Ce = L @ L.mT
        Ce.addmm_(P, P.mT, alpha=w)
        return _solve(pmsolve.factorize(Ce, overwrite_c=True, backend="cpu"))

    comp = Competitors({"refactor_from_c": refactor_from_c, "rebuild_from_l": rebuild_from_l},
                       prefault_bytes=2 * d * d * 8)
    benchmark.group = f"lowrank-d{d}"
    t_ours = _run(benchmark, ours, comp, ROUNDS.get(d, 3))
    med = comp.medians()
    up, ref = ours(), refactor_from_c()
    benchmark.extra_info.update(
        d=d, k=k, n=N, seconds_ours=t_ours, **{f"seconds_{name}": t for name, t in med.items()},
        speedup_vs_refactor_from_c=med["refactor_from_c"] / t_ours,
        speedup_vs_rebuild_from_l=med["rebuild_from_l"] / t_ours,
        rel_diff_delta=rel_delta(R, up.B, ref.B), cond_C_extended=up.diagnostics.cond_C,
        peak_bytes_ours=peak_rss_increase(ours), peak_bytes_refactor_from_c=peak_rss_increase(refactor_from_c),
    )
    print(f"\nd={d} k={k}: extend+solve {t_ours:.3f} s, refactor from C {med['refactor_from_c']:.3f} s "
          f"({med['refactor_from_c'] / t_ours:.1f}x), rebuild from L {med['rebuild_from_l']:.3f} s "
          f"({med['rebuild_from_l'] / t_ours:.1f}x), rel. diff of Delta {rel_delta(R, up.B, ref.B):.1e}")
