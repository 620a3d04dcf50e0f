"""One batched step of the network whose rows are bit-identical to what each row gets alone, in
float32 or under bf16 autocast.

The decoder pads its step to at least `min_step_batch` rows: the smallest batch from which the math
library gives every row exactly the same result whatever the batch size (tiny batches take another
matrix kernel, whose float rounding differs, which could flip a sample). It is measured, not assumed.

Pure PyTorch: no asyncio, no Ray."""
from __future__ import annotations

import contextlib
import time

import torch

from models import CharRNN, native_bf16

PRECISIONS = ("auto", "fp32", "bf16")


def state_map(fn, *states):
    """Apply fn to the state tensor(s): LSTM states are (h, c), GRU and RNN states h alone."""
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states))
    return fn(*states)


def autocast(device: torch.device, precision: str):
    """bf16 autocast (the weights and the state stay float32), or plain float32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def padded_step(model: CharRNN, ids: torch.Tensor, state, min_rows: int, precision: str = "fp32"):
    """One step of the network for `ids` [batch], padded to `min_rows` rows: (logits, state), both
    float32 whatever the precision computed in."""
    batch = ids.shape[0]
    pad = min_rows - batch
    if pad > 0:
        ids = torch.cat([ids, ids.new_zeros(pad)])
        state = state_map(lambda s: torch.cat([s, s.new_zeros(s.shape[0], pad, s.shape[2])], dim=1), state)
    with autocast(ids.device, precision):
        logits, state = model.step(ids, state)
    if pad > 0 or precision != "fp32":
        state = state_map(lambda s: s[:, :batch].float().contiguous(), state)
    return logits[:batch].float(), state


@torch.inference_mode()
def choose_precision(model: CharRNN, rows: int, requested: str) -> tuple[str, str]:
    """(precision to decode in, why). `auto` takes bf16 where the hardware has it natively and a
    short probe (a step of `rows` rows, best of 20) measures it at least 10% faster than float32.
    bf16 changes the text a seed gives (not its distribution's shape: the same network, rounded)."""
    device = model.head.weight.device
    if requested != "auto":
        native = "" if requested == "fp32" or native_bf16(device) else " (no native bf16 here: emulated, slow)"
        return requested, f"--precision {requested}{native}"
    if not native_bf16(device):
        return "fp32", f"auto: fp32 (no native bf16 on this {device.type})"
    ids = torch.zeros(rows, dtype=torch.long, device=device)
    state, timings = model.init_state(rows), {}
    for precision in ("fp32", "bf16"):
        best = float("inf")
        for _ in range(20):
            start = time.perf_counter()
            padded_step(model, ids, state, rows, precision)
            best = min(best, time.perf_counter() - start)
        timings[precision] = 1e3 * best
    chosen = "bf16" if timings["bf16"] < 0.9 * timings["fp32"] else "fp32"
    return chosen, (f"auto: {chosen} (a step of {rows} rows: fp32 {timings['fp32']:.2f} ms, "
                    f"bf16 {timings['bf16']:.2f} ms)")


@torch.inference_mode()
def measure_min_step_batch(model: CharRNN, max_batch: int, precision: str = "fp32") -> int:
    """The smallest m such that one step of every batch of m..max_batch rows gives each row
    exactly (bit for bit) what the full batch gives it, wherever the row sits, in `precision`."""
    device = model.head.weight.device
    g = torch.Generator().manual_seed(0)
    x = torch.randint(model.config.vocab_size, (max_batch,), generator=g).to(device)
    state = state_map(lambda s: (torch.randn(s.shape, generator=g) * 0.5).to(s), model.init_state(max_batch))
    want_logits, want_state = padded_step(model, x, state, 1, precision)
    for m in range(max_batch - 1, 0, -1):
        rows = slice(max_batch - m, max_batch)  # the tail: rows move forward as others leave
        logits, got = padded_step(model, x[rows], state_map(lambda s: s[:, rows].contiguous(), state), 1, precision)
        same = state_map(lambda a, b: torch.equal(a, b[:, rows]), got, want_state)
        if not (torch.equal(logits, want_logits[rows]) and all(same if isinstance(same, tuple) else [same])):
            return m + 1
    return 1
