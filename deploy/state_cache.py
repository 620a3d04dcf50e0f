"""What the model has read, and a replica's cache of it (docs/contracts.md, section 3).

A recurrent model's whole context is its state plus the next character's logits: a few kilobytes
(2 x layers x hidden floats for an LSTM) whatever the length of the text behind it. So a replica
keeps the context after the primes it has run, and a prime that begins with a cached prefix runs
only the rest. Prefixes match at any character: while a prime runs, its context is kept where it
leaves the longest prefix it shares with any cached one (the next prime that shares it starts
there exactly), every SNAPSHOT_EVERY characters, and at its end.

Running a text in one piece or in slices from a saved context gives bit-identical states (the
prefill already slices), so the same seed gives the same text with the cache on or off.

Pure PyTorch and the standard library: no Ray, no asyncio."""
from __future__ import annotations

from bisect import bisect_right, insort
from collections import OrderedDict
from dataclasses import dataclass

import torch

SNAPSHOT_EVERY = 256  # characters between the contexts kept while a prime runs


@dataclass(frozen=True)
class Context:
    """The state after a text (batch of one: [layers, 1, hidden], a pair for an LSTM) and the logits
    [1, vocab] of the character after it. Its tensors are never written in place, so one context
    may be shared by the cache, sessions and any number of sequences."""
    state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    logits: torch.Tensor

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*(self.state if isinstance(self.state, tuple) else (self.state,)), self.logits)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def key_of(ids: list[int]) -> str:
    """A prime's ids as a string, one code point per id: compared and sliced at C speed."""
    return "".join(map(chr, ids))


def common_length(a: str, b: str) -> int:
    """The length of the longest common prefix of a and b (binary search on slices)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def longest_shared(sorted_keys: list[str], key: str) -> int:
    """The longest prefix `key` shares with any of `sorted_keys`: the keys sharing the most with it
    are its neighbours in sorted order."""
    at = bisect_right(sorted_keys, key)
    return max((common_length(key, sorted_keys[j]) for j in (at - 1, at) if 0 <= j < len(sorted_keys)), default=0)


class PrefixCache:
    """Contexts by the exact text (key_of) that led to them, bounded by `max_bytes` (keys and
    tensors), least recently used out first. 0 bytes: off. Used from one thread (the event loop)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._sorted: list[str] = []  # every key, in order: the longest cached prefix by bisection
        self._lru: OrderedDict[str, Context] = OrderedDict()
        self.bytes = 0
        self.stats = dict(lookups=0, hits=0, chars_saved=0, evictions=0)

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, key: str) -> tuple[int, Context | None, int]:
        """(n, the context after key[:n], shared): key[:n] is the longest cached prefix of key (n 0
        and None if none), `shared` the longest prefix key has in common with any cached key."""
        if not self.max_bytes:
            return 0, None, 0
        self.stats["lookups"] += 1
        shared = longest_shared(self._sorted, key)
        probe = key[:shared]
        while probe:
            # The longest cached prefix of probe lies between it and probe: the largest key <= probe
            # either is it, or shares with probe a shorter prefix that still holds it.
            j = bisect_right(self._sorted, probe) - 1
            if j < 0:
                break
            found = self._sorted[j]
            if probe.startswith(found):
                self._lru.move_to_end(found)
                self.stats["hits"] += 1
                self.stats["chars_saved"] += len(found)
                return len(found), self._lru[found], shared
            probe = probe[:common_length(found, probe)]
        return 0, None, shared

    def snapshot_points(self, length: int, start: int, shared: int) -> list[int]:
        """Where a prime of `length` characters, run from `start`, should leave contexts to cache."""
        if not self.max_bytes:
            return []
        points = set(range((start // SNAPSHOT_EVERY + 1) * SNAPSHOT_EVERY, length, SNAPSHOT_EVERY))
        points.add(length)
        if start < shared < length:
            points.add(shared)
        return sorted(points)

    def insert(self, key: str, context: Context) -> None:
        if not self.max_bytes or not key:
            return
        if key in self._lru:
            self._lru.move_to_end(key)
            return
        size = len(key) + context.nbytes
        if size > self.max_bytes:
            return
        insort(self._sorted, key)
        self._lru[key] = context
        self.bytes += size
        while self.bytes > self.max_bytes:
            old, gone = self._lru.popitem(last=False)
            self._sorted.pop(bisect_right(self._sorted, old) - 1)
            self.bytes -= len(old) + gone.nbytes
            self.stats["evictions"] += 1

    def summary(self) -> dict:
        return {**self.stats, "entries": len(self._lru), "bytes": self.bytes, "max_bytes": self.max_bytes}
