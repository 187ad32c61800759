"""Shared pytest fixtures, and a summary of skipped tests by reason at the end of every run."""

from collections import Counter

import pytest
import torch


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many tests skipped, per reason: a skip that hides a broken build (the native module
    missing) shows up as one large line instead of a quiet "s" per test. The outermost wrapper,
    so it prints after pytest's own short summary, just above the final counts."""
    yield
    reasons: Counter[str] = Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.section(f"skipped: {sum(reasons.values())} tests, by reason")
    for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        terminalreporter.write_line(f"{count:5d}  {reason}")


@pytest.fixture
def gpu_only() -> torch.device:
    """The current CUDA device; skips the test where torch sees none (CI, the development machines)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(autouse=True)
def both_triangular_solve_paths(monkeypatch):
    """pm_solve goes through torch below NATIVE_TRSM_MIN_N keys and natively from there; on Intel
    CPUs the default sends every n through torch (MKL is faster there).
    The tests pin the threshold at 4 so that both paths are exercised on every machine."""
    from pmsolve.backends import cpu

    monkeypatch.setattr(cpu, "NATIVE_TRSM_MIN_N", 4)


@pytest.fixture(params=["openblas", "avx512", "mkl"])
def cholesky_kernel(request):
    """The CPU backend factors C with our recursion on OpenBLAS ("openblas"), the same recursion
    on the AVX-512 fp64 kernel (csrc/f64_gemm.h; the default where OpenBLAS's kernels lack
    AVX-512) or MKL's dpotrf (found in the process, from torch; the default on Intel CPUs).
    Tests taking this fixture run with each; "avx512" skips on CPUs without AVX512-F, "mkl"
    where torch brought no MKL, and both with the torch backend (one kernel)."""
    from pmsolve._native import native, unavailable_reason

    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "torch":
        if request.param != "openblas":
            pytest.skip("the torch backend has one Cholesky kernel")
        yield request.param  # needs no native module
        return
    mod = native()
    if mod is None:
        pytest.skip(f"pmsolve._C unavailable: {unavailable_reason()}")
    if request.param == "mkl" and not mod.loaded_mkl_path():
        pytest.skip("no MKL loaded in this process (torch built without it)")
    if request.param == "avx512" and not mod.f64_gemm_available():
        pytest.skip("the CPU lacks AVX512-F")
    before = mod.mkl_potrf(), mod.f64_gemm()
    assert mod.mkl_potrf(request.param == "mkl") == (request.param == "mkl")
    assert mod.f64_gemm(request.param == "avx512") == (request.param == "avx512")
    yield request.param
    mod.mkl_potrf(before[0])
    mod.f64_gemm(before[1])


@pytest.fixture(params=["ssyrk", "avx512"])
def f32_path(request):
    """Native fp32 statistics run OpenBLAS's ssyrk or the AVX-512 Gram kernel (csrc/f32_gram.h;
    the default only where OpenBLAS's kernels lack AVX-512). Tests taking this fixture run with
    each; "avx512" skips on CPUs without AVX512-F and with the torch backend."""
    from pmsolve._native import native

    callspec = getattr(request.node, "callspec", None)
    mod = native()
    if callspec is not None and callspec.params.get("backend") == "torch" or mod is None:
        if request.param == "avx512":
            pytest.skip("only the native accumulator has the AVX-512 kernel")
        yield request.param
        return
    if request.param == "avx512" and not mod.f32_gram_available():
        pytest.skip("the CPU lacks AVX512-F")
    before = mod.f32_gram()
    assert mod.f32_gram(request.param == "avx512") == (request.param == "avx512")
    yield request.param
    mod.f32_gram(before)
