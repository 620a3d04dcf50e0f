#!/usr/bin/env python3
"""Page faults of a training step run in a thread of a Ray worker (as Ray Train runs its loop), in
the worker environment `charrnn train` gives (training.driver.WORKER_ENV) and without it, side by
side in one run. Prints one JSON object.

Faults are counted by the kernel, so the figures do not depend on how busy the machine is; each
side is a fresh worker process. `--steps` steps are measured after four warm-up steps, one torch
thread, the seed's network (2x512 LSTM, batch 128, seq 100) unless told otherwise.

  python bench/worker_faults.py            # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def faults_per_step(hidden: int, batch: int, seq: int, steps: int) -> dict:
    import os
    import resource
    import threading

    import torch
    import torch.nn.functional as F

    from models import CharRNN, ModelConfig
    from training.step import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(1)
    model = CharRNN(ModelConfig(vocab_size=83, layers=2, hidden=hidden, dropout=0.5))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    data = torch.randint(83, (batch, seq + 1))
    found = {}

    def loop():
        for i in range(4 + steps):
            if i == 4:
                before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            logits, _ = model(data[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 83), data[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        found["faults"] = (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / steps

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    return {"minor_faults_per_step": round(found["faults"]), "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=100)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    import ray

    from training.driver import WORKER_ENV

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        measure = ray.remote(faults_per_step)
        sides = {}
        for name, env in (("ray_default", {}), ("charrnn_worker_env", WORKER_ENV)):
            options = {"runtime_env": {"env_vars": {**env, "PYTHONPATH": str(REPO)}}}
            sides[name] = ray.get(measure.options(**options).remote(args.hidden, args.batch, args.seq, args.steps))
    finally:
        ray.shutdown()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    print(json.dumps({"cpu": cpu, "config": vars(args), **sides,
                      "ratio": round(sides["ray_default"]["minor_faults_per_step"]
                                     / max(1, sides["charrnn_worker_env"]["minor_faults_per_step"]), 1)}, indent=1))


if __name__ == "__main__":
    main()
