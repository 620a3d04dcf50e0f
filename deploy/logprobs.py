"""Log-probabilities in OpenAI's legacy completions format: `tokens`, `token_logprobs`,
`top_logprobs` and `text_offset`, one entry per character (a character is a token here). Each
entry's top_logprobs holds the k likeliest characters and the one that was there, so up to k + 1."""
from __future__ import annotations

import asyncio


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
