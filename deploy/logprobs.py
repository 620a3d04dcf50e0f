"""Log-probabilities in OpenAI's legacy completions format: `tokens`, `token_logprobs`,
`top_logprobs` and `text_offset`, one entry per character (a character is a token here). Each
entry's top_logprobs holds the k likeliest characters and the one that was there, so up to k + 1."""
from __future__ import annotations


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
