"""Continuous batching: many sequences sampled together from one CharRNN (docs/contracts.md, section 3).

One background asyncio task owns the batch. Each turn it lets newly primed sequences join, then runs
ONE batched model step for every active row and samples each row's next character with that row's
own temperature, top-k, top-p and torch.Generator; a finished row leaves at once. The next step
starts while the event loop hands out the last one's characters. Primes and scores go through the
network in slices between the steps, on the same thread (chunked prefill, deploy/prefill.py), so
neither a long prime nor a pile of scores stalls decoding or a new request. The torch work runs
off the event loop, which stays free for HTTP.

Same seed, same text, whatever else is in the batch: sampling draws one uniform per row from the
row's own generator (Sequence.next_uniform, models.sample_next), and the batched step is padded to
at least `min_step_batch` rows, the smallest batch from which the math library gives every row
bit-identical results whatever the batch size (measured at start-up: tiny batches take a different
kernel whose float rounding differs, which could flip a sample).

Pure PyTorch + asyncio: no Ray, no Serve, no vocabulary (ids in, characters out via `table`)."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from deploy.prefill import Prefill, PrimeJob, ScoreJob
from deploy.sampling import Sampling
from deploy.sequence import Sequence
from models import CharRNN, sample_next

class DecoderStopped(RuntimeError):
    """The decode loop died: this decoder takes no more work, and what it held failed with this."""


def _state_map(fn, *states):
    """Apply fn to the state tensor(s): LSTM states are (h, c), GRU and RNN states h alone."""
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states))
    return fn(*states)


class Decoder:
    def __init__(self, model: CharRNN, table: list[str], max_batch: int = 64, min_step_batch: int | None = None,
                 flush_chars: int = 32, flush_interval_s: float = 0.25, log_interval_s: float = 10.0,
                 logger: logging.Logger | None = None):
        """`table`: id -> character, for every id the model can produce. `min_step_batch` None:
        measured (see the module's doc). A stream gets its first character at once, then its text
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
        self.log_interval_s, self.logger = log_interval_s, logger or logging.getLogger("ray.serve")
        self.min_step_batch = min_step_batch or self.measure_min_step_batch(model, max_batch)
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
        self._load = 0  # sequences submitted and not finished, plus scores running
        self._step_loop: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._stopped: DecoderStopped | None = None  # set once, when the loop dies
        self._stats = dict(steps=0, chars=0, sequences=0, prime_chars=0, scored_chars=0, max_batch_seen=0,
                           step_seconds=0.0, step_cpu_seconds=0.0)
        self._hist: dict[int, int] = {}  # batch size -> steps
        self._window = (time.monotonic(), 0, 0)  # at the last log line: time, steps, chars
        self._window_max = 0  # the largest batch since then (written by the step thread)

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
                     first_index: int = 0) -> list[Sequence]:
        """One sequence per sampling after the same `prime`, which runs through the network once."""
        if not prime:
            raise ValueError("the prime must hold at least one id")
        if self._stopped:
            raise self._stopped
        loop = asyncio.get_running_loop()
        self._start(loop)
        seqs = [Sequence(prime, s, self.device, loop, sink, first_index + i) for i, s in enumerate(samplings)]
        self._load += len(seqs)
        for seq in seqs:
            if seq.sampling.max_chars == 0:
                self._finish(seq, "length")
        if waiting := [seq for seq in seqs if seq.finish_reason is None]:
            self._prefill.add(PrimeJob(prime, waiting))
            self._wake.set()
        return seqs

    async def score(self, ids: list[int]) -> tuple[float, int]:
        """(summed loss in nats, characters predicted) of `ids` (at least two), sliced between decode
        steps. Cancelling the caller drops the rest of the work."""
        if self._stopped:
            raise self._stopped
        loop = asyncio.get_running_loop()
        self._start(loop)
        job = ScoreJob(ids, loop.create_future())
        self._load += 1
        self._prefill.add(job)
        self._wake.set()
        try:
            total, count = await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        finally:
            self._load -= 1
        self._stats["scored_chars"] += count
        return total, count

    def stats(self) -> dict:
        steps = self._stats["steps"]
        return {**{k: v for k, v in self._stats.items() if k not in ("step_seconds", "step_cpu_seconds")},
                "mean_batch": self._stats["chars"] / steps if steps else 0.0,
                "mean_step_ms": 1e3 * self._stats["step_seconds"] / steps if steps else 0.0,
                # of that, the step thread's CPU time; at one torch thread on the CPU, the rest it
                # waited for a core or for the GIL
                "mean_step_cpu_ms": 1e3 * self._stats["step_cpu_seconds"] / steps if steps else 0.0,
                "batch_histogram": {str(k): v for k, v in sorted(self._hist.items())},
                "active": len(self._rows), "waiting": self._load - len(self._rows),
                "queued_chars": self._prefill.chars,
                "max_batch": self.max_batch, "min_step_batch": self.min_step_batch,
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
                    job.future.set_result((job.total, job.count))
            return
        if job.done and job.error is None:
            self._stats["prime_chars"] += len(job.ids)
        for i, seq in enumerate(job.seqs):
            if job.error is not None:
                self._fail(seq, job.error)
            elif seq.cancelled:
                self._finish(seq, "cancelled")
            else:  # the first sequence takes the state, the others a copy (fork)
                seq.logits = job.logits if i == 0 else job.logits.clone()
                seq.state = job.state if i == 0 else _state_map(torch.clone, job.state)
                self._ready.append(seq)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        running = None  # the step in flight and the sequences it holds
        while True:
            if running is None:
                if not self._rows and not self._ready and not self._prefill:
                    self._log(idle=True)
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
            self._log()

    def _launch(self, loop) -> tuple[asyncio.Future, list[Sequence]]:
        """Start the next turn on the step thread: (its future, every sequence it holds)."""
        room = self.max_batch - len(self._rows)
        join, self._ready = self._ready[:room], self._ready[room:]
        self._in_flight = self._rows + join
        return loop.run_in_executor(self._step_pool, self._turn, join), self._in_flight

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._load -= 1
        self._stats["sequences"] += 1
        if seq.sink is not None:
            rest = seq._pending(final=True)
            if rest:
                seq.sink.put_nowait((seq, rest))
            seq.sink.put_nowait((seq, None))
        if not seq.done.done():
            seq.done.set_result(seq)

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

    def _log(self, idle: bool = False) -> None:
        """Every log_interval_s while decoding, and when it goes idle: the batch sizes of the steps."""
        (then, steps_then, chars_then), now = self._window, time.monotonic()
        steps_now, chars_now = self._stats["steps"], self._stats["chars"]  # a step may end meanwhile
        if steps_now == steps_then or not idle and now - then < self.log_interval_s:
            return
        steps, chars = steps_now - steps_then, chars_now - chars_then
        top, self._window_max = self._window_max, 0
        rows = len(self._rows)
        self.logger.info("charrnn decoder: %d steps in %.1fs, batch mean %.1f max %d, %.0f chars/s, "
                         "active %d, waiting %d", steps, now - then, chars / steps, top,
                         chars / (now - then), rows, self._load - rows)
        self._window = (now, steps_now, chars_now)

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
            states = ([self._state] if self._rows else []) + [s.state for s in join]
            self._state = _state_map(lambda *parts: torch.cat(parts, dim=1), *states)
            self._logits = torch.cat(([self._logits] if self._rows else []) + [s.logits for s in join])
            for s in join:
                s.state = s.logits = None
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
        finished, keep = [], []
        for i, (row, token) in enumerate(zip(rows, ids.tolist())):
            if row.cancelled:
                row.finish_reason = "cancelled"
                finished.append(row)
            elif row._push(self.table[token]):
                finished.append(row)
            else:
                keep.append(i)
        if len(keep) < len(rows):
            self._rows = [rows[i] for i in keep]
            self._params = None
            if keep:
                index = torch.tensor(keep, device=self.device)
                ids = ids[index]
                self._state = _state_map(lambda s: s.index_select(1, index), self._state)
        if keep:
            self._logits, self._state = self._forward(ids, self._state)
        else:
            self._state = self._logits = None
        stats = self._stats
        stats["steps"] += 1
        stats["chars"] += len(rows)
        stats["max_batch_seen"] = max(stats["max_batch_seen"], len(rows))
        self._last_step_s = time.perf_counter() - start
        stats["step_seconds"] += self._last_step_s
        stats["step_cpu_seconds"] += time.thread_time() - cpu_start
        self._hist[len(rows)] = self._hist.get(len(rows), 0) + 1
        self._window_max = max(self._window_max, len(rows))
        return finished

    def _forward(self, ids: torch.Tensor, state):
        """One step of the network for `ids` [batch], padded to `min_step_batch` rows."""
        batch = ids.shape[0]
        pad = self.min_step_batch - batch
        if pad > 0:
            ids = torch.cat([ids, ids.new_zeros(pad)])
            state = _state_map(lambda s: torch.cat([s, s.new_zeros(s.shape[0], pad, s.shape[2])], dim=1), state)
        logits, state = self.model.step(ids, state)
        if pad > 0:
            state = _state_map(lambda s: s[:, :batch].contiguous(), state)
        return logits[:batch], state

    @staticmethod
    @torch.inference_mode()
    def measure_min_step_batch(model: CharRNN, max_batch: int) -> int:
        """The smallest m such that one step of every batch of m..max_batch rows gives each row
        exactly (bit for bit) what the full batch gives it, wherever the row sits."""
        device = model.head.weight.device
        g = torch.Generator().manual_seed(0)
        cfg = model.config
        x = torch.randint(cfg.vocab_size, (max_batch,), generator=g).to(device)
        state = model.init_state(max_batch)
        state = _state_map(lambda s: (torch.randn(s.shape, generator=g) * 0.5).to(s), state)
        want_logits, want_state = model.step(x, state)
        for m in range(max_batch - 1, 0, -1):
            rows = slice(max_batch - m, max_batch)  # the tail: rows move forward as others leave
            logits, got = model.step(x[rows], _state_map(lambda s: s[:, rows].contiguous(), state))
            same = _state_map(lambda a, b: torch.equal(a, b[:, rows]), got, want_state)
            if not (torch.equal(logits, want_logits[rows]) and all(same if isinstance(same, tuple) else [same])):
                return m + 1
        return 1
