"""One sampled text: a row of the decoder (deploy/decoder.py)."""
from __future__ import annotations

import asyncio
import secrets
import time
import torch

from deploy.sampling import Sampling

UNIFORM_BLOCK = 256


class Sequence:
    """One sampled text. Its fields are written by the decoder's threads and read by the caller once
    `done` is set. Streams also get (sequence, text) items on `sink`, then (sequence, None)."""

    def __init__(self, prime: list[int], sampling: Sampling, device, loop, sink: asyncio.Queue | None, index: int):
        self.prime, self.sampling, self.sink, self.index = prime, sampling, sink, index
        self.seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self._uniforms: list[float] = []  # drawn ahead, next one last
        self.done = loop.create_future()  # result: self; set once
        self.chars: list[str] = []
        self.emitted = 0  # characters already put on the sink
        self.submitted = self.last_emit = time.monotonic()
        self.first_char_at: float | None = None  # when its first character was sampled
        self.finish_reason: str | None = None  # "length", "stop", "cancelled"
        self.cancelled = False
        self.context = None  # after the prime: deploy.state_cache.Context
        # with sampling.logprobs set, per character: (its log-probability, [(alternative, log-probability)])
        self.logprobs: list[tuple[float, list]] = []
        self._tail, self._tail_len = "", max(map(len, sampling.stop), default=0)

    @property
    def text(self) -> str:
        return "".join(self.chars)

    def next_uniform(self) -> float:
        """The next draw of this sequence's generator. Drawn UNIFORM_BLOCK at a time: one torch call
        per block, where one per step cost 64 calls a step at 64 rows (a fifth of sampling's time).
        On the CPU a block holds exactly the draws that one call per draw would give."""
        if not self._uniforms:
            self._uniforms = torch.rand(UNIFORM_BLOCK, generator=self.generator,
                                        device=self.generator.device).tolist()[::-1]
        return self._uniforms.pop()

    def cancel(self) -> None:
        """The client went away: stop sampling for it at the next step."""
        self.cancelled = True

    def _push(self, char: str, logprob: tuple[float, list] | None = None) -> bool:
        """Append one sampled character; True when the sequence is finished. The event loop may
        read `chars` meanwhile (_pending): a stop string's last character is never appended and
        its first ones, already in, lie in the held-back tail, so no reader sees any of them."""
        if self._tail_len:
            self._tail = (self._tail + char)[-self._tail_len:]
            ends = [len(stop) for stop in self.sampling.stop if self._tail.endswith(stop)]
            if ends:  # of stops ending here, the longest starts first: the text ends before it
                del self.chars[len(self.chars) - (max(ends) - 1):]
                del self.logprobs[len(self.chars):]
                self.finish_reason = "stop"
                return True
        if logprob is not None:
            self.logprobs.append(logprob)
        if not self.chars:
            self.first_char_at = time.monotonic()
        self.chars.append(char)
        if len(self.chars) >= self.sampling.max_chars:
            self.finish_reason = "length"
            return True
        return False

    def _pending(self, final: bool) -> str:
        """Text not yet streamed. Until the end, the last len(longest stop) - 1 characters are held
        back: they may be the start of a stop string, which never reaches the client."""
        end = len(self.chars) if final else len(self.chars) - max(self._tail_len - 1, 0)
        if end <= self.emitted:
            return ""
        out = "".join(self.chars[self.emitted:end])
        self.emitted = end
        return out
