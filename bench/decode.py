#!/usr/bin/env python3
"""Decoding engine benchmark: the Serve replica's continuous-batching Decoder alone, in-process, with
no Ray, no HTTP and no clients, on the CPU or a GPU. Needs only PyTorch, so it runs on a machine
without Ray (a lent GPU machine) as well as here.

Prints one JSON object. For each level of --levels, that many sequences of --chars characters
(prime "The", top_k 5, one seed each) are submitted at once and decoded together; per level:
characters per second, the decoder's mean batch and milliseconds per batched step. Then the
check that batching changes no text: a few seeds sampled alone and inside the largest level give
the same characters. Against bench/serve.py's figures at the same level, the difference is what
HTTP, Serve and the clients cost.

  python bench/decode.py                          # CPU, 1, 8, 64 sequences x 500 characters
  python bench/decode.py --device cuda --levels 1,64,256,1024
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from deploy.decoder import Decoder  # noqa: E402
from deploy.sampling import Sampling  # noqa: E402
from models import CharRNN, ModelConfig  # noqa: E402

VOCAB = 83  # anna.txt's characters (bench/serve.py's seed-size model) plus the unknown id
PRIME = [1, 2, 3]
TOP_K = 5


async def decode(decoder: Decoder, seeds: list[int], chars: int) -> tuple[list[str], float]:
    """The texts of one sequence per seed, all submitted at once, and the wall time."""
    start = time.perf_counter()
    seqs = [decoder.submit(PRIME, Sampling(max_chars=chars, top_k=TOP_K, seed=seed)) for seed in seeds]
    await asyncio.gather(*(s.done for s in seqs))
    return [s.text for s in seqs], time.perf_counter() - start


async def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=VOCAB, layers=args.layers, hidden=args.hidden)).to(device)
    table = [chr(0x21 + i) for i in range(VOCAB)]
    levels = [int(n) for n in args.levels.split(",")]
    decoder = Decoder(model, table, max_batch=max(levels))
    try:
        await decode(decoder, [0], 50)  # warm-up: kernels, allocator
        results, seed = [], 1
        for n in levels:
            before = decoder.stats()
            _, wall = await decode(decoder, list(range(seed, seed + n)), args.chars)
            after = decoder.stats()
            steps = after["steps"] - before["steps"]
            step_ms = (after["mean_step_ms"] * after["steps"] - before["mean_step_ms"] * before["steps"]) / steps
            results.append({"sequences": n, "chars_per_s": round(n * args.chars / wall, 1), "wall_s": round(wall, 3),
                            "mean_batch": round((after["chars"] - before["chars"]) / steps, 1),
                            "mean_step_ms": round(step_ms, 3)})
            seed += n
        crowd, _ = await decode(decoder, list(range(1000, 1000 + max(levels))), args.chars)
        alone = [(await decode(decoder, [s], args.chars))[0][0] for s in (1000, 1001, 999 + max(levels))]
        same = alone == [crowd[0], crowd[1], crowd[-1]]
        min_step_batch = decoder.min_step_batch
    finally:
        decoder.close()
    return {"command": " ".join(["python", "bench/decode.py", *sys.argv[1:]]),
            "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                        or platform.machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
            "model": {"cell": "lstm", "layers": args.layers, "hidden": args.hidden, "vocab_size": VOCAB,
                      "weights": "random (torch seed 0)"},
            "chars_per_sequence": args.chars, "min_step_batch": min_step_batch, "levels": results,
            "same_text_alone_and_in_the_largest_batch": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ap.add_argument("--levels", default="1,8,64", help="sequences decoded together per level (default 1,8,64)")
    ap.add_argument("--chars", type=int, default=500, help="characters per sequence (default 500)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, a replica's default)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = asyncio.run(run(args))
    print(json.dumps(out, indent=1))
    if not out["same_text_alone_and_in_the_largest_batch"]:
        raise SystemExit("a seed gave another text inside the batch than alone")


if __name__ == "__main__":
    main()
