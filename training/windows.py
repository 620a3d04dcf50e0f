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
    source = (run for run in runs if len(run) >= 2)  # a run of one point has nothing to predict
    first = next(source, None)
    if first is None:
        return
    source = itertools.chain([first], source)
    values = first.dtype.kind == "f"
    shape, dtype = (lanes, seq) + first.shape[1:], np.float32 if values else np.int64
    missing = np.nan if values else IGNORE
    current: list[np.ndarray | None] = [None] * lanes
    position = [0] * lanes
    while True:
        inputs = np.zeros(shape, dtype)
        targets = np.full(shape, missing, dtype)
        reset = np.zeros(lanes, bool)
        for lane in range(lanes):
            run = current[lane]
            if run is None or len(run) - position[lane] < 2:
                run = current[lane] = next(source, None)
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


class EpochStream:
    """Runs from `epoch_runs(epoch)` for epoch after epoch, counting where it is so that a resumed
    run can skip what it already took: (epoch, taken) is the data position in a checkpoint."""

    def __init__(self, epoch_runs: Callable[[int], Iterable[np.ndarray]], epoch: int = 0, skip: int = 0):
        self._epoch_runs = epoch_runs
        self.epoch, self.taken, self._skip = epoch, 0, skip

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            empty = True
            for run in self._epoch_runs(self.epoch):
                empty = False
                if self._skip:
                    self._skip -= 1
                    self.taken += 1
                    continue
                self.taken += 1
                yield run
            if empty:
                return
            self.epoch, self.taken, self._skip = self.epoch + 1, 0, 0
