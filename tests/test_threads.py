"""The native kernels' parallel work in torch's OpenMP pool against the same work on threads of
their own (csrc/parallel.h): each thread index gets the same share either way, so every result
must agree bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmsolve._native import native

C = native()
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "openmp"), reason="needs the native core")


@pytest.fixture
def two_threads():
    """Two BLAS threads (what run_on_threads splits over), the OpenMP switch restored after."""
    threads, mode = C.blas_get_num_threads(), C.openmp()
    C.blas_set_num_threads(2)
    yield
    C.blas_set_num_threads(threads)
    C.openmp(mode)


def both_modes(fn):
    """fn() with the kernels on their own threads, then in the OpenMP pool."""
    assert C.openmp(False) is False
    own = fn()
    if not C.openmp(True):
        pytest.skip(f"OpenMP pool not usable here (runtimes loaded: {C.openmp_runtimes()})")
    return own, fn()


def test_one_openmp_runtime_means_the_pool_is_used():
    """Under torch, the extension must share torch's runtime rather than load a second one."""
    runtimes = C.openmp_runtimes()
    if len(runtimes) != 1:
        pytest.skip(f"this torch brings its own OpenMP runtime: {runtimes}")
    mode = C.openmp()
    try:
        assert C.openmp(True) is True
    finally:
        C.openmp(mode)


@pytest.mark.parametrize("fmt", ["f32", "bf16"])
def test_accumulator_identical_in_both_modes(two_threads, fmt):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 300, generator=g)  # 4.5e8 multiply-adds: the product runs on two threads
    if fmt == "bf16":
        rows = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        rows = x.numpy()

    def run():
        acc = C.CovAccumulator(300)
        acc.update(rows, format=fmt)
        out = np.empty((300, 300))
        acc.second_moment_sum(out=out)
        return out

    own, pool = both_modes(run)
    assert np.array_equal(own, pool)


def test_factor_and_checks_identical_in_both_modes(two_threads):
    d = 700  # above the 256 from which the copy and the checks split over threads
    g = torch.Generator().manual_seed(4)
    A = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    S = (A @ A.mT / (2 * d)).numpy()

    def run():
        L = np.empty_like(S)
        C.cholesky_jittered(S, [0.0], out=L)
        return L, C.symmetric_stats(S)

    (L_own, st_own), (L_pool, st_pool) = both_modes(run)
    assert np.array_equal(L_own, L_pool)
    assert st_own == st_pool
