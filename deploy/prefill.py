"""Chunked prefill: primes and texts to score go through the network in slices, between decode steps.

Run whole, one after another, a pile of long scores kept a one-character generate waiting for all
of them (BENCHMARKS.md). Here each job advances a slice at a time, its state carried from slice to
slice. The
decoder's step thread gives prefill, between two decode steps, `share` of the time one decode step
took (half by default, so streams keep about two thirds of their speed), or a longer stretch when
nothing decodes. Primes go before scores (a prime is what a waiting client's first character waits for),
round-robin within each kind, so a short job never waits behind a long one's whole length. A
prime shared by n sequences (n > 1, or several choices of one prompt) runs once; its state is
forked to them. A job whose clients all went away is dropped before its next slice.

Pure PyTorch, driven by deploy.decoder: no asyncio here."""
from __future__ import annotations

import time
from collections import deque

import torch

from deploy.state_cache import Context

MIN_SLICE = 8  # characters: below this the per-call overhead dominates
MAX_SLICE = 2048


class PrimeJob:
    """A prime shared by `seqs` (decoder Sequences) and `waiters` (futures for its final context), run
    from `start` (the Context after ids[:pos]; None: the zero state at 0). The context is kept at
    each of `points` (slices end there) in `contexts`, for the prefix cache; `key` is the prime's
    cache key (None: not cached, a session's private text)."""
    kind = "prime"

    def __init__(self, ids: list[int], seqs: list, start: Context | None = None, pos: int = 0, points=(),
                 key: str | None = None, waiters: list | None = None):
        self.ids, self.seqs, self.pos, self.size, self.key = ids, seqs, pos, len(ids) - pos, key
        self.state, self.logits = (start.state, start.logits) if start else (None, None)
        self.points = [p for p in points if p > pos]
        self.contexts: list[tuple[int, Context]] = []
        self.waiters = waiters or []
        self.error = None

    @property
    def cancelled(self) -> bool:
        return all(s.cancelled for s in self.seqs) and all(f.done() for f in self.waiters)

    @property
    def done(self) -> bool:
        return self.pos >= len(self.ids)

    @property
    def context(self) -> Context:
        return Context(self.state, self.logits)

    def slice_end(self, pos: int) -> int:
        """The furthest a slice from `pos` may go: the next point to keep a context at."""
        return next((p for p in self.points if p > pos), len(self.ids))

    def advance(self, model, ids: torch.Tensor) -> None:
        logits, self.state = model(ids[None], self.state)
        self.logits = logits[:, -1].clone()  # a view would hold the whole slice's logits
        end = self.pos + len(ids)
        if end in self.points:
            self.contexts.append((end, self.context))


class ScoreJob:
    """The summed loss (nats) of predicting each of `ids` after the ones before it; with `top` set
    (0 to 5) also each character's log-probability, and the `top` likeliest (id, log-probability)."""
    kind = "score"

    def __init__(self, ids: list[int], future, top: int | None = None):
        self.ids, self.future, self.pos, self.size, self.top = ids, future, 0, len(ids), top
        self.state, self.total, self.count, self.cancelled, self.error = None, 0.0, 0, False, None
        self.logprobs: list[float] = []
        self.alternatives: list[list[tuple[int, float]]] = []

    @property
    def done(self) -> bool:
        return self.pos >= len(self.ids) - 1

    def slice_end(self, pos: int) -> int:
        return len(self.ids) - 1

    def advance(self, model, ids: torch.Tensor) -> None:
        targets = torch.tensor(self.ids[self.pos + 1 : self.pos + 1 + len(ids)], device=ids.device)
        logits, self.state = model(ids[None], self.state)
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        chosen = logp.gather(1, targets[:, None])[:, 0]
        self.total -= chosen.sum().item()
        self.count += len(targets)
        if self.top is not None:
            self.logprobs += chosen.tolist()
            if self.top:
                values, indices = logp.topk(self.top, dim=-1)
                self.alternatives += [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


class Prefill:
    """The jobs waiting for or in prefill. The event loop adds (deque appends are atomic); the step
    thread runs and removes; `chars` (admission's measure) is the event loop's alone."""

    def __init__(self, device, share: float = 0.5, idle_budget_s: float = 0.05):
        self.device, self.share, self.idle_budget_s = device, share, idle_budget_s
        self._primes: deque = deque()
        self._scores: deque = deque()
        self.chars = 0  # characters of the jobs added and not yet handed back
        self.rate = 20_000.0  # characters per second of prefill, measured as it runs

    def __bool__(self) -> bool:
        return bool(self._primes or self._scores)

    def add(self, job) -> None:
        self.chars += job.size
        (self._primes if job.kind == "prime" else self._scores).append(job)

    def release(self, job) -> None:
        self.chars -= job.size

    def drain(self) -> list:
        """Every job not handed back yet, removed (the decoder stopped)."""
        jobs = list(self._primes) + list(self._scores)
        self._primes.clear()
        self._scores.clear()
        return jobs

    def run(self, model, step_s: float | None) -> list:
        """Advance the jobs for about `share` x `step_s`, the last decode step's time (None: nothing
        is decoding, so the idle budget); return the ones finished, dropped (cancelled) or failed.
        On the step thread."""
        budget_s = self.idle_budget_s if step_s is None else self.share * step_s
        start, ended = time.perf_counter(), []
        while self._primes or self._scores:
            queue = self._primes or self._scores
            job = queue[0]
            if job.cancelled:
                ended.append(queue.popleft())
                continue
            left = budget_s - (time.perf_counter() - start)
            size = int(min(MAX_SLICE, max(MIN_SLICE, left * self.rate)))
            end = min(job.pos + size, job.slice_end(job.pos))
            t = time.perf_counter()
            queue.popleft()
            try:
                job.advance(model, torch.tensor(job.ids[job.pos : end], device=self.device))
            except Exception as err:  # a bug, never an input: this job fails, the others go on
                job.error = err
                ended.append(job)
                continue
            self.rate = 0.8 * self.rate + 0.2 * (end - job.pos) / max(time.perf_counter() - t, 1e-6)
            job.pos = end
            if job.done:
                ended.append(job)
            else:
                queue.append(job)  # round-robin: the next job of this kind goes first
            if time.perf_counter() - start >= budget_s:
                break
        return ended
