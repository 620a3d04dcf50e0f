"""The decoder's running figures: counters for GET /v1/stats and a periodic log line of the batch
sizes its steps ran at. The step thread records steps; the event loop records the rest and reads."""
from __future__ import annotations

import logging
import time


class DecoderStats:
    def __init__(self, logger: logging.Logger, log_interval_s: float):
        self.logger, self.log_interval_s = logger, log_interval_s
        self.counts = dict(steps=0, chars=0, sequences=0, prime_chars=0, scored_chars=0, max_batch_seen=0)
        self.step_seconds = self.step_cpu_seconds = 0.0
        self.histogram: dict[int, int] = {}  # batch size -> steps
        self._window = (time.monotonic(), 0, 0)  # at the last log line: time, steps, chars
        self._window_max = 0  # the largest batch since then

    def step(self, rows: int, seconds: float, cpu_seconds: float) -> None:
        """One decode step of `rows` rows (on the step thread)."""
        counts = self.counts
        counts["steps"] += 1
        counts["chars"] += rows
        counts["max_batch_seen"] = max(counts["max_batch_seen"], rows)
        self.step_seconds += seconds
        self.step_cpu_seconds += cpu_seconds
        self.histogram[rows] = self.histogram.get(rows, 0) + 1
        self._window_max = max(self._window_max, rows)

    def summary(self) -> dict:
        steps = self.counts["steps"]
        return {**self.counts,
                "mean_batch": self.counts["chars"] / steps if steps else 0.0,
                "mean_step_ms": 1e3 * self.step_seconds / steps if steps else 0.0,
                # of that, the step thread's CPU time; at one torch thread on the CPU, the rest it
                # waited for a core or for the GIL
                "mean_step_cpu_ms": 1e3 * self.step_cpu_seconds / steps if steps else 0.0,
                "batch_histogram": {str(k): v for k, v in sorted(self.histogram.items())}}

    def log(self, active: int, waiting: int, idle: bool = False) -> None:
        """Every log_interval_s while decoding, and when it goes idle: the batch sizes of the steps."""
        (then, steps_then, chars_then), now = self._window, time.monotonic()
        steps_now, chars_now = self.counts["steps"], self.counts["chars"]  # a step may end meanwhile
        if steps_now == steps_then or not idle and now - then < self.log_interval_s:
            return
        steps, chars = steps_now - steps_then, chars_now - chars_then
        top, self._window_max = self._window_max, 0
        self.logger.info("charrnn decoder: %d steps in %.1fs, batch mean %.1f max %d, %.0f chars/s, "
                         "active %d, waiting %d", steps, now - then, chars / steps, top,
                         chars / (now - then), active, waiting)
        self._window = (now, steps_now, chars_now)
