"""Where reduced precision pays: shared by the v* optimisation and the statistics' forward."""

from __future__ import annotations

import torch


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast on ``device`` (CUDA with bf16, or a CPU with AMX tiles)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe()) if probe is not None else False
    return False
