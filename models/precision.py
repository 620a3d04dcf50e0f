"""What the network computes in: float32, or bf16 autocast with float32 weights and state. One
home for the choice that training, serving and scoring make (`--precision`)."""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

PRECISIONS = ("auto", "fp32", "bf16")


class PrecisionError(ValueError):
    """bf16 asked for where it cannot run: the message is one line."""


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes in bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere CPU bf16 is emulated, and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@functools.lru_cache(maxsize=None)
def bf16_runs(device: torch.device) -> bool:
    """Whether bf16 runs here at all, found by running it: a tiny LSTM's step under bf16 autocast.
    On a CPU the LSTM's bf16 kernels are oneDNN's, which need AVX-512 (and emulate bf16 on AVX-512
    CPUs without AVX512-BF16); with AVX2 alone oneDNN cannot build them and the step fails."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    lstm = torch.nn.LSTM(8, 8, batch_first=True).to(device)
    try:
        with torch.inference_mode(), autocast(device, "bf16"):
            lstm(torch.zeros(1, 2, 8, device=device))
    except RuntimeError:
        return False
    return True


def autocast(device: torch.device, precision: str):
    """bf16 autocast (weights, gradients, optimizer state and recurrent state stay float32), or
    plain float32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def require_precision(precision: str, device: torch.device | str) -> None:
    """Raise PrecisionError unless `precision` (fp32 or bf16) can run on `device`."""
    device = torch.device(device)
    if precision not in ("fp32", "bf16"):
        raise PrecisionError(f"precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16" and not bf16_runs(device):
        where = f"this CPU ({torch.backends.cpu.get_cpu_capability()})" if device.type == "cpu" else "this GPU"
        raise PrecisionError(f"--precision bf16 cannot run on {where}: its bf16 kernels need AVX-512 "
                             "or a GPU with bf16; use --precision fp32 or auto")


def choose_precision(requested: str, device: torch.device, probe_ms: Callable[[str], float],
                     probed: str) -> tuple[str, str]:
    """(precision to compute in, why). `auto` takes bf16 where the hardware has it natively and
    `probe_ms(precision)` (milliseconds of `probed`) measures it at least 10% faster than float32."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        require_precision(requested, device)
        native = "" if requested == "fp32" or native_bf16(device) else " (no native bf16 here: emulated, slow)"
        return requested, f"--precision {requested}{native}"
    if not native_bf16(device):
        return "fp32", f"auto: fp32 (no native bf16 on this {device.type})"
    timings = {precision: probe_ms(precision) for precision in ("fp32", "bf16")}
    chosen = "bf16" if timings["bf16"] < 0.9 * timings["fp32"] else "fp32"
    return chosen, f"auto: {chosen} ({probed}: fp32 {timings['fp32']:.2f} ms, bf16 {timings['bf16']:.2f} ms)"
