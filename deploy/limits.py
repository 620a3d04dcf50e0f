"""The server's limits, per request and per replica (docs/contracts.md, sections 3 and 4.4). No torch
here: the command line reads the defaults for its --help."""
from __future__ import annotations

from dataclasses import dataclass, fields

RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait before it tries again


def _check(limits, zero_ok: tuple[str, ...] = ()) -> None:
    for f in fields(limits):
        value = getattr(limits, f.name)
        low = 0 if f.name in zero_ok else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"limit {f.name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Limits:
    """Per-request and per-replica limits of a text model (`charrnn serve --help` names the flags)."""
    max_prime_chars: int = 4096  # characters in a prime / prompt
    max_chars: int = 2000  # characters generated per sequence (max_chars / max_tokens)
    max_n: int = 8  # sequences per request (n x prompts)
    max_score_chars: int = 65536  # characters of text to /v1/score
    max_body_bytes: int = 1 << 20  # request body
    max_concurrent: int = 64  # sequences decoded together per replica (the batch)
    max_queued: int = 256  # sequences waiting for a place in the batch per replica; beyond: 429
    max_queued_chars: int = 1 << 20  # characters of primes and scores waiting for the network; beyond: 429
    state_cache_mb: int = 64  # the prefix-state cache per replica, MiB (0: off)
    max_sessions: int = 10000  # sessions per server; beyond: 429
    max_session_mb: int = 128  # the sessions' states per server, MiB; beyond: 429
    session_ttl_s: int = 3600  # a session idle this long is dropped

    def __post_init__(self):
        _check(self, zero_ok=("max_queued", "max_chars", "state_cache_mb"))
        if self.max_n > self.max_concurrent:
            raise ValueError(f"limit max_n ({self.max_n}) must not exceed max_concurrent ({self.max_concurrent})")
        if self.max_queued_chars < max(self.max_prime_chars * self.max_n, self.max_score_chars):
            raise ValueError(f"limit max_queued_chars ({self.max_queued_chars}) must hold one request: at least "
                             f"max_prime_chars x max_n and max_score_chars")


@dataclass(frozen=True)
class SeriesLimits:
    """Per-request and per-replica limits of a time-series model (section 4.4)."""
    max_history: int = 10000  # points of history per request
    max_forecast_steps: int = 1000  # points forecast per request (steps)
    max_body_bytes: int = 1 << 20  # request body
    max_concurrent: int = 64  # requests forecast together per replica (the batch)
    max_queued: int = 256  # requests waiting for a place in the batch per replica; beyond: 429

    def __post_init__(self):
        _check(self, zero_ok=("max_queued",))


TASK_LIMITS = {"text": Limits, "series": SeriesLimits}
LIMIT_NAMES = {f.name for cls in TASK_LIMITS.values() for f in fields(cls)}


def limits_for(task: str, values: dict):
    """The `task` model's limits (Limits or SeriesLimits) from `values` named like the fields of
    either. The command line and config files name both sets, so a limit of the other task is
    dropped when at its default and refused otherwise: it would silently do nothing."""
    own = {f.name for f in fields(TASK_LIMITS[task])}
    for name, value in values.items():
        if name not in own:
            other = next(t for t, cls in TASK_LIMITS.items() if name in cls.__dataclass_fields__)
            if value != TASK_LIMITS[other].__dataclass_fields__[name].default:
                raise ValueError(f"limit {name} applies to {other} models only; this is a {task} model")
    return TASK_LIMITS[task](**{k: v for k, v in values.items() if k in own})
