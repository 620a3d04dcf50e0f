#!/usr/bin/env python3
"""`charrnn eval` benchmark: one stream against parallel lanes, each as a user runs it.

Prints one JSON object. Scores one text (default: anna.txt and tinyshakespeare.txt joined, about
3 MB) under a model folder (default: a 2x256 LSTM saved with random weights, vocabulary from the
text; speed does not depend on the weights, and --model takes a trained one for a meaningful loss)
twice, each `charrnn eval` in its own fresh process: `--lanes 1` (one stream, state carried: the
classic way), the default (parallel lanes with burn-in), and the default with `--precision bf16`.
Reports wall time, the loss of each, their difference and the speed-up. Targets: >= 10x faster,
loss within 0.01 nats/char.

`ceiling`: what the arithmetic allows. The network's multiply-adds per character (2 x the weights of
its recurrent stack and head) times the characters, over the rate of a large matrix product on
this machine (measured in a fresh process, best of 10): the fastest any schedule of the same
arithmetic could score the text, and so the largest speed-up over one stream in each precision.

  python bench/eval.py                              # ~2 min on 2 idle cores
  python bench/eval.py --model runs/anna --text held_out.txt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def cpu() -> dict:
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    return {"cpu": name, "cpus": os.cpu_count(),
            "flags": [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")]}


def random_model(text: str, folder: Path, hidden: int, layers: int) -> Path:
    import torch

    sys.path.insert(0, str(REPO))
    from models import CharRNN, ModelConfig, save_model
    from pipeline.text.vocab import Vocabulary

    vocab = Vocabulary(sorted(set(text)))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab.size, layers=layers, hidden=hidden)
    save_model(CharRNN(config), config, vocab.to_json(), folder, info={"step": 0})
    return folder


def timed_eval(model: Path, text: Path, *options: str) -> dict:
    cmd = [sys.executable, "-m", "charrnn", "eval", "--model", str(model), *options, str(text)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    wall = time.perf_counter() - started
    line = done.stdout.strip().splitlines()[-1]
    return {"wall_s": round(wall, 2), "loss": float(line.split("loss ")[1].split()[0]), "output": line,
            "cmd": "charrnn " + " ".join(cmd[3:])}


MATMUL = r"""
import json, sys, time, torch
n, out = 2048, {}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - started)
    out[name] = 2 * n**3 / best / 1e9
print(json.dumps(out))
"""


def ceiling(model: Path, chars: int, one_stream_s: float) -> dict:
    """The arithmetic bound on scoring `chars` characters with `model` (see the module's doc)."""
    sys.path.insert(0, str(REPO))
    from models import load_model

    net = load_model(model)[0]
    flops_per_char = 2 * sum(w.numel() for name, w in net.named_parameters()
                             if "weight" in name and "embed" not in name)
    done = subprocess.run([sys.executable, "-c", MATMUL], capture_output=True, text=True, check=True)
    gflops = json.loads(done.stdout)
    out = {"mflop_per_char": round(flops_per_char / 1e6, 2),
           "matmul_gflop_per_s": {k: round(v) for k, v in gflops.items()}}
    for name, rate in gflops.items():
        fastest = flops_per_char * chars / (rate * 1e9)
        out[f"fastest_s_{name}"] = round(fastest, 1)
        out[f"largest_speedup_{name}"] = round(one_stream_s / fastest, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, nargs="*", default=[DATA / "anna.txt", DATA / "tinyshakespeare.txt"])
    ap.add_argument("--model", type=Path, default=None, help="a model or run folder (default: random 2x256 LSTM)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = "".join(p.read_text() for p in args.text)
        joined = Path(tmp, "text.txt")
        joined.write_text(text)
        model = args.model or random_model(text, Path(tmp, "model"), args.hidden, args.layers)
        one = timed_eval(model, joined, "--lanes", "1")
        runs = {"lanes": timed_eval(model, joined), "lanes_bf16": timed_eval(model, joined, "--precision", "bf16")}
        bound = ceiling(model, len(text), one["wall_s"])
    report = {"machine": cpu(), "text": [str(p) for p in args.text], "text_mb": round(len(text.encode()) / 1e6, 2),
              "model": str(args.model or f"random {args.layers}x{args.hidden} LSTM"), "one_stream": one}
    for name, got in runs.items():
        report[name] = {**got, "speedup": round(one["wall_s"] / got["wall_s"], 2),
                        "loss_difference": round(got["loss"] - one["loss"], 4)}
    print(json.dumps({**report, "ceiling": bound}, indent=1))


if __name__ == "__main__":
    main()
