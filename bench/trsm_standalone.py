"""The two triangular solves of pmsolve.solve: native (recursive on GEMM) against torch's (MKL).

    python bench/trsm_standalone.py [d] [--cutoffs 128 256 512] [--ns 1 4 16 64 256 1024]

Times L⁻¹K followed by L⁻ᵀ(·) for a d × d Cholesky factor and n columns, each implementation
alone in a loop (medians of 7), with the ratios behind `NATIVE_TRSM_MIN_N` in
pmsolve/backends/cpu.py. GFLOP/s = 2·d²·n / time.
"""

from __future__ import annotations

import argparse

import torch

from pmsolve._native import require_native
from solve_standalone import median_time  # bench/ is on sys.path when run as a script


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("d", type=int, nargs="?", default=6400)
    p.add_argument("--cutoffs", type=int, nargs="*", default=None, help="default: the build's TRSM_CUTOFF")
    p.add_argument("--ns", type=int, nargs="*", default=[1, 2, 3, 4, 8, 16, 32, 64, 256, 1024])
    args = p.parse_args()
    _C = require_native()
    cutoffs = args.cutoffs or [_C.TRSM_CUTOFF]
    d = args.d
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * d, d, dtype=torch.float64, generator=g)
    L = torch.linalg.cholesky(X.T @ X / (2 * d)).contiguous()  # row-major, as factorize returns it
    del X
    L_arr = L.numpy()
    print(f"d = {d}, torch threads {torch.get_num_threads()}")
    for n in args.ns:
        K = torch.randn(d, n, dtype=torch.float64, generator=g)

        def mkl():
            torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, K, upper=False), upper=True)

        def native(cutoff: int):
            Z = K.clone()
            _C.triangular_solve(L_arr, Z.numpy(), False, cutoff)
            _C.triangular_solve(L_arr, Z.numpy(), True, cutoff)

        mkl()  # warm-up
        t_mkl = median_time(mkl, 7)
        line = [f"n = {n:5d}: torch {t_mkl:.4f} s ({2 * d * d * n / t_mkl / 1e9:5.1f} GFLOP/s)"]
        for c in cutoffs:
            native(c)
            t = median_time(lambda: native(c), 7)
            line.append(f"native/{c} {t:.4f} s ({2 * d * d * n / t / 1e9:5.1f} GFLOP/s, {t_mkl / t:.2f}x)")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
