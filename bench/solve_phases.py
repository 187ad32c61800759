"""Where pmsolve.solve's time goes on the cpu backend: each native call and the diagnostics.

    python bench/solve_phases.py [n] [d]

Wraps the extension's triangular_solve and pm_whitened and solver._diagnostics with timers,
runs four emmet solves (C from 1.5·d Gaussian samples, Gaussian keys, d_out = 576) and prints
the last two timings of each part in ms. To compare two builds of the extension, run it with
PMSOLVE_NATIVE_LIB=/path/to/_C.so in separate processes.
"""

from __future__ import annotations

import collections
import sys
import time

import torch

import pmsolve
from pmsolve import solver
from pmsolve.backends import get_backend


class _Timed:
    """The extension module with some functions timed into `log`."""

    def __init__(self, module, names, log) -> None:  # type: ignore[no-untyped-def]
        self._module, self._names, self._log = module, set(names), log

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        fn = getattr(self._module, name)
        if name not in self._names:
            return fn

        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._log[name].append(time.perf_counter() - t0)
            return out

        return timed


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    d = int(sys.argv[2]) if len(sys.argv) > 2 else 6400
    g = torch.Generator().manual_seed(0)
    X = torch.randn(d, d + d // 2, generator=g, dtype=torch.float64)
    C = X @ X.T / X.shape[1]
    del X
    factor = pmsolve.factorize(C)
    K = torch.randn(d, n, generator=g, dtype=torch.float64)
    R = torch.randn(576, n, generator=g, dtype=torch.float64)
    backend = get_backend("auto", K.device)
    if backend.name != "cpu":
        sys.exit("needs the native cpu backend")
    log: dict[str, list[float]] = collections.defaultdict(list)
    backend._C = _Timed(backend._C, ["triangular_solve", "pm_whitened"], log)
    diagnostics = solver._diagnostics

    def timed_diagnostics(*args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = diagnostics(*args, **kwargs)
        log["diagnostics"].append(time.perf_counter() - t0)
        return out

    solver._diagnostics = timed_diagnostics
    for _ in range(4):
        t0 = time.perf_counter()
        pmsolve.solve(factor, K, R, method="emmet")
        log["solve"].append(time.perf_counter() - t0)
    print(f"d = {d}, n = {n}:", {k: [round(x * 1e3) for x in v[-2:]] for k, v in log.items()})


if __name__ == "__main__":
    main()
