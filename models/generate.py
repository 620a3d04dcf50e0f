"""Generate and score token ids with one model, one sequence at a time (the batched, many-client
decoder lives in deploy/). Ids in, ids out: the vocabulary is the caller's business."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .charrnn import CharRNN
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
def score(model: CharRNN, ids: list[int], chunk: int = 4096) -> tuple[float, int]:
    """(summed loss in nats, number of predicted tokens) of `ids`: each token predicted from the
    ones before it, state carried across chunks."""
    model.eval()
    device = model.head.weight.device
    total, state = 0.0, None
    for start in range(0, max(len(ids) - 1, 0), chunk):
        piece = torch.tensor([ids[start : start + chunk + 1]], device=device)
        logits, state = model(piece[:, :-1], state)
        total += F.cross_entropy(logits[0], piece[0, 1:], reduction="sum").item()
    return total, max(len(ids) - 1, 0)


def bits_per_char(loss_nats: float) -> float:
    return loss_nats / math.log(2)
