"""Continuous batching: many sequences sampled together from one CharRNN (docs/contracts.md, section 3).

One background asyncio task owns the batch. Each turn it lets newly primed sequences join, then runs
ONE batched model step for every active row and samples each row's next character with that row's
own temperature, top-k, top-p and torch.Generator; a finished row leaves at once. The next step
starts while the event loop hands out the last one's characters. Primes and scores go through the
network in slices between the steps, on the same thread (chunked prefill, deploy/prefill.py), so
neither a long prime nor a pile of scores stalls decoding or a new request. The torch work runs
off the event loop, which stays free for HTTP.

What a prime leaves behind is a Context (deploy/state_cache.py): the replica caches it, so a prime
that begins with a cached prefix runs only the rest; requests whose primes are the same and in
flight together share one run; a session's context continues where it stopped. Every fork of a
context samples what its own prime would have.

Same seed, same text, whatever else is in the batch and whatever was cached: sampling draws one
uniform per row from the row's own generator (Sequence.next_uniform, models.sample_next), the
batched step is padded (deploy/padded_step.py), and a text run in slices from a saved context
gives bit for bit the state it gives in one piece.

Pure PyTorch + asyncio: no Ray, no Serve, no vocabulary (ids in, characters out via `table`)."""
from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_right, insort
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from deploy.decoder_stats import DecoderStats
from deploy.logprobs import sampled_logprobs
from deploy.padded_step import measure_min_step_batch, padded_step, state_map
from deploy.prefill import Prefill, PrimeJob, ScoreJob
from deploy.sampling import Sampling
from deploy.sequence import Sequence
from deploy.state_cache import SNAPSHOT_EVERY, Context, PrefixCache, key_of, longest_shared
from models import CharRNN, sample_next


class DecoderStopped(RuntimeError):
    """The decode loop died: this decoder takes no more work, and what it held failed with this."""


