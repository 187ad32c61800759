"""The AVX-512 fp32 Gram kernel (csrc/f32_gram.cpp) against fp64 and OpenBLAS's ssyrk, the path it
replaces where OpenBLAS runs narrower kernels than the CPU. Skips on CPUs without AVX512-F.

fp32 products are rounded and summed in fp32 (64 rows in registers, 512 in a tile), then in fp64:
the bound (flash-attention's rule) is twice the error of torch's own fp32 GEMM of the same rows
against the fp64 truth, plus a few ulps for sizes where that error is zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmsolve._native import native

C = native()
pytestmark = [
    pytest.mark.skipif(C is None or not hasattr(C, "f32_gram"), reason="needs the native core"),
    pytest.mark.skipif(C is not None and hasattr(C, "f32_gram") and not C.f32_gram_available(),
                       reason="the CPU lacks AVX512-F"),
]  # fmt: skip

# Ragged shapes on purpose: widths off the 16-feature panels, the 8-row micro-tiles and the
# 128-row strips; row counts off the 64-row register runs and the 512-row folds; several chunks.
SIZES = [(1, 1), (7, 5), (31, 33), (64, 32), (100, 70), (513, 385), (4096, 96), (5000, 257), (9000, 130),
         (2, 17), (3, 48)]  # fmt: skip


@pytest.fixture
def switch_restored():
    before = C.f32_gram()
    yield
    C.f32_gram(before)


def gram(x: torch.Tensor, kernel: bool, **kw) -> np.ndarray:
    assert C.f32_gram(kernel) is kernel
    acc = C.CovAccumulator(x.shape[1], **kw)
    acc.update(x.numpy())
    assert acc.count == x.shape[0]
    return np.asarray(acc.second_moment_sum())


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("rows,d", SIZES)
def test_kernel_matches_fp64_within_the_fp32_gemm_error(switch_restored, rows, d):
    g = torch.Generator().manual_seed(rows * 1000 + d)
    x = torch.randn(rows, d, generator=g) * torch.exp(torch.randn(d, generator=g)) + 0.5
    truth = (x.double().T @ x.double()).numpy()
    naive = (x.T @ x).numpy()
    got = gram(x, kernel=True)
    assert np.array_equal(got, got.T)
    assert rel(got, truth) <= 2 * rel(naive, truth) + 4 * 2.0**-24
    # Same rows through ssyrk: the two fp32 paths agree to their own errors.
    assert rel(got, gram(x, kernel=False)) <= 2 * (rel(naive, truth) + rel(got, truth)) + 4 * 2.0**-24


def test_switch_and_modes_that_bypass_the_kernel(switch_restored):
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(1))
    truth = (x.double().T @ x.double()).numpy()
    assert C.f32_gram(False) is False and C.f32_gram(True) is True
    assert rel(gram(x, True, fp64_products=True), truth) <= 1e-15  # fp64 products must stay exact
    centred = C.CovAccumulator(40, centered=True)
    centred.update(x.numpy())
    assert rel(centred.second_moment_sum(), truth) <= 1e-6


def test_kernel_accumulates_across_updates_and_merges(switch_restored):
    C.f32_gram(True)
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(n, 77, generator=g) for n in (1, 500, 4097)]
    acc, other = C.CovAccumulator(77, chunk_rows=1000), C.CovAccumulator(77)
    for p in parts[:2]:
        acc.update(p.numpy())
    other.update(parts[2].numpy())
    acc.merge(other)
    x = torch.cat(parts)
    truth = (x.double().T @ x.double()).numpy()
    assert acc.count == x.shape[0]
    assert rel(acc.second_moment_sum(), truth) <= 2 * rel((x.T @ x).numpy(), truth) + 1e-7


@pytest.mark.parametrize("rows", [64, 3000])  # one chunk (ssyrk's path checks those after), several
def test_kernel_rejects_nonfinite_and_overflowing_rows_before_adding(switch_restored, rows):
    C.f32_gram(True)
    acc = C.CovAccumulator(32, chunk_rows=1024)
    x = torch.randn(rows, 32)
    x[40, 3] = float("nan")
    with pytest.raises(ValueError, match="row 40"):
        acc.update(x.numpy())
    with pytest.raises(ValueError, match="overflow"):
        acc.update(torch.full((rows, 32), 3e19).numpy())
    assert acc.count == 0 and not np.asarray(acc.second_moment_sum()).any()
