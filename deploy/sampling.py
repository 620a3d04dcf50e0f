"""How one sequence is sampled: what the HTTP layer (api.py) parses a request into and the decoder
runs. No torch here, so validating a request loads none."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """How one sequence is sampled. The HTTP layer validates requests; this only guards the engine."""
    max_chars: int = 200
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # None: off
    top_p: float = 1.0
    seed: int | None = None  # None: a random one (reported back)
    stop: tuple[str, ...] = ()  # the text ends before the first occurrence of any of these
    logprobs: int | None = None  # None: off; k: each character's log-probability and the k likeliest

    def __post_init__(self):
        if self.max_chars < 0 or not self.temperature >= 0 or not 0 < self.top_p <= 1 \
                or (self.top_k is not None and self.top_k < 1) or any(not s for s in self.stop) \
                or (self.logprobs is not None and self.logprobs < 0):
            raise ValueError(f"invalid sampling parameters: {self}")
