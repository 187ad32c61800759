"""The first Cholesky in a fresh process against the next ones, with and without warming memory.

    python bench/first_factorization.py [none|touch|small] [d]

Run each mode in its own process. `touch` fills and frees 2 GiB first (memory the guest then
holds), `small` runs a 2000 × 2000 Cholesky first (warms threads and BLAS, not memory). Prints
seconds and the guest's minor page faults per call: when `touch` removes the first call's extra
time but not its faults, the extra is the host backing fresh guest pages (bench/first_touch.py).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from pmsolve.backends import get_backend


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "none"
    d = int(sys.argv[2]) if len(sys.argv) > 2 else 6400
    g = torch.Generator().manual_seed(0)
    X = torch.randn(d, d + d // 2, generator=g, dtype=torch.float64)
    C = X @ X.T / X.shape[1]
    del X
    backend = get_backend("auto", C.device)
    if mode == "touch":
        torch.empty(2 << 30 >> 3, dtype=torch.float64).fill_(1.0)
    elif mode == "small":
        backend.cholesky_jittered(C[:2000, :2000].contiguous(), [0.0])
    for call in range(3):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        result = backend.cholesky_jittered(C, [0.0])
        seconds = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"{mode} d={d} call {call}: {seconds:.3f} s, {faults} minor faults", flush=True)
        del result


if __name__ == "__main__":
    main()
