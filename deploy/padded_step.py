"""One batched step of the network whose rows are bit-identical to what each row gets alone, in
float32 or under bf16 autocast.

The decoder pads its step to at least `min_step_batch` rows: the smallest batch from which the math
library gives every row exactly the same result whatever the batch size (tiny batches take another
matrix kernel, whose float rounding differs, which could flip a sample). It is measured, not assumed.

Pure PyTorch: no asyncio, no Ray."""
from __future__ import annotations

import time

import torch

from models import CharRNN, autocast, choose_precision


def state_map(fn, *states):
    """Apply fn to the state tensor(s): LSTM states are (h, c), GRU and RNN states h alone."""
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states))
    return fn(*states)


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
def choose_decode_precision(model: CharRNN, rows: int, requested: str) -> tuple[str, str]:
    """(precision to decode in, why): models.choose_precision, whose `auto` probes a step of
    `rows` rows, best of 20. bf16 changes the text a seed gives (not its distribution's shape: the
    same network, rounded)."""
    device = model.head.weight.device
    ids = torch.zeros(rows, dtype=torch.long, device=device)
    state = model.init_state(rows)

    def probe_ms(precision: str) -> float:
        best = float("inf")
        for _ in range(20):
            start = time.perf_counter()
            padded_step(model, ids, state, rows, precision)
            best = min(best, time.perf_counter() - start)
        return 1e3 * best

    return choose_precision(requested, device, probe_ms, f"a step of {rows} rows")


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
