"""Pick the next token from logits, with temperature, top-k and top-p (nucleus) filtering.

Each row is drawn by inverse transform sampling from one uniform number taken from that row's
own generator (or given: `uniforms`, drawn ahead from it). So a row's choice depends only on its
logits, its parameters and its generator: the same seed gives the same text whether the row is
sampled alone or inside any batch."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _per_row(value, name: str, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    row = torch.as_tensor(value)
    if row.is_floating_point() and not dtype.is_floating_point:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    row = row.to(device, dtype)
    if row.dim() == 0:
        return row.expand(batch)
    if row.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have one value per row ({batch}), got shape {tuple(row.shape)}")
    return row


def _uniforms(generator, uniforms, batch: int, device: torch.device) -> torch.Tensor:
    if uniforms is not None:
        if generator is not None:
            raise ValueError("pass a generator or uniforms, not both")
        if not isinstance(uniforms, torch.Tensor) or uniforms.shape != (batch,):
            raise ValueError(f"uniforms must be a tensor of {batch} draws (one per row)")
        return uniforms.to(device, torch.float32)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = device if generator is None else generator.device
        return torch.rand(batch, generator=generator, device=gen_device).to(device)
    if not isinstance(generator, Sequence) or len(generator) != batch:
        raise ValueError(f"generator must be None, a torch.Generator or a list of {batch} (one per row)")
    return torch.cat([torch.rand(1, generator=g, device=g.device).to(device) for g in generator])


def sample_next(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=1.0,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """logits [batch, vocab] -> sampled ids [batch] (int64).

    `temperature`, `top_k` and `top_p` are each a scalar or one value per row (a tensor [batch]).
    temperature 0 picks the most likely token; top_k None or 0 keeps every token; top_p 1.0 keeps
    the whole distribution, otherwise the most likely tokens whose mass first reaches top_p (of
    what top-k kept).
    `generator`: None (torch's global one), one torch.Generator for the batch, or one per row.
    `uniforms`: instead of a generator, the draws themselves, one in [0, 1) per row, for a caller
    that draws them ahead (deploy's decoder: a block per row at a time, not one call per row and step)."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    device = logits.device
    temperature = _per_row(temperature, "temperature", batch, device, torch.float32)
    top_k = _per_row(0 if top_k is None else top_k, "top_k", batch, device, torch.int64)
    top_p = _per_row(top_p, "top_p", batch, device, torch.float32)
    if not bool(((temperature >= 0) & temperature.isfinite()).all()):
        raise ValueError("temperature must be finite and >= 0")
    if bool((top_k < 0).any()):
        raise ValueError("top_k must be >= 0 (0: no top-k)")
    if not bool(((top_p > 0) & (top_p <= 1)).all()):  # NaN fails too
        raise ValueError("top_p must be in (0, 1]")
    u = _uniforms(generator, uniforms, batch, device)  # drawn for greedy rows too, so every row advances alike

    logits = logits.float()
    greedy = temperature == 0
    # Shifting the maximum to 0 first keeps a tiny temperature from overflowing into inf - inf.
    shifted = logits - logits.max(dim=1, keepdim=True).values
    scaled = shifted / torch.where(greedy, 1.0, temperature).unsqueeze(1)
    # Stable sort: among equal logits the lower id comes first, as in argmax.
    sorted_logits, order = scaled.sort(dim=1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=1)
    rank = torch.arange(vocab, device=device)
    k = torch.where(top_k == 0, vocab, top_k.clamp(max=vocab))
    probs = probs * (rank < k.unsqueeze(1))
    cdf = probs.cumsum(dim=1)
    # top-p acts on what top-k left (as in Hugging Face's order): keep a token while the mass
    # before it is short of top_p of that total, so the first token always stays. A token whose
    # probability underflowed to 0 is dropped too, so the clamp below can never land on it.
    keep = (cdf - probs < top_p.unsqueeze(1) * cdf[:, -1:]) & (probs > 0)
    cdf = (probs * keep).cumsum(dim=1)
    # The first cdf entry above u * total; a dropped token adds no width, so it is never picked.
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
    # u * total can round up to the total itself; the last kept token owns that end.
    pick = pick.clamp(max=keep.sum(dim=1, keepdim=True) - 1)
    sampled = order.gather(1, pick).squeeze(1)
    return torch.where(greedy, logits.argmax(dim=1), sampled)
