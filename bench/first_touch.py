"""What touching freshly allocated memory costs on this machine, after idle pauses.

    python bench/first_touch.py [MiB]

On some VMs (docs/design.md §10) memory the guest frees is handed back to the host
within seconds, and touching it again is ~20x slower than touching pages the guest still
holds. Any call that allocates a large output (a d × d factor) pays that, so benchmarks that
compare such calls must control it (bench/test_bench_solver.py: ``prefault``).
"""

from __future__ import annotations

import sys
import time

import numpy as np


def touch_fresh(n: int) -> float:
    t0 = time.perf_counter()
    a = np.empty(n)
    a.fill(1.0)
    dt = time.perf_counter() - t0
    del a
    return dt


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 6400 * 6400 * 8 >> 20
    n = (mib << 20) // 8
    resident = np.ones(n)
    t0 = time.perf_counter()
    resident.fill(2.0)
    print(f"{mib} MiB: rewrite of resident pages {time.perf_counter() - t0:.3f} s")
    del resident
    for pause in (0.0, 0.5, 2.0, 5.0, 10.0):
        time.sleep(pause)
        print(f"{mib} MiB: fresh allocation + fill after {pause:4.1f} s idle: {touch_fresh(n):.3f} s", flush=True)


if __name__ == "__main__":
    main()
