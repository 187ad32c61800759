"""pmsolve.solve timed alone, in a loop (no competitor runs between calls), d = 6400.

    python bench/solve_standalone.py [d]

Complements bench/test_bench_solver.py, whose harness runs the reference formulas right before
each timed call; on this 2-core machine that placement alone changed our times by up to 10x
(docs/history.md §2). Prints medians of 5 calls for the cpu and torch backends and the MEMIT
reference formula (median of 3).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import pmsolve


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    d = int(sys.argv[1]) if len(sys.argv) > 1 else 6400
    torch.manual_seed(0)
    A = torch.randn(d, d, dtype=torch.float64)
    C = A @ A.mT / d + 1e-3 * torch.eye(d, dtype=torch.float64)
    del A
    factor = pmsolve.factorize(C)
    lam = 15000.0
    print(f"d = {d}, torch threads {torch.get_num_threads()}")
    for n in (1, 16, 256, 1024):
        K = torch.randn(d, n, dtype=torch.float64)
        R = torch.randn(100, n, dtype=torch.float64)
        cpu = median_time(lambda: pmsolve.solve(factor, K, R, method="memit", mu=lam, backend="cpu"), 5)
        tor = median_time(lambda: pmsolve.solve(factor, K, R, method="memit", mu=lam, backend="torch"), 5)
        ref = median_time(lambda: torch.linalg.solve(lam * C + K @ K.mT, K), 3)
        print(f"n = {n:5d}: cpu {cpu:.4f} s  torch {tor:.4f} s  MEMIT reference {ref:.3f} s  "
              f"ratio (cpu) {ref / cpu:.1f}x", flush=True)


if __name__ == "__main__":
    main()
