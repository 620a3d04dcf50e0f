#!/usr/bin/env python3
"""`charrnn eval` benchmark: one stream against parallel lanes, each as a user runs it.

Prints one JSON object. Scores one text (default: anna.txt and tinyshakespeare.txt joined, about
3 MB) under a model folder (default: a 2x256 LSTM saved with random weights, vocabulary from the
text; speed does not depend on the weights, and --model takes a trained one for a meaningful loss)
twice, each `charrnn eval` in its own fresh process: `--lanes 1` (one stream, state carried: the
classic way) and the default (parallel lanes with burn-in). Reports wall time, the loss of each,
their difference and the speed-up. Targets: >= 10x faster, loss within 0.01 nats/char.

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
    return {"cpu": name, "cpus": os.cpu_count(), "flags": [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")]}


def random_model(text: str, folder: Path, hidden: int, layers: int) -> Path:
    import torch

    sys.path.insert(0, str(REPO))
    from models import CharRNN, ModelConfig, save_model
    from pipeline.vocab import Vocabulary

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
        lanes = timed_eval(model, joined)
    print(json.dumps({"machine": cpu(), "text": [str(p) for p in args.text], "text_mb": round(len(text.encode()) / 1e6, 2),
                      "model": str(args.model or f"random {args.layers}x{args.hidden} LSTM"),
                      "one_stream": one, "lanes": lanes, "speedup": round(one["wall_s"] / lanes["wall_s"], 2),
                      "loss_difference": round(lanes["loss"] - one["loss"], 4)}, indent=1))


if __name__ == "__main__":
    main()
