"""Where reduced precision pays: shared by the v* optimisation and the statistics' forward."""

from __future__ import annotations

import torch

from ..errors import InputError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_cpu_feature() -> str | None:
    """The CPU feature that makes torch's bf16 matmuls fast here: "AMX" (tiles), "AVX512-BF16"
    (VDPBF16PS dot products), or None. Measured with torch 2.13 on 2 cores: AMX Xeon bf16 mm
    2.0 TFLOP/s against fp32 0.29; Zen 4 (AVX512-BF16) 345-382 GFLOP/s against fp32 131."""
    # Both features are AVX-512 extensions. torch's probes read CPUID and ignore
    # ATEN_CPU_CAPABILITY; when torch was told to run below AVX-512 (e.g. "avx2", to behave as
    # an AVX2 machine would), bf16 counts as slow too, so the whole process takes the AVX2 path.
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "AVX512")()
    if not str(capability).upper().startswith("AVX512"):
        return None
    for name, feature in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        probe = getattr(torch.cpu, name, None)
        if probe is not None and probe():
            return feature
    return None


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast on ``device`` (CUDA with bf16, or a CPU with AMX tiles or
    AVX512-BF16: :func:`bf16_cpu_feature`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bf16_cpu_feature() is not None
    return False


def resolve_autocast(kind: str | None, device: torch.device, name: str = "autocast") -> str | None:
    """``kind`` with "auto" decided for ``device`` (bf16 where it is fast, else None); InputError
    (naming the setting ``name``) for anything but "auto", None, "bf16" or "fp16"."""
    if kind == "auto":
        return "bf16" if fast_bf16(device) else None
    if kind is not None and kind not in AUTOCAST_DTYPES:
        raise InputError(f"{name} must be 'auto', None, 'bf16' or 'fp16', got {kind!r}")
    return kind
