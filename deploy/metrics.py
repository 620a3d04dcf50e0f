"""A text replica's Prometheus metrics, through Ray's own pipeline: ray.serve.metrics, which each
node's metrics agent exports in Prometheus format beside Serve's own ray_serve_* metrics
(docs/contracts.md, section 3.2, lists them). Ray prefixes every name with ray_ and ends counters
in _total; Serve adds the deployment, replica and application tags; each metric here carries the
model's name as `model`.

Per-sequence latencies are observed as each sequence finishes, on the event loop. The decoder's
running counts (deploy/decoder_stats.py) are published as deltas every PUBLISH_INTERVAL_S, so
nothing is recorded on the step thread."""
from __future__ import annotations

import asyncio
import logging
import time

from ray.serve.metrics import Counter, Gauge, Histogram

PUBLISH_INTERVAL_S = 1.0  # Ray's agent exports every few seconds: finer would not be seen
LATENCY_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
INTER_CHAR_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1]
BATCH_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CHAR_KINDS = {"primed": "prime_chars", "generated": "chars", "scored": "scored_chars"}  # label: stats() key
CACHE_EVENTS = ("lookups", "hits", "chars_saved", "evictions")

logger = logging.getLogger("ray.serve")
_replica: ServingMetrics | None = None  # this process's; a Serve replica is a process of its own


class ServingMetrics:
    def __init__(self, model: str, stats):
        """`stats`: the decoder's stats(), published from the first request on."""
        self.stats = stats

        def made(kind, name, description, labels=(), **options):
            return _for_model(model, kind, name, description, labels, **options)

        self.requests = made(Counter, "charrnn_requests", "HTTP requests answered, by route and status",
                             ("route", "status"))
        self.rejections = made(Counter, "charrnn_rejections", "requests refused with a 4xx status, by reason",
                               ("reason",))
        self.sequences = made(Counter, "charrnn_sequences", "sequences finished, by finish reason",
                              ("finish_reason",))
        self.chars = made(Counter, "charrnn_chars", "characters primed, generated and scored", ("kind",))
        self.steps = made(Counter, "charrnn_decode_steps", "decode steps run")
        self.first_char = made(Histogram, "charrnn_time_to_first_char_seconds",
                               "from a sequence's admission to its first character", boundaries=LATENCY_S)
        self.inter_char = made(Histogram, "charrnn_inter_char_seconds",
                               "a sequence's mean time between two of its characters", boundaries=INTER_CHAR_S)
        self.end_to_end = made(Histogram, "charrnn_sequence_seconds", "from a sequence's admission to its end",
                               boundaries=LATENCY_S)
        self.batch = made(Histogram, "charrnn_step_batch_rows", "rows in a decode step", boundaries=BATCH_ROWS)
        self.running = made(Gauge, "charrnn_sequences_running", "sequences in the decode batch")
        self.waiting = made(Gauge, "charrnn_sequences_waiting",
                            "sequences and scores admitted but not in the decode batch: priming or waiting for a row")
        self.queued_chars = made(Gauge, "charrnn_queued_chars", "characters of primes and scores not yet run")
        self.cache = {event: made(Counter, f"charrnn_state_cache_{event}", f"prefix-state cache {event}")
                      for event in CACHE_EVENTS}
        self.cache_bytes = made(Gauge, "charrnn_state_cache_bytes", "bytes of states in the prefix-state cache")
        self.cache_entries = made(Gauge, "charrnn_state_cache_entries", "states in the prefix-state cache")
        self._published: dict = {}  # decoder.stats() as last published
        self._publisher: asyncio.Task | None = None

    @classmethod
    def for_replica(cls, model: str, stats) -> ServingMetrics:
        """This replica's metrics, which RequestMetrics counts answers in."""
        global _replica
        _replica = cls(model, stats)
        return _replica

    def answered(self, route: str, status: int, rejection: str | None) -> None:
        """A request was answered (its status line, for a stream). Publishing starts with the first
        one: it needs the replica's event loop."""
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_every())
        self.requests.inc(tags={"route": route, "status": str(status)})
        if 400 <= status < 500:
            self.rejections.inc(tags={"reason": rejection or "other"})

    def finished(self, seq) -> None:
        """A sequence ended (deploy/sequence.py): its reason and latencies."""
        now = time.monotonic()
        self.sequences.inc(tags={"finish_reason": seq.finish_reason})
        self.end_to_end.observe(now - seq.submitted)
        if seq.first_char_at is not None:
            self.first_char.observe(seq.first_char_at - seq.submitted)
            if len(seq.chars) > 1:
                self.inter_char.observe((now - seq.first_char_at) / (len(seq.chars) - 1))

    async def _publish_every(self) -> None:
        while True:
            try:
                self.publish(self.stats())
            except Exception:  # the figures may lag; the replica serves on
                logger.exception("charrnn: publishing metrics failed")
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    def publish(self, now: dict) -> None:
        last, self._published = self._published, now
        for kind, key in CHAR_KINDS.items():
            _inc(self.chars, now[key] - last.get(key, 0), {"kind": kind})
        _inc(self.steps, now["steps"] - last.get("steps", 0))
        seen = last.get("batch_histogram", {})
        for rows, steps in now["batch_histogram"].items():
            for _ in range(steps - seen.get(rows, 0)):
                self.batch.observe(int(rows))
        cache, cache_then = now["state_cache"], last.get("state_cache", {})
        for event, counter in self.cache.items():
            _inc(counter, cache[event] - cache_then.get(event, 0))
        self.cache_bytes.set(cache["bytes"])
        self.cache_entries.set(cache["entries"])
        self.running.set(now["active"])
        self.waiting.set(now["waiting"])
        self.queued_chars.set(now["queued_chars"])


def _for_model(model: str, kind, name: str, description: str, labels: tuple = (), **options):
    metric = kind(name, description, tag_keys=("model", *labels), **options)
    metric.set_default_tags({"model": model})
    return metric


def _inc(counter: Counter, delta: int, tags: dict | None = None) -> None:
    if delta > 0:  # Ray refuses an increment of 0
        counter.inc(delta, tags=tags)


class SessionMetrics:
    """What SessionStore (deploy/sessions.py) holds."""

    def __init__(self, model: str):
        self.sessions = _for_model(model, Gauge, "charrnn_sessions", "sessions held")
        self.bytes = _for_model(model, Gauge, "charrnn_session_bytes", "bytes of session states held")

    def held(self, sessions: int, nbytes: int) -> None:
        self.sessions.set(sessions)
        self.bytes.set(nbytes)


class RequestMetrics:
    """ASGI middleware: each answer's status line in this replica's metrics, by route (its
    template, such as /v1/sessions/{session}: never a path the client chose) and status. A plain
    ASGI wrapper, not Starlette's BaseHTTPMiddleware, which would sit between a stream and its
    client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _replica is None:
            return await self.app(scope, receive, send)
        started = False

        async def send_counted(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                # the API's error handler leaves the reason of a refusal in the request's state
                _replica.answered(_route(scope), message["status"], scope.get("state", {}).get("rejection"))
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not started:  # Starlette's outermost handler answers 500 for it
                _replica.answered(_route(scope), 500, None)
            raise


def _route(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", "unknown")
