"""The server's limits, per request and per replica (docs/contracts.md, section 3). No torch here:
the command line reads the defaults for its --help."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    """Per-request and per-replica limits (`charrnn serve --help` names the flags)."""
    max_prime_chars: int = 4096  # characters in a prime / prompt
    max_chars: int = 2000  # characters generated per sequence (max_chars / max_tokens)
    max_n: int = 8  # sequences per request (n x prompts)
    max_score_chars: int = 65536  # characters of text to /v1/score
    max_body_bytes: int = 1 << 20  # request body
    max_concurrent: int = 64  # sequences decoded together per replica (the batch)
    max_queued: int = 256  # sequences waiting for a place in the batch per replica; beyond: 429

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name in ("max_queued", "max_chars") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"limit {f.name} must be an integer >= {low}, got {value!r}")
        if self.max_n > self.max_concurrent:
            raise ValueError(f"limit max_n ({self.max_n}) must not exceed max_concurrent ({self.max_concurrent})")
