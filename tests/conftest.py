"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def gpu_only() -> torch.device:
    """The current CUDA device; skips the test where torch sees none (CI, the development machines)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(autouse=True)
def both_triangular_solve_paths(monkeypatch):
    """pm_solve's triangular solves go through torch below NATIVE_TRSM_MIN_N keys and natively
    from there; on Intel CPUs the default sends every n through torch (MKL is faster there).
    The tests pin the threshold at 4 so that both paths are exercised on every machine."""
    from pmsolve.backends import cpu

    monkeypatch.setattr(cpu, "NATIVE_TRSM_MIN_N", 4)
