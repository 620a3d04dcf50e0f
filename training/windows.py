"""Text runs -> training windows, the classic recipe's batch walk made streaming.

Each of `lanes` rows walks one run at a time, `seq` tokens per window, so the recurrent state can
be carried from one window to the next. When a lane's run is used up it takes the next run from
the stream and is flagged for a state reset. The last window of a run may be short: its missing
targets are IGNORE, which the loss skips."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index


class Window(NamedTuple):
    inputs: np.ndarray  # [lanes, seq] int64
    targets: np.ndarray  # [lanes, seq] int64, IGNORE where there is no target
    reset: np.ndarray  # [lanes] bool: this lane starts a new run, so its state starts from zero


def windows(runs: Iterable[np.ndarray], lanes: int, seq: int) -> Iterator[Window]:
    """Windows until every lane has run out of text (forever if `runs` is endless)."""
    source = (run for run in runs if len(run) >= 2)  # a run of one token has nothing to predict
    current: list[np.ndarray | None] = [None] * lanes
    position = [0] * lanes
    while True:
        inputs = np.zeros((lanes, seq), np.int64)
        targets = np.full((lanes, seq), IGNORE, np.int64)
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
