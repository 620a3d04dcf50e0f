"""Generate and score token ids with one model, one sequence at a time (the batched, many-client
decoder lives in deploy/). Ids in, ids out: the vocabulary is the caller's business."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .charrnn import CharRNN
from .precision import autocast, require_precision
from .sampling import sample_next


@torch.no_grad()
def generate(model: CharRNN, prime: list[int], length: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float = 1.0, seed: int | None = None) -> list[int]:
    """`length` ids sampled after `prime`. The whole prime goes through the network in one forward
    pass; then one `model.step` per id. The same seed gives the same ids."""
    if not prime:
        raise ValueError("the prime must hold at least one token")
    model.eval()
    device = model.head.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    logits, state = model(torch.tensor([prime], device=device))
    logits, out = logits[:, -1], []
    for _ in range(length):
        token = sample_next(logits, temperature, top_k, top_p, generator=generator)
        out.append(int(token))
        logits, state = model.step(token, state)
    return out


@torch.no_grad()
def score(model: CharRNN, ids: list[int], chunk: int = 4096, lanes: int = 1, burn_in: int = 1024,
          precision: str = "fp32") -> tuple[float, int]:
    """(summed loss in nats, number of predicted tokens) of `ids`: each token predicted from the
    ones before it, state carried across chunks.

    `lanes` > 1 scores that many contiguous pieces side by side in one batch (a recurrent network
    is sequential along the text, so one stream leaves the hardware idle). Each piece after the
    first starts `burn_in` tokens early, unscored, so that its state has context when its own
    tokens come; the loss then differs from one stream's only by the context beyond burn_in.
    `precision` "bf16" runs the network under bf16 autocast (the losses are summed in float32):
    faster where the hardware has bf16, and not exactly float32's figure."""
    device = model.head.weight.device
    require_precision(precision, device)
    targets = max(len(ids) - 1, 0)
    lanes = max(1, min(lanes, targets))
    model.eval()
    if lanes == 1:
        inputs = torch.tensor([ids[:-1]], device=device)
        labels = torch.tensor([ids[1:]], device=device)
    else:
        inputs, labels = _lane_batch(torch.tensor(ids), lanes, burn_in)
        inputs, labels = inputs.to(device), labels.to(device)
    total, state, step = 0.0, None, max(1, chunk // lanes)
    for start in range(0, inputs.shape[1], step):
        with autocast(device, precision):
            logits, state = model(inputs[:, start : start + step], state)
        total += F.cross_entropy(logits.float().flatten(0, 1), labels[:, start : start + step].flatten(),
                                 ignore_index=-100, reduction="sum").item()
    return total, targets


def _lane_batch(ids: torch.Tensor, lanes: int, burn_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[lanes, time] inputs and labels: lane i predicts targets [bounds[i], bounds[i+1]) (target t
    is ids[t + 1]) after reading from `burn_in` tokens before its first; -100 marks what is not
    scored (burn-in and padding)."""
    targets = len(ids) - 1
    bounds = [targets * i // lanes for i in range(lanes + 1)]
    starts = [max(0, first - burn_in) for first in bounds[:-1]]
    width = max(end - start for start, end in zip(starts, bounds[1:]))
    inputs = torch.zeros(lanes, width, dtype=torch.long)
    labels = torch.full((lanes, width), -100, dtype=torch.long)
    for lane, (start, first, end) in enumerate(zip(starts, bounds[:-1], bounds[1:])):
        inputs[lane, : end - start] = ids[start:end]
        labels[lane, first - start : end - start] = ids[first + 1 : end + 1]
    return inputs, labels


def bits_per_char(loss_nats: float) -> float:
    return loss_nats / math.log(2)
