"""Runs -> training windows, the classic recipe's batch walk made streaming.

A run is text (token ids, [points]) or a time series (float values, [points, features]). Each of
`lanes` rows walks one run at a time, `seq` points per window, so the recurrent state can be
carried from one window to the next. When a lane's run is used up it takes the next run from the
stream and is flagged for a state reset. The last window of a run may be short: its missing
targets are IGNORE (ids) or NaN (values), which the loss skips."""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index


class Window(NamedTuple):
    inputs: np.ndarray  # [lanes, seq] int64 ids, or [lanes, seq, features] float32 values
    targets: np.ndarray  # the same shape, IGNORE or NaN where there is no target
    reset: np.ndarray  # [lanes] bool: this lane starts a new run, so its state starts from zero


def windows(runs: Iterable[np.ndarray], lanes: int, seq: int) -> Iterator[Window]:
    """Windows until every lane has run out of runs (forever if `runs` is endless)."""
    return iter(Lanes(runs, lanes, seq))


class Lanes:
    """The lanes' walk over `runs`, one window per iteration. `remainders()` is what each lane has
    not yet fed (a checkpoint keeps it); `restored` hands such remainders back, so a resumed walk
    goes on with exactly the windows the uninterrupted one would have made."""

    def __init__(self, runs: Iterable[np.ndarray], lanes: int, seq: int,
                 restored: list[np.ndarray | None] | None = None):
        self.source = (run for run in runs if len(run) >= 2)  # a run of one point has nothing to predict
        self.lanes, self.seq = lanes, seq
        self.current: list[np.ndarray | None] = [None] * lanes
        self.position = [0] * lanes
        if restored is not None:
            if len(restored) != lanes:
                raise ValueError(f"{len(restored)} lane remainders for {lanes} lanes")
            self.current = [run if run is not None and len(run) >= 2 else None for run in restored]

    def remainders(self) -> list[np.ndarray | None]:
        """Per lane, the points it has yet to feed (its next input first), or None for a lane that
        takes a new run at its next window."""
        return [None if run is None or len(run) - self.position[lane] < 2 else run[self.position[lane]:]
                for lane, run in enumerate(self.current)]

    def __iter__(self) -> Iterator[Window]:
        first = self._first_run()
        if first is None:
            return
        values = first.dtype.kind == "f"
        shape, dtype = (self.lanes, self.seq) + first.shape[1:], np.float32 if values else np.int64
        missing = np.nan if values else IGNORE
        current, position, seq = self.current, self.position, self.seq
        while True:
            inputs = np.zeros(shape, dtype)
            targets = np.full(shape, missing, dtype)
            reset = np.zeros(self.lanes, bool)
            for lane in range(self.lanes):
                run = current[lane]
                if run is None or len(run) - position[lane] < 2:
                    run = current[lane] = next(self.source, None)
                    position[lane], reset[lane] = 0, True
                    if run is None:
                        continue
                chunk = run[position[lane] : position[lane] + seq + 1]
                n = len(chunk) - 1
                inputs[lane, :n] = chunk[:-1]
                targets[lane, :n] = chunk[1:]
                position[lane] += n  # the last target is the next window's first input
            if all(run is None for run in current):
                return
            yield Window(inputs, targets, reset)

    def _first_run(self) -> np.ndarray | None:
        """A run that sets the windows' dtype and point shape, left where it was."""
        held = [run for run in self.current if run is not None]
        if held:
            return held[0]
        first = next(self.source, None)
        if first is not None:
            self.source = itertools.chain([first], self.source)
        return first


class EpochStream:
    """Runs from `epoch_runs(epoch)` for epoch after epoch, counting where it is so that a resumed
    run can skip what it already took: (epoch, taken) is the data position in a checkpoint. It ends
    after an epoch with no run of two or more points: nothing to learn from, forever."""

    def __init__(self, epoch_runs: Callable[[int], Iterable[np.ndarray]], epoch: int = 0, skip: int = 0):
        self._epoch_runs = epoch_runs
        self.epoch, self.taken, self._skip = epoch, 0, skip

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            empty = True
            for run in self._epoch_runs(self.epoch):
                empty = empty and len(run) < 2
                if self._skip:
                    self._skip -= 1
                    self.taken += 1
                    continue
                self.taken += 1
                yield run
            if empty:
                return
            self.epoch, self.taken, self._skip = self.epoch + 1, 0, 0
