"""factorize at d = 6400 as a user meets it: each call after a 3 s pause, not in a hot loop.

    python bench/factorize_after_pause.py [d] [rounds]

On machines that hand freed memory back to the host (some VMs do; bench/first_touch.py measures it)
the first touch of a fresh d × d output is part of every such call. Compares
pmsolve.factorize (copying: the factor is a new tensor), pmsolve.factorize(overwrite_c=True)
(in C's storage; the input copy it overwrites is made before the pause, like a C the user
already holds) and torch.linalg.cholesky, interleaved, medians over rounds.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import pmsolve


def main() -> None:
    d = int(sys.argv[1]) if len(sys.argv) > 1 else 6400
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = A @ A.mT / d
    del A
    C = (C + C.mT) / 2
    C.diagonal().add_(1e-3 * float(C.diagonal().mean()))
    pmsolve.factorize(C)  # warm-up (first BLAS calls, thread pools)
    times: dict[str, list[float]] = {"factorize": [], "factorize(overwrite_c=True)": [], "torch.linalg.cholesky": []}
    for _ in range(rounds):
        for name in times:
            work = C.clone() if "overwrite" in name else None
            time.sleep(3)
            t0 = time.perf_counter()
            if work is not None:
                out = pmsolve.factorize(work, overwrite_c=True)
            elif name == "factorize":
                out = pmsolve.factorize(C)
            else:
                out = torch.linalg.cholesky(C)
            times[name].append(time.perf_counter() - t0)
            del out, work
    torch_s = statistics.median(times["torch.linalg.cholesky"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:30s} median {med:.3f} s  ({torch_s / med:.2f}x torch)  runs {[round(t, 3) for t in ts]}")


if __name__ == "__main__":
    main()
