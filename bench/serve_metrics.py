#!/usr/bin/env python3
"""What a text replica's Prometheus metrics (deploy/metrics.py) cost: the time of each hook, measured
in a Ray actor as a replica records them, and the share of a core they take at a given load (by
default bench/serve.py's 64-client level: 64 streams of 500 characters at ~6,000 chars/s, about
100 decode steps of 64 rows a second). Prints one JSON object.

An A/B of the whole server cannot resolve this on a shared 2-core machine: four alternating runs of
`bench/serve.py --levels 64` with and without the metrics spread over 4,078-6,391 chars/s (see
BENCHMARKS.md), far more than the hooks could move it.

  python bench/serve_metrics.py            # ~20 s
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train import machine  # noqa: E402  (bench/train.py, beside this file)


def hook_costs(calls: int, rows: int) -> dict:
    """Microseconds per call of each hook, in this process (a Ray worker); publish, which costs a
    hundred times more, is timed over calls / 100."""
    import asyncio
    import time
    from types import SimpleNamespace

    from deploy.metrics import ServingMetrics

    metrics = ServingMetrics("bench", stats=None)
    t0 = time.monotonic()
    seq = SimpleNamespace(finish_reason="length", submitted=t0 - 5.0, first_char_at=t0 - 4.7, chars=["x"] * 500)
    stats = {"prime_chars": 0, "chars": 0, "scored_chars": 0, "steps": 0, "batch_histogram": {},
             "state_cache": {"lookups": 0, "hits": 0, "chars_saved": 0, "evictions": 0, "bytes": 0, "entries": 0},
             "active": rows, "waiting": 0, "queued_chars": 0}

    def per_call(fn, n=calls) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return 1e6 * (time.perf_counter() - start) / n

    def publish_100_steps():  # one second's figures at ~100 steps of `rows` rows
        stats["steps"] += 100
        stats["chars"] += 100 * rows
        stats["batch_histogram"] = {str(rows): stats["steps"]}
        metrics.publish(dict(stats))

    async def answered():  # needs the running loop: the first answer starts the publisher
        return per_call(lambda: metrics.answered("/v1/generate", 200, None))

    return {"finished_us": per_call(lambda: metrics.finished(seq)),
            "answered_us": asyncio.run(answered()),
            "publish_100_steps_us": per_call(publish_100_steps, max(1, calls // 100))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls timed per hook")
    parser.add_argument("--rows", type=int, default=64, help="rows per decode step")
    parser.add_argument("--chars-per-s", type=float, default=6000.0, help="characters generated a second")
    parser.add_argument("--chars", type=int, default=500, help="characters per request")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        costs = ray.get(ray.remote(hook_costs).remote(args.calls, args.rows))
    finally:
        ray.shutdown()
    sequences_per_s = args.chars_per_s / args.chars
    steps_per_s = args.chars_per_s / args.rows
    # Per second: each sequence finishes once and its request is answered once; the publisher runs
    # once, covering that second's steps (scaled from its 100-step figure).
    spent_us = sequences_per_s * (costs["finished_us"] + costs["answered_us"]) + \
        costs["publish_100_steps_us"] * steps_per_s / 100
    print(json.dumps({"command": " ".join(["python bench/serve_metrics.py", *sys.argv[1:]]), "machine": machine(),
                      "hooks_us": {k: round(v, 2) for k, v in costs.items()},
                      "load": {"chars_per_s": args.chars_per_s, "sequences_per_s": sequences_per_s,
                               "steps_per_s": steps_per_s, "rows": args.rows},
                      "share_of_one_core": round(spent_us / 1e6, 6),
                      "notes": ["hooks_us: microseconds per call in a Ray worker; publish_100_steps: one publish "
                                "covering 100 decode steps (a batch-rows observation each)",
                                "share_of_one_core: the hooks' time per second at that load / 1 s"]}, indent=1))


if __name__ == "__main__":
    main()
