"""One batched step of the network whose rows are bit-identical to what each row gets alone.

The decoder pads its step to at least `min_step_batch` rows: the smallest batch from which the math
library gives every row exactly the same result whatever the batch size (tiny batches take another
matrix kernel, whose float rounding differs, which could flip a sample). It is measured, not assumed.

Pure PyTorch: no asyncio, no Ray."""
from __future__ import annotations

import torch

from models import CharRNN


def state_map(fn, *states):
    """Apply fn to the state tensor(s): LSTM states are (h, c), GRU and RNN states h alone."""
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states))
    return fn(*states)


def padded_step(model: CharRNN, ids: torch.Tensor, state, min_rows: int):
    """One step of the network for `ids` [batch], padded to `min_rows` rows: (logits, state)."""
    batch = ids.shape[0]
    pad = min_rows - batch
    if pad > 0:
        ids = torch.cat([ids, ids.new_zeros(pad)])
        state = state_map(lambda s: torch.cat([s, s.new_zeros(s.shape[0], pad, s.shape[2])], dim=1), state)
    logits, state = model.step(ids, state)
    if pad > 0:
        state = state_map(lambda s: s[:, :batch].contiguous(), state)
    return logits[:batch], state


@torch.inference_mode()
def measure_min_step_batch(model: CharRNN, max_batch: int) -> int:
    """The smallest m such that one step of every batch of m..max_batch rows gives each row
    exactly (bit for bit) what the full batch gives it, wherever the row sits."""
    device = model.head.weight.device
    g = torch.Generator().manual_seed(0)
    x = torch.randint(model.config.vocab_size, (max_batch,), generator=g).to(device)
    state = state_map(lambda s: (torch.randn(s.shape, generator=g) * 0.5).to(s), model.init_state(max_batch))
    want_logits, want_state = model.step(x, state)
    for m in range(max_batch - 1, 0, -1):
        rows = slice(max_batch - m, max_batch)  # the tail: rows move forward as others leave
        logits, got = model.step(x[rows], state_map(lambda s: s[:, rows].contiguous(), state))
        same = state_map(lambda a, b: torch.equal(a, b[:, rows]), got, want_state)
        if not (torch.equal(logits, want_logits[rows]) and all(same if isinstance(same, tuple) else [same])):
            return m + 1
    return 1
