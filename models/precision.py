"""Whether the hardware computes in bf16 natively: training's and serving's `--precision auto` ask."""
from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes in bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere CPU bf16 is emulated, and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
