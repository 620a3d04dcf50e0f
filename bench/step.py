#!/usr/bin/env python3
"""The bare training step (models.CharRNN + training.step.train_step, no Ray, no data pipeline) on
any device, in float32 and bf16 autocast: the figure `charrnn train` can approach on that hardware.
Needs only PyTorch and numpy, so it runs on a lent GPU machine that has no Ray.

Prints one JSON object: per batch size and precision, characters per second over --steps timed
steps after --warmup, windows of random ids (speed does not depend on the text).

  python bench/step.py                                       # CPU, 2x512, batch 128
  python bench/step.py --device cuda --batches 128,1024      # a GPU, the seed's batch and a large one
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import CharRNN, ModelConfig  # noqa: E402
from models import native_bf16  # noqa: E402
from training.step import keep_freed_memory, make_optimizer, train_step  # noqa: E402
from training.windows import Window  # noqa: E402

VOCAB = 84  # anna.txt's 83 characters and the unknown id


def measure(device: torch.device, batch: int, precision: str, args) -> dict:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=VOCAB, layers=args.layers, hidden=args.hidden)).to(device)
    optimizer, scheduler = make_optimizer(model, 1e-3, "constant", args.warmup + args.steps)
    ids = np.random.default_rng(0).integers(0, VOCAB, (batch, args.seq + 1))
    window = Window(ids[:, :-1].astype(np.int64), ids[:, 1:].astype(np.int64), np.zeros(batch, bool))
    state = model.init_state(batch)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss, grad_norm, state = train_step(model, optimizer, scheduler, window, state, 5.0, device, precision)
        float(grad_norm)  # the worker reads it every step: a host sync, as in training
    seconds = time.perf_counter() - started
    return {"chars_per_s": round(args.steps * batch * args.seq / seconds),
            "ms_per_step": round(1000 * seconds / args.steps, 1), "loss": round(float(loss), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="128")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc's allocator as it is, unlike charrnn train (to measure what that costs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_allocator:
        keep_freed_memory()  # as charrnn train's worker does
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    if device.type == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    results = {f"batch {batch}": {p: measure(device, int(batch), p, args) for p in args.precisions.split(",")}
               for batch in args.batches.split(",")}
    print(json.dumps({"device": name, "native_bf16": native_bf16(device), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "freed_memory_kept": not args.default_allocator,
                      "model": f"{args.layers}x{args.hidden} LSTM, seq {args.seq}",
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
