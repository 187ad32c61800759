"""The AMX Gram kernel for bf16 chunks (csrc/amx_gram.cpp) against fp64 and the fp32 paths.

Products of bf16 values are exact in fp32, so the only error is fp32 summation within a chunk;
the bound (flash-attention's rule) is twice the error of torch's own fp32 GEMM of the same
rows against the fp64 truth, plus a few ulps for sizes where that error is zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmsolve._native import native

C = native()
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "amx_bf16_available") or not C.amx_bf16_available(),
                                reason="needs the native core on a CPU with AMX-BF16")

SIZES = [(1, 1), (7, 5), (31, 33), (64, 32), (100, 70), (4096, 96), (5000, 257), (9000, 130)]


@pytest.fixture
def amx():
    before = C.amx_bf16()
    yield
    C.amx_bf16(before)


def gram(x: torch.Tensor, use_amx: bool, **kw) -> np.ndarray:
    C.amx_bf16(use_amx)
    acc = C.CovAccumulator(x.shape[1], **kw)
    acc.update(x.view(torch.int16).numpy().view(np.uint16), format="bf16")
    assert acc.count == x.shape[0]
    return np.asarray(acc.second_moment_sum())


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("rows,d", SIZES)
def test_amx_matches_fp64_within_the_fp32_gemm_error(amx, rows, d):
    g = torch.Generator().manual_seed(rows * 1000 + d)
    x = (torch.randn(rows, d, generator=g) * torch.exp(torch.randn(d, generator=g))).bfloat16()
    truth = (x.double().T @ x.double()).numpy()
    naive = (x.float().T @ x.float()).numpy()
    got = gram(x, use_amx=True)
    assert np.array_equal(got, got.T)
    assert rel(got, truth) <= 2 * rel(naive, truth) + 4 * 2.0**-24
    # The ssyrk path sees the same exact products: the two agree to fp32 summation error.
    assert rel(got, gram(x, use_amx=False)) <= 2 * rel(naive, truth) + 8 * 2.0**-24


def test_amx_switch_and_modes_that_bypass_it(amx):
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(1)).bfloat16()
    truth = (x.double().T @ x.double()).numpy()
    C.amx_bf16(False)
    assert C.amx_bf16() is False
    assert C.amx_bf16(True) is True
    # fp64 products stay exact (AMX accumulates in fp32, so it must not take this mode).
    assert rel(gram(x, use_amx=True, fp64_products=True), truth) <= 1e-15
    centred = C.CovAccumulator(40, centered=True)
    centred.update(x.view(torch.int16).numpy().view(np.uint16), format="bf16")
    assert rel(centred.second_moment_sum(), truth) <= 1e-6


def test_amx_accumulates_across_updates_and_merges(amx):
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(n, 77, generator=g).bfloat16() for n in (1, 500, 4097)]
    C.amx_bf16(True)
    acc, other = C.CovAccumulator(77), C.CovAccumulator(77)
    for p in parts[:2]:
        acc.update(p.view(torch.int16).numpy().view(np.uint16), format="bf16")
    other.update(parts[2].view(torch.int16).numpy().view(np.uint16), format="bf16")
    acc.merge(other)
    x = torch.cat(parts)
    truth = (x.double().T @ x.double()).numpy()
    assert acc.count == x.shape[0]
    assert rel(acc.second_moment_sum(), truth) <= 2 * rel((x.float().T @ x.float()).numpy(), truth) + 1e-7


def test_amx_rejects_nonfinite_rows_before_adding(amx):
    x = torch.randn(64, 32).bfloat16()
    x[40, 3] = float("nan")
    C.amx_bf16(True)
    acc = C.CovAccumulator(32)
    with pytest.raises(ValueError, match="row 40"):
        acc.update(x.view(torch.int16).numpy().view(np.uint16), format="bf16")
    assert acc.count == 0 and not np.asarray(acc.second_moment_sum()).any()
