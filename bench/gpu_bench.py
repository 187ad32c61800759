"""Times the CUDA backend against torch.linalg on one GPU, fp64 (DESIGN.md §2 sizes: d = 6400, n = 256).

    PMSOLVE_NATIVE_LIB=build/cuda-gpu/lib/_C....so python bench/gpu_bench.py --out result.json

Each figure is the median of --reps runs after one warm-up, the device synchronised
around each run. The MEMIT reference formula solve(λC + KKᵀ, K) gives the same B as
the PM solve with μ = λ (push-through identity), so its relative difference is reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch

import pmsolve
from pmsolve._native import require_native
from pmsolve.backends.cuda import CudaBackend
from pmsolve.backends.torch_backend import TorchBackend


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, int, Any]:
    """Median seconds, peak bytes allocated above the baseline, and the last result."""
    fn()  # warm-up: handles, cuBLAS/cuSOLVER kernels, allocator pools
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        out = None  # so that the peak counts one result, not two
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() - base, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=6400)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--lam", type=float, default=15000.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    d, n, lam = args.d, args.n, args.lam

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64, device=dev)
    C = X @ X.mT / X.shape[1]
    del X
    K = torch.randn(d, n, generator=gen, dtype=torch.float64, device=dev)
    R = torch.randn(d, n, generator=gen, dtype=torch.float64, device=dev)
    cuda, ref = CudaBackend(require_native()), TorchBackend()

    rows: dict[str, dict[str, float]] = {}

    def record(name: str, fn: Callable[[], Any]) -> Any:
        sec, peak, out = timed(fn, args.reps)
        rows[name] = {"seconds": sec, "peak_bytes": peak}
        return out

    chol = record("factor: cuda backend (fill + cusolverDnXpotrf)", lambda: cuda.cholesky_jittered(C, [0.0]))
    L_t = record("factor: torch.linalg.cholesky", lambda: torch.linalg.cholesky(C))
    flops = d**3 / 3
    for name in list(rows):
        rows[name]["gflops"] = flops / rows[name]["seconds"] / 1e9

    L = chol.L
    sol = record("solve: cuda backend pm_solve", lambda: cuda.pm_solve(L, K, [lam], 1e12))
    sol_t = record("solve: torch backend pm_solve", lambda: ref.pm_solve(L, K, [lam], 1e12))
    B_ref = record("solve: MEMIT reference torch.linalg.solve(lam C + K K^T, K)",
                   lambda: torch.linalg.solve(lam * C + K @ K.mT, K))

    factor = pmsolve.factorize(C, backend="cuda")
    record("public: pmsolve.factorize(backend='cuda')", lambda: pmsolve.factorize(C, backend="cuda"))
    record("public: pmsolve.factorize(backend='torch')", lambda: pmsolve.factorize(C, backend="torch"))
    record("public: pmsolve.solve(memit, backend='cuda')",
           lambda: pmsolve.solve(factor, K, R, method="memit", mu=lam, backend="cuda"))
    record("public: pmsolve.solve(memit, backend='torch')",
           lambda: pmsolve.solve(factor, K, R, method="memit", mu=lam, backend="torch"))

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "d": d,
        "n": n,
        "lambda": lam,
        "reps": args.reps,
        "timings": rows,
        "rel_diff": {
            "L cuda vs torch.linalg.cholesky": rel(chol.L, L_t),
            "B cuda vs torch backend": rel(sol.B, sol_t.B),
            "B cuda vs MEMIT reference": rel(sol.B, B_ref),
        },
        "cond_G": sol.cond,
        "mu_index": [sol.mu_index, sol_t.mu_index],
    }
    width = max(map(len, rows))
    print(f"{result['device']}, torch {result['torch']} (CUDA {result['torch_cuda']}), fp64, d={d}, n={n}")
    for name, r in rows.items():
        extra = f"  {r['gflops']:8.1f} GFLOP/s" if "gflops" in r else ""
        print(f"  {name:<{width}}  {r['seconds'] * 1e3:9.2f} ms  peak {r['peak_bytes'] / 2**20:8.1f} MiB{extra}")
    for name, v in result["rel_diff"].items():
        print(f"  rel diff {name}: {v:.2e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
