"""pmsolve.factorize and its parts at d = 6400, standalone, in interleaved rounds (medians).

    python bench/factorize_standalone.py [d] [rounds] [--json FILE]

Where factorize's time goes next to torch.linalg.cholesky (MKL): the native kernel (copy of
the lower triangle + recursive Cholesky), the checks of C (finite, 1-norm, max, symmetry,
diagonal) natively and with torch, and the condition estimate by LAPACK's dpocon (OpenBLAS)
and by the same DLACN2 iteration on torch's triangular solves (what the cpu backend uses).
GFLOP/s = (d³/3) / time. Complements bench/test_bench_solver.py (see bench/solve_standalone.py
for why calls are also timed alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import pmsolve
from pmsolve._native import require_native
from pmsolve.backends import get_backend
from pmsolve.backends.torch_backend import hager_cond_1norm, symmetric_stats_torch


def main() -> None:
    _C = require_native()  # loads the BLAS wheel first (a bare `from pmsolve import _C` may not find it)
    p = argparse.ArgumentParser()
    p.add_argument("d", type=int, nargs="?", default=6400)
    p.add_argument("rounds", type=int, nargs="?", default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    d = args.d
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * d, d, dtype=torch.float64, generator=g)
    C = X.T @ X / (2 * d)
    del X
    cpu = get_backend("cpu", torch.device("cpu"))
    L = pmsolve.factorize(C, backend="cpu").L
    anorm = float(C.abs().sum(0).max())
    fns = {
        "torch.linalg.cholesky": lambda: torch.linalg.cholesky(C),
        "pmsolve.factorize": lambda: pmsolve.factorize(C, backend="cpu"),
        "kernel (copy + cholesky)": lambda: _C.cholesky_jittered(C.numpy(), [0.0]),
        "checks of C: native pass": lambda: cpu.symmetric_stats(C),
        "checks of C: torch passes": lambda: symmetric_stats_torch(C),
        "cond: LAPACK dpocon (OpenBLAS)": lambda: _C.cond_estimate(L.numpy(), anorm),
        "cond: DLACN2 on torch solves": lambda: hager_cond_1norm(L, anorm),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    flops = d**3 / 3
    rows = {k: {"median_s": statistics.median(v), "runs": v} for k, v in times.items()}
    for name, r in rows.items():
        factorisation = name in ("torch.linalg.cholesky", "pmsolve.factorize", "kernel (copy + cholesky)")
        rate = f"{flops / r['median_s'] / 1e9:7.1f} GFLOP/s" if factorisation else " " * 15
        print(f"{name:32s} {r['median_s']:7.3f} s {rate}  runs {[round(x, 3) for x in r['runs']]}")
    t = rows["torch.linalg.cholesky"]["median_s"]
    ratios = {"factorize / torch": t / rows["pmsolve.factorize"]["median_s"],
              "kernel / torch": t / rows["kernel (copy + cholesky)"]["median_s"]}
    print("  ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"d": d, "rounds": args.rounds, "threads": torch.get_num_threads(), "rows": rows,
                       "ratios": ratios}, fh, indent=1)


if __name__ == "__main__":
    main()
