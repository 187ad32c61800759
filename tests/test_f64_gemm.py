"""The AVX-512 fp64 kernel C −= A·Bᵀ (csrc/f64_gemm.cpp), which carries the Cholesky recursion's
level-3 work where OpenBLAS runs narrower kernels than the CPU. Skips on CPUs without AVX512-F.

Two independent references: small-integer inputs, where every product and partial sum is an
integer below 2⁵³ and so exact in any order (the kernel must then match integer arithmetic
bit for bit), and random inputs against torch's fp64 GEMM within the textbook bound: each of
the two sums errs by at most γ_k·(|A||B|ᵀ)ᵢⱼ, γ_k = k·u/(1 − k·u), so they differ by at most
twice that."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pmsolve._native import native

C = native()
pytestmark = [
    pytest.mark.skipif(C is None or not hasattr(C, "f64_gemm_sub"), reason="needs the native core"),
    pytest.mark.skipif(C is not None and hasattr(C, "f64_gemm") and not C.f64_gemm_available(),
                       reason="the CPU lacks AVX512-F"),
]  # fmt: skip

U = 2.0**-53
# Ragged on purpose: off the 8-row and 24-column micro-tiles, the 96-row blocks, the 512-step
# depth blocks and (3100 columns) the 3072-column blocks of packed B.
SHAPES = [(1, 1, 1), (7, 5, 3), (8, 24, 1), (9, 25, 513), (100, 70, 600), (193, 97, 1025), (17, 3100, 5),
          (300, 300, 1030)]  # fmt: skip


def ints(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-8, 9, shape, generator=g).to(torch.float64)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("lower", [False, True])
def test_exact_on_integers(m, n, k, lower):
    if lower:
        n = m  # the lower triangle of a square C
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    A, B, Cm = ints(g, m, k), ints(g, n, k), ints(g, m, n)
    expected = (Cm.long() - A.long() @ B.long().T).double()
    if lower:
        Cm = Cm.clone()
        upper = torch.ones(m, n, dtype=torch.bool).triu(1)
        Cm[upper] = float("nan")  # never read, never written
        expected[upper] = float("nan")
    got = Cm.clone()
    C.f64_gemm_sub(A.numpy(), B.numpy(), got.numpy(), lower)
    assert torch.equal(torch.nan_to_num(got, nan=1e300), torch.nan_to_num(expected, nan=1e300))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_within_the_dot_product_bound_of_torch(m, n, k):
    g = torch.Generator().manual_seed(m + 1000 * n + k)
    A = torch.randn(m, k, generator=g, dtype=torch.float64) * torch.exp(torch.randn(k, generator=g)).double()
    B = torch.randn(n, k, generator=g, dtype=torch.float64)
    Cm = torch.randn(m, n, generator=g, dtype=torch.float64)
    got = Cm.clone()
    C.f64_gemm_sub(A.numpy(), B.numpy(), got.numpy())
    gamma = (k + 1) * U / (1 - (k + 1) * U)  # k products and k additions into C
    bound = 2 * gamma * (Cm.abs() + A.abs() @ B.abs().T)
    assert bool(((got - (Cm - A @ B.T)).abs() <= bound).all())


def test_blocks_of_a_larger_matrix():
    """The Cholesky hands the kernel blocks of one d × d matrix: row strides past the width."""
    g = torch.Generator().manual_seed(5)
    big = ints(g, 400, 400)
    work = big.clone()
    A, B, Cv = work[200:, :150], work[150:350, 10:160], work[200:, 150:350]
    expected = big.clone()
    expected[200:, 150:350] = (big[200:, 150:350].long() - big[200:, :150].long() @ big[150:350, 10:160].long().T).double()
    C.f64_gemm_sub(A.numpy(), B.numpy(), Cv.numpy())
    assert torch.equal(work, expected)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (9, 25, 513), (193, 97, 1025), (130, 256, 700)])
@pytest.mark.parametrize("a_t,b_t", [(True, False), (False, True), (True, True)])
def test_transposed_operands_exact_on_integers(m, n, k, a_t, b_t):
    """Operands stored transposed (k × m, k × n: the triangular solves' blocks) pack the same."""
    g = torch.Generator().manual_seed(m + 3 * n + 7 * k + 11 * a_t + 13 * b_t)
    A, B, Cm = ints(g, m, k), ints(g, n, k), ints(g, m, n)
    expected = (Cm.long() - A.long() @ B.long().T).double()
    a = A.T.contiguous().T if a_t else A  # same values, column-major storage
    b = B.T.contiguous().T if b_t else B
    assert a.stride(0) == (1 if a_t else k) or m == 1
    got = Cm.clone()
    C.f64_gemm_sub(a.numpy(), b.numpy(), got.numpy())
    assert torch.equal(got, expected)


def test_bad_arguments_are_refused():
    A = np.zeros((4, 3))
    with pytest.raises(TypeError, match="A must be float64"):
        C.f64_gemm_sub(A.astype(np.float32), A, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="as many columns"):
        C.f64_gemm_sub(A, np.zeros((4, 2)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="C must be A.rows x B.rows"):
        C.f64_gemm_sub(A, A, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="contiguous rows or contiguous columns"):
        C.f64_gemm_sub(np.zeros((8, 6))[::2, ::2], A, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="C must have contiguous rows"):
        C.f64_gemm_sub(A, A, np.zeros((4, 4)).T)
    readonly = np.zeros((4, 4))
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        C.f64_gemm_sub(A, A, readonly)


def test_switch_follows_the_environment_default_and_overrides():
    before = C.f64_gemm()
    try:
        assert C.f64_gemm(True) is True
        assert C.f64_gemm(False) is False
    finally:
        C.f64_gemm(before)
    # Automatic (pmsolve/switches.py): on exactly where OpenBLAS's selected core lacks AVX-512
    # (f32_gram's rule).
    if os.environ.get("PMSOLVE_F64_GEMM", "").strip().lower() in ("", "auto"):
        core = C.blas_config().rsplit("core=", 1)[1].lower()
        assert C.openblas_core_has_avx512() == (core in C.OPENBLAS_AVX512_CORES)
        assert before == (not C.openblas_core_has_avx512())
