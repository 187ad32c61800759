"""The bf16 Gram kernels (csrc/amx_gram.cpp on AMX, csrc/dpbf16_gram.cpp on AVX512-BF16) against
fp64 and the fp32 path (bf16 widened, ssyrk). Each kernel's tests skip on CPUs without it.

Products of bf16 values are exact in fp32, so the only error is fp32 summation within a chunk;
the bound (flash-attention's rule) is twice the error of torch's own fp32 GEMM of the same
rows against the fp64 truth, plus a few ulps for sizes where that error is zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmsolve._native import native

C = native()
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "bf16_gram_kernel"), reason="needs the native core")

# Ragged shapes on purpose: odd row counts (a half token pair), widths off the 16-feature panels,
# the 32-feature AMX blocks and the 128-row strips of the AVX512-BF16 kernel; several chunks.
SIZES = [(1, 1), (7, 5), (31, 33), (64, 32), (100, 70), (4096, 96), (5000, 257), (9000, 130), (513, 385),
         (2, 17), (3, 48)]
KERNELS = ["amx", "avx512_bf16"]


def _available(kernel: str) -> bool:
    if C is None:
        return False
    return bool(C.amx_bf16_available() if kernel == "amx" else C.dpbf16_available())


def use(kernel: str) -> None:
    """Route bf16 chunks to ``kernel`` ("fp32" = widen and ssyrk)."""
    C.amx_bf16(kernel == "amx")
    C.dpbf16_bf16(kernel == "avx512_bf16")
    assert C.bf16_gram_kernel() == kernel


@pytest.fixture
def switches_restored():
    """The kernel switches as they were, after the test."""
    before = C.amx_bf16(), C.dpbf16_bf16()
    yield
    C.amx_bf16(before[0])
    C.dpbf16_bf16(before[1])


@pytest.fixture(params=KERNELS)
def kernel(request, switches_restored):
    if not _available(request.param):
        pytest.skip(f"the CPU lacks {request.param}")
    use(request.param)
    return request.param


def gram(x: torch.Tensor, kernel: str, **kw) -> np.ndarray:
    use(kernel)
    acc = C.CovAccumulator(x.shape[1], **kw)
    acc.update(x.view(torch.int16).numpy().view(np.uint16), format="bf16")
    assert acc.count == x.shape[0]
    return np.asarray(acc.second_moment_sum())


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("rows,d", SIZES)
def test_kernel_matches_fp64_within_the_fp32_gemm_error(kernel, rows, d):
    g = torch.Generator().manual_seed(rows * 1000 + d)
    x = (torch.randn(rows, d, generator=g) * torch.exp(torch.randn(d, generator=g))).bfloat16()
    truth = (x.double().T @ x.double()).numpy()
    naive = (x.float().T @ x.float()).numpy()
    got = gram(x, kernel)
    assert np.array_equal(got, got.T)
    assert rel(got, truth) <= 2 * rel(naive, truth) + 4 * 2.0**-24


def test_switches_and_modes_that_bypass_the_kernel(kernel):
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(1)).bfloat16()
    truth = (x.double().T @ x.double()).numpy()
    switch = C.amx_bf16 if kernel == "amx" else C.dpbf16_bf16
    assert switch(False) is False and C.bf16_gram_kernel() != kernel
    assert switch(True) is True and C.bf16_gram_kernel() == kernel
    # fp64 products stay exact (the kernels accumulate in fp32, so they must not take this mode).
    assert rel(gram(x, kernel, fp64_products=True), truth) <= 1e-15
    centred = C.CovAccumulator(40, centered=True)
    centred.update(x.view(torch.int16).numpy().view(np.uint16), format="bf16")
    assert rel(centred.second_moment_sum(), truth) <= 1e-6


def test_kernel_accumulates_across_updates_and_merges(kernel):
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(n, 77, generator=g).bfloat16() for n in (1, 500, 4097)]
    acc, other = C.CovAccumulator(77), C.CovAccumulator(77)
    for p in parts[:2]:
        acc.update(p.view(torch.int16).numpy().view(np.uint16), format="bf16")
    other.update(parts[2].view(torch.int16).numpy().view(np.uint16), format="bf16")
    acc.merge(other)
    x = torch.cat(parts)
    truth = (x.double().T @ x.double()).numpy()
    assert acc.count == x.shape[0]
    assert rel(acc.second_moment_sum(), truth) <= 2 * rel((x.float().T @ x.float()).numpy(), truth) + 1e-7


def test_kernel_rejects_nonfinite_rows_before_adding(kernel):
    x = torch.randn(64, 32).bfloat16()
    x[40, 3] = float("nan")
    acc = C.CovAccumulator(32)
    with pytest.raises(ValueError, match="row 40"):
        acc.update(x.view(torch.int16).numpy().view(np.uint16), format="bf16")
    assert acc.count == 0 and not np.asarray(acc.second_moment_sum()).any()


def test_avx512_bf16_sums_more_accurately_than_one_fp32_run_per_fold(switches_restored):
    """VDPBF16PS rounds after every product, so summing each 512-token fold in one fp32 register
    run erred 8-9e-7 per chunk (measured on a Zen 4); the kernel sums 64-token runs and adds those. Both
    are compared on the same rows against fp64: the kernel must be several times closer than
    the one-run scheme, simulated here as a sequential fp32 cumulative sum per fold."""
    if not _available("avx512_bf16"):
        pytest.skip("the CPU lacks avx512_bf16")
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4096, 40, generator=g) * torch.exp(torch.randn(40, generator=g))).bfloat16()
    truth = (x.double().T @ x.double()).numpy()
    got = gram(x, "avx512_bf16")
    xf = x.float().numpy()
    one_run = np.zeros_like(truth)
    for t0 in range(0, xf.shape[0], 512):  # products exact in fp32; np.cumsum sums in order
        block = xf[t0:t0 + 512]
        one_run += np.cumsum(block[:, :, None] * block[:, None, :], axis=0, dtype=np.float32)[-1]
    assert rel(one_run, truth) > 3e-7  # the effect being guarded against is present
    assert rel(got, truth) <= rel(one_run, truth) / 4
