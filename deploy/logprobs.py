"""Log-probabilities in OpenAI's legacy completions format: `tokens`, `token_logprobs`,
`top_logprobs` and `text_offset`, one entry per character (a character is a token here). Each
entry's top_logprobs holds the k likeliest characters and the one that was there, so up to k + 1."""
from __future__ import annotations

import asyncio

import torch


def openai_logprobs(tokens: list[str], entries: list, offset: int = 0) -> dict:
    """`entries`: per token (log-probability, [(character, log-probability)]), or (None, None) for a
    text's first character, which nothing predicts. `offset`: where the first token sits in the
    choice's text."""
    text_offset = list(range(offset, offset + len(tokens)))
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [None if lp is None else {**dict(top), token: lp}
                             for token, (lp, top) in zip(tokens, entries)],
            "text_offset": text_offset}


def scored_entries(scored, table: list[str]) -> list:
    """A prompt's entries from its ScoreJob (deploy/prefill.py, run with `top`): its first character
    unpredicted, then each one's."""
    alternatives = scored.alternatives or [[]] * len(scored.logprobs)
    return [(None, None)] + [(lp, [(table[i], v) for i, v in top]) for lp, top in zip(scored.logprobs, alternatives)]


def merge(first: dict, second: dict) -> dict:
    """Two logprobs objects of consecutive text (an echoed prompt, then what was generated)."""
    return {key: first[key] + second[key] for key in first}


def prompt_logprobs(decoder, req, ids) -> list:
    """With echo and logprobs: per prompt of the completion request `req`, a task scoring it (its
    characters' log-probabilities) on `decoder`; `ids`: text -> the model's ids."""
    if not (req.echo and req.logprobs is not None):
        return []

    async def one(prompt: str) -> dict:
        encoded = ids(prompt)
        entries = scored_entries(await decoder.score(encoded, req.logprobs), decoder.table) if len(encoded) > 1 \
            else [(None, None)]
        return openai_logprobs(list(prompt), entries)
    return [asyncio.ensure_future(one(prompt)) for prompt in req.prompts]


def choice_logprobs(req, seq, echoed: list, start: int = 0, end: int | None = None) -> dict | None:
    """Choice `seq`'s logprobs object for its generated characters [start:end] (a streamed chunk's),
    after its prompt's (`echoed`, awaited) when the whole text is asked for."""
    if req.logprobs is None:
        return None
    prompt = req.prompts[seq.index // req.n]
    end = len(seq.logprobs) if end is None else end
    made = openai_logprobs(seq.chars[start:end], seq.logprobs[start:end], (len(prompt) if req.echo else 0) + start)
    whole = echoed and start == 0 and end == len(seq.logprobs)
    return merge(echoed[seq.index // req.n], made) if whole else made


def sampled_logprobs(rows: list, logits: torch.Tensor, ids: torch.Tensor, table: list[str]) -> list:
    """Per decoder row, None, or for a row that asked for them (sampling.logprobs = k): the sampled
    character's log-probability under the model (temperature 1, nothing cut) and the k likeliest
    characters with theirs. `logits` [rows, vocab] are what `ids` [rows] were sampled from."""
    asked = [i for i, row in enumerate(rows) if row.sampling.logprobs is not None]
    out = [None] * len(rows)
    if not asked:
        return out
    index = torch.tensor(asked, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logp.gather(1, ids.index_select(0, index)[:, None])[:, 0].tolist()
    top = max(rows[i].sampling.logprobs for i in asked)
    values, indices = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
    for j, (i, values_j, indices_j) in enumerate(zip(asked, values.tolist(), indices.tolist())):
        k = rows[i].sampling.logprobs
        out[i] = (chosen[j], [(table[t], v) for t, v in zip(indices_j[:k], values_j[:k])])
    return out
