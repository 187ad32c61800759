"""Where reduced precision pays: shared by the v* optimisation and the statistics' forward."""

from __future__ import annotations

import torch

from ..errors import InputError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast on ``device`` (CUDA with bf16, or a CPU with AMX tiles)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe()) if probe is not None else False
    return False


def resolve_autocast(kind: str | None, device: torch.device, name: str = "autocast") -> str | None:
    """``kind`` with "auto" decided for ``device`` (bf16 where it is fast, else None); InputError
    (naming the setting ``name``) for anything but "auto", None, "bf16" or "fp16"."""
    if kind == "auto":
        return "bf16" if fast_bf16(device) else None
    if kind is not None and kind not in AUTOCAST_DTYPES:
        raise InputError(f"{name} must be 'auto', None, 'bf16' or 'fp16', got {kind!r}")
    return kind
