"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def gpu_only() -> torch.device:
    """The current CUDA device; skips the test where torch sees none (CI, the development machines)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())