class Decoder:
    def __init__(self, model: CharRNN, table: list[str], max_batch: int = 64, min_step_batch: int | None = None,
                 flush_chars: int = 32, flush_interval_s: float = 0.25, log_interval_s: float = 10.0,
                 logger: logging.Logger | None = None, state_cache_bytes: int = 64 << 20, precision: str = "fp32",
                 on_finish: Callable[[Sequence], None] | None = None):
        """`table`: id -> character, for every id the model can produce. `min_step_batch` None:
        measured (deploy/padded_step.py). `state_cache_bytes`: the prefix cache's bound (0: off).
        `precision`: what decode steps compute in, fp32 or bf16 (primes and scores stay fp32).
        `on_finish`: called on the event loop with each sequence that finished (its metrics). A
        stream gets its first character at once, then its text
        every `flush_chars` characters or `flush_interval_s` seconds, whichever comes first: each
        chunk costs the replica and Serve's proxy about a millisecond of CPU, so at 64 streams
        a 0.1 s interval spent a third of this 2-core machine on chunks (bench/serve.py: 3,720
        chars/s at 0.1 s, 5,396 at 0.25 s)."""
        self.model = model.eval()
        self.device = model.head.weight.device
        if len(table) < model.config.vocab_size:
            table = list(table) + ["\ufffd"] * (model.config.vocab_size - len(table))
        self.table, self.max_batch = table, max_batch
        self.flush_chars, self.flush_interval_s = flush_chars, flush_interval_s
        self.logger = logger or logging.getLogger("ray.serve")
        self.precision = precision
        self.min_step_batch = min_step_batch or measure_min_step_batch(model, max_batch, precision)
        self.cache = PrefixCache(state_cache_bytes)
        self._priming: dict[str, PrimeJob] = {}  # cacheable primes in prefill, by key: later twins join them
        self._priming_keys: list[str] = []  # the same keys, sorted: a prefix shared with one of them runs once
        # One thread runs the torch work: decode steps, and prefill slices between them.
        self._step_pool = ThreadPoolExecutor(1, thread_name_prefix="charrnn-step")
        self._prefill = Prefill(self.device)
        self._last_step_s = 0.0  # the last decode step's time: prefill's share between two steps
        self._turn_prefilled: list = []  # the jobs the last turn handed back
        self._in_flight: list[Sequence] = []  # the rows of the turn last launched, joining ones included
        # The batch. The step thread rebinds it to a new list, never changes a list in place: the
        # event loop reads it while the next step runs; it writes it only with no step in flight.
        self._rows: list[Sequence] = []
        self._state = self._logits = self._params = None
        self._ready: list[Sequence] = []  # primed, waiting for a place in the batch
        self._load = 0  # sequences submitted and not finished, plus scores and context primes running
        self._step_loop: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._stopped: DecoderStopped | None = None  # set once, when the loop dies
        self._stats = DecoderStats(self.logger, log_interval_s)
        self._on_finish = on_finish

    # -- the caller's side (on the event loop) ------------------------------------------------------

    @property
    def load(self) -> int:
        """Sequences being primed, waiting or decoded, plus scores running: what admission counts."""
        return self._load

    @property
    def queued_chars(self) -> int:
        """Characters of primes and scores not yet through the network: admission's other measure."""
        return self._prefill.chars

    def submit(self, prime: list[int], sampling: Sampling, sink: asyncio.Queue | None = None,
               index: int = 0) -> Sequence:
        """Start sampling after `prime` (at least one id). Await `seq.done`; streams read `sink`."""
        return self.submit_group(prime, [sampling], sink, index)[0]

    def submit_group(self, prime: list[int], samplings: list[Sampling], sink: asyncio.Queue | None = None,
                     first_index: int = 0, start: Context | None = None) -> list[Sequence]:
        """One sequence per sampling after the same `prime`, which runs through the network once.
        `start`: continue from that context (a session's) rather than from the zero state; `prime`
        may then be empty."""
        if not prime and start is None:
            raise ValueError("the prime must hold at least one id")
        self._accept()
        loop = asyncio.get_running_loop()
        seqs = [Sequence(prime, s, self.device, loop, sink, first_index + i) for i, s in enumerate(samplings)]
        self._load += len(seqs)
        for seq in seqs:
            if seq.sampling.max_chars == 0:
                self._finish(seq, "length")
        if waiting := [seq for seq in seqs if seq.finish_reason is None]:
            self._prime(prime, start, waiting, [])
        return seqs

    async def context(self, ids: list[int], start: Context | None = None) -> Context:
        """The context after `ids` (read from `start`, or from the zero state): what a session keeps."""
        if not ids:
            if start is None:
                raise ValueError("a context needs at least one id")
            return start
        self._accept()
        future = asyncio.get_running_loop().create_future()
        self._load += 1
        try:
            self._prime(ids, start, [], [future])
            return await future
        finally:
            self._load -= 1

    async def score(self, ids: list[int], top: int | None = None) -> ScoreJob:
        """The finished ScoreJob of `ids` (at least two): `total` (summed loss in nats) over `count`
        characters predicted, and with `top` set each one's log-probability and `top` alternatives.
        Sliced between decode steps; cancelling the caller drops the rest of the work."""
        self._accept()
        job = ScoreJob(ids, asyncio.get_running_loop().create_future(), top)
        self._load += 1
        self._prefill.add(job)
        self._wake.set()
        try:
            await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        finally:
            self._load -= 1
        self._stats.counts["scored_chars"] += job.count
        return job

    def _accept(self) -> None:
        """Refuse work once the loop died; start it on this event loop if it is not running."""
        if self._stopped:
            raise self._stopped
        self._start(asyncio.get_running_loop())

    def _prime(self, ids: list[int], start: Context | None, seqs: list[Sequence], waiters: list) -> None:
        """Run `ids` from `start` for `seqs` and `waiters`: from the longest cached prefix (`start`
        None), or joining the same prime already in prefill, or in a job of its own."""
        if not ids:
            return self._primed(seqs, waiters, start)
        if start is not None:  # a session's text: private, never cached
            job = PrimeJob(ids, seqs, start, waiters=waiters)
        else:
            key = key_of(ids)
            if (twin := self._priming.get(key)) is not None:
                twin.seqs += seqs
                twin.waiters += waiters
                return
            pos, cached, shared = self.cache.lookup(key)
            if pos == len(ids):
                return self._primed(seqs, waiters, cached)
            lead = longest_shared(self._priming_keys, key)
            if self.cache.max_bytes and pos + SNAPSHOT_EVERY <= lead < len(ids):
                return self._after_prefix(ids, lead, seqs, waiters)
            job = PrimeJob(ids, seqs, cached, pos, self.cache.snapshot_points(len(ids), pos, shared), key, waiters)
            self._priming[key] = job
            insort(self._priming_keys, key)
        self._prefill.add(job)
        self._wake.set()

    def _after_prefix(self, ids: list[int], lead: int, seqs: list[Sequence], waiters: list) -> None:
        """A prime sharing its first `lead` characters with one in prefill: those run once, as a job
        of their own that the others sharing them join too, and this prime then runs from the
        context cached at its end."""
        prefix = asyncio.get_running_loop().create_future()
        self._prime(ids[:lead], None, [], [prefix])

        def resume(future: asyncio.Future) -> None:
            error = self._stopped or (None if future.cancelled() else future.exception())
            if error is None:
                return self._prime(ids, None, seqs, waiters)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            for seq in seqs:
                self._fail(seq, error)
        prefix.add_done_callback(resume)

    def _primed(self, seqs: list[Sequence], waiters: list, context: Context) -> None:
        """Hand a prime's context to the sequences (they wait for a place in the batch) and futures
        that asked for it."""
        for future in waiters:
            if not future.done():
                future.set_result(context)
        for seq in seqs:
            if seq.cancelled:
                self._finish(seq, "cancelled")
            else:
                seq.context = context
                self._ready.append(seq)
        if seqs:
            self._wake.set()

    def stats(self) -> dict:
        return {**self._stats.summary(), "active": len(self._rows), "waiting": self._load - len(self._rows),
                "queued_chars": self._prefill.chars,
                "max_batch": self.max_batch, "min_step_batch": self.min_step_batch, "precision": self.precision,
                "state_cache": self.cache.summary(),
                "running": self._step_loop is not None and not self._step_loop.done()}

    def raise_if_stopped(self) -> None:
        """Raise DecoderStopped if the decode loop died (a replica health check calls this)."""
        if self._stopped:
            raise self._stopped

    def close(self) -> None:
        if self._step_loop is not None:
            self._step_loop.cancel()
        self._step_pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop -------------------------------------------------------------------------------------

    def _start(self, loop) -> None:
        if self._step_loop is None:
            self._wake = asyncio.Event()
            self._step_loop = loop.create_task(self._run(), name="charrnn-decoder")
            self._step_loop.add_done_callback(self._died)

    def _died(self, task: asyncio.Task) -> None:
        """The loop never returns: it ended by a bug, or was cancelled (close(), or its event loop
        ended, after which a new loop may start it again). After a bug every sequence it held or
        was about to take fails now rather than waiting forever, and so does any new one."""
        if task.cancelled():
            self._step_loop = None
            return
        self._stopped = DecoderStopped(f"the decoder stopped: {task.exception()!r}")
        self.logger.error("charrnn decoder: the decode loop died", exc_info=task.exception())
        for job in self._prefill.drain():
            job.error = self._stopped
            self._prefilled(job)
        for seq in dict.fromkeys(self._in_flight + self._rows + self._ready):  # each once
            if not seq.done.done():
                self._fail(seq, self._stopped)
        self._rows, self._ready, self._in_flight = [], [], []

    def _prefilled(self, job) -> None:
        """A prime or score the step thread finished, dropped (cancelled) or failed."""
        self._prefill.release(job)
        if job.kind == "score":
            if not job.future.done():
                if job.error is not None:
                    job.future.set_exception(job.error)
                elif not job.cancelled:
                    job.future.set_result(job)
            return
        if self._priming.get(job.key) is job:
            del self._priming[job.key]
            self._priming_keys.pop(bisect_right(self._priming_keys, job.key) - 1)
        if job.error is not None:
            for future in job.waiters:
                if not future.done():
                    future.set_exception(job.error)
            for seq in job.seqs:
                self._fail(seq, job.error)
        elif not job.done:  # dropped, every client gone; a twin that joined since starts it again
            self._primed([seq for seq in job.seqs if seq.cancelled], [], None)
            if (seqs := [seq for seq in job.seqs if not seq.cancelled]) or any(not f.done() for f in job.waiters):
                self._prime(job.ids, None, seqs, [f for f in job.waiters if not f.done()])
        else:
            self._stats.counts["prime_chars"] += job.size
            for pos, context in job.contexts:
                self.cache.insert(job.key[:pos], context)
            self._primed(job.seqs, job.waiters, job.context)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        running = None  # the step in flight and the sequences it holds
        while True:
            if running is None:
                if not self._rows and not self._ready and not self._prefill:
                    self._stats.log(len(self._rows), self._load - len(self._rows), idle=True)
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                running = self._launch(loop)
            step, batch = running
            try:
                finished, prefilled = await step
            except Exception as err:  # a bug, never an input: fail this batch, keep serving
                self.logger.exception("charrnn decoder: step failed; dropping the batch")
                for job in self._turn_prefilled:
                    self._prefilled(job)
                for seq in batch:
                    if seq.finish_reason:  # it finished sampling in the failed step: its text is whole
                        self._finish(seq, seq.finish_reason)
                    else:
                        self._fail(seq, err)
                self._rows, self._state, self._logits, self._params = [], None, None, None
                running = None
                continue
            for job in prefilled:  # before the next launch: a primed sequence joins it
                self._prefilled(job)
            # The next step starts before this one's results are handed out: the step thread
            # never waits for the event loop (BENCHMARKS.md, "Figures from code comments").
            running = self._launch(loop) if self._rows or self._ready or self._prefill else None
            for seq in finished:
                self._finish(seq, seq.finish_reason)
            self._flush_streams()
            self._stats.log(len(self._rows), self._load - len(self._rows))

    def _launch(self, loop) -> tuple[asyncio.Future, list[Sequence]]:
        """Start the next turn on the step thread: (its future, every sequence it holds)."""
        room = self.max_batch - len(self._rows)
        join, self._ready = self._ready[:room], self._ready[room:]
        self._in_flight = self._rows + join
        return loop.run_in_executor(self._step_pool, self._turn, join), self._in_flight

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._load -= 1
        self._stats.counts["sequences"] += 1
        if seq.sink is not None:
            rest = seq._pending(final=True)
            if rest:
                seq.sink.put_nowait((seq, rest))
            seq.sink.put_nowait((seq, None))
        if not seq.done.done():
            seq.done.set_result(seq)
        if self._on_finish is not None:
            self._on_finish(seq)

    def _fail(self, seq: Sequence, err: BaseException) -> None:
        self._load -= 1
        if seq.sink is not None:
            seq.sink.put_nowait((seq, err))
        if not seq.done.done():
            seq.done.set_exception(err)

    def _flush_streams(self) -> None:
        now = time.monotonic()
        for seq in self._rows:
            if seq.sink is not None and not seq.cancelled and (
                    len(seq.chars) - seq.emitted >= self.flush_chars + max(seq._tail_len - 1, 0)
                    or now - seq.last_emit >= self.flush_interval_s or seq.emitted == 0):
                text = seq._pending(final=False)
                if text:
                    seq.sink.put_nowait((seq, text))
                    seq.last_emit = now

    # -- torch work (on the pools' threads) -----------------------------------------------------------

    @torch.inference_mode()
    def _turn(self, join: list[Sequence]) -> tuple[list[Sequence], list]:
        """Prefill slices for a share of the last decode step's time (or the idle budget when nothing
        decodes), then one decode step: (rows finished, prefill jobs handed back)."""
        decoding = bool(self._rows or join)
        # Kept on self as well: if the step fails, the event loop still hands these jobs back.
        self._turn_prefilled = self._prefill.run(self.model, self._last_step_s if decoding else None) \
            if self._prefill else []
        return (self._step(join) if decoding else []), self._turn_prefilled

    @torch.inference_mode()
    def _step(self, join: list[Sequence]) -> list[Sequence]:
        """Join `join` to the batch, sample one character for every row, drop the finished rows and
        run the survivors one step through the network. Returns the rows that finished."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        if join:
            states = ([self._state] if self._rows else []) + [s.context.state for s in join]
            self._state = state_map(lambda *parts: torch.cat(parts, dim=1), *states)
            self._logits = torch.cat(([self._logits] if self._rows else []) + [s.context.logits for s in join])
            self._rows = self._rows + join
            self._params = None
        rows = self._rows
        if self._params is None:
            vocab = self.model.config.vocab_size
            self._params = (torch.tensor([r.sampling.temperature for r in rows], device=self.device),
                            torch.tensor([min(r.sampling.top_k or 0, vocab) for r in rows], device=self.device),
                            # float32 has no 1e-300: a tiny top_p means "the likeliest only" anyway
                            torch.tensor([max(r.sampling.top_p, 1e-6) for r in rows], device=self.device))
        uniforms = torch.tensor([r.next_uniform() for r in rows], device=self.device)
        ids = sample_next(self._logits, *self._params, uniforms=uniforms)
        finished, keep, logprobs = [], [], sampled_logprobs(rows, self._logits, ids, self.table)
        for i, (row, token) in enumerate(zip(rows, ids.tolist())):
            if row.cancelled:
                row.finish_reason = "cancelled"
                finished.append(row)
            elif row._push(self.table[token], logprobs[i]):
                finished.append(row)
            else:
                keep.append(i)
        if len(keep) < len(rows):
            self._rows = [rows[i] for i in keep]
            self._params = None
            if keep:
                index = torch.tensor(keep, device=self.device)
                ids = ids[index]
                self._state = state_map(lambda s: s.index_select(1, index), self._state)
        if keep:
            self._logits, self._state = padded_step(self.model, ids, self._state, self.min_step_batch,
                                                    self.precision)
        else:
            self._state = self._logits = None
        self._last_step_s = time.perf_counter() - start
        self._stats.step(len(rows), self._last_step_s, time.thread_time() - cpu_start)
        return finished
