#!/usr/bin/env python3
"""Serving under mixed load: do long /v1/score requests starve generation? Prints one JSON object.

In one run, against one `charrnn serve` (started as bench/serve.py starts it, a 2x256 LSTM with
random weights over anna.txt's characters unless --model):
  1. unloaded: --streams clients each stream one generation of --chars characters at once; each
     client's rate is its characters / its request's wall time;
  2. loaded: --scores requests to /v1/score of --score-chars characters each are sent at once (from
     anna.txt); once the replica reports them queued, one 1-character /v1/generate is timed, then
     the same --streams clients stream again; the replica's queued characters are read after the
     streams, to show the score load was still there.
Targets (issue 15): the 1-character generate under 1 s, and the streams' median rate under load at
least half the unloaded one.

  python bench/serve_mixed.py                         # 40 x 64K scores, 16 streams of 300 chars
  python bench/serve_mixed.py --scores 4 --score-chars 8000 --streams 4   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import CORPUS, REPO, _cpu_model, free_port, one_request, start_server, stop_server  # noqa: E402

sys.path.insert(0, str(REPO))
from deploy.client import CharRNNClient  # noqa: E402
from deploy.source import resolve  # noqa: E402
from models import CharRNN, ModelConfig, save_model  # noqa: E402
from pipeline.text.vocab import Vocabulary  # noqa: E402


def small_model(folder: Path) -> None:
    """The issue's 2x256 LSTM, random weights (speed does not depend on them)."""
    vocab = Vocabulary.from_counts(Counter(map(ord, CORPUS.read_text(encoding="utf-8"))))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab.size, layers=2, hidden=256)
    save_model(CharRNN(config), config, vocab.to_json(), folder, info={"weights": "random (torch seed 0)"})


def stream_rates(url: str, clients: int, chars: int, first_seed: int) -> list[dict]:
    """`clients` streams started together; each one's timings and its characters per second."""
    start_line = threading.Barrier(clients)

    def one(i: int) -> dict:
        client = CharRNNClient(url, timeout=600)
        start_line.wait()
        result = one_request(client, chars, first_seed + i)
        if "error" not in result:
            result["chars_per_s"] = result["chars"] / result["latency_s"]
        return result

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def summary(results: list[dict]) -> dict:
    rates = [r["chars_per_s"] for r in results if "chars_per_s" in r]
    return {"clients": len(results), "errors": sum("error" in r for r in results),
            "median_chars_per_s": round(float(np.median(rates)), 1) if rates else None,
            "min_chars_per_s": round(min(rates), 1) if rates else None,
            "ttfc_ms_median": round(1e3 * float(np.median([r["ttfc_s"] for r in results if "ttfc_s" in r])), 1)
            if rates else None}


def queued(url: str) -> dict:
    decoder = requests.get(f"{url}/v1/stats", timeout=30).json()["decoder"]
    return {k: decoder[k] for k in ("queued_chars", "active", "waiting", "scored_chars", "prime_chars")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scores", type=int, default=40, help="concurrent /v1/score requests (default 40)")
    ap.add_argument("--score-chars", type=int, default=65536, help="characters per score (default 65536)")
    ap.add_argument("--streams", type=int, default=16, help="streaming clients (default 16)")
    ap.add_argument("--chars", type=int, default=300, help="characters per stream (default 300)")
    ap.add_argument("--model", help="a model or run folder (default: 2x256, random weights)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="`charrnn serve --num-cpus`")
    ap.add_argument("--serve-args", default="", help="more `charrnn serve` options")
    args = ap.parse_args()
    text = CORPUS.read_text(encoding="utf-8")
    # Room for the whole score load: this measures fairness, not load shedding.
    queue_chars = max(args.scores * args.score_chars + 4096, 1 << 20)
    serve_args = ["--max-queued-chars", str(queue_chars), "--max-score-chars", str(max(args.score_chars, 65536)),
                  *shlex.split(args.serve_args)]

    with tempfile.TemporaryDirectory(prefix="bench-serve-mixed-") as tmp:
        folder = resolve(args.model) if args.model else str(Path(tmp) / "model")
        if not args.model:
            small_model(Path(folder))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(folder, port, args.num_cpus, serve_args, Path(tmp) / "serve.log", 300)
        try:
            one_request(CharRNNClient(url), 50, 0)  # warm-up
            unloaded = stream_rates(url, args.streams, args.chars, 1000)

            texts = [text[i * 997 % (len(text) - args.score_chars):][:args.score_chars] for i in range(args.scores)]
            pool = ThreadPoolExecutor(args.scores)
            scores = [pool.submit(requests.post, f"{url}/v1/score", json={"text": t}, timeout=3600) for t in texts]
            deadline = time.monotonic() + 120
            while queued(url)["queued_chars"] < args.score_chars and time.monotonic() < deadline:
                time.sleep(0.05)  # the scores have reached the replica
            at_start = queued(url)
            t0 = time.perf_counter()
            short = CharRNNClient(url, timeout=600).generate("The", max_chars=1, seed=7)
            short_s = time.perf_counter() - t0
            loaded = stream_rates(url, args.streams, args.chars, 2000)
            after_streams = queued(url)
            t1 = time.perf_counter()
            answers = [f.result() for f in scores]
            scores_wall = time.perf_counter() - t1
            pool.shutdown()
        finally:
            stop_server(server)

    statuses = Counter(r.status_code for r in answers)
    u, lo = summary(unloaded), summary(loaded)
    ratio = (lo["median_chars_per_s"] / u["median_chars_per_s"]
             if u["median_chars_per_s"] and lo["median_chars_per_s"] else None)
    print(json.dumps({
        "command": " ".join(["python", "bench/serve_mixed.py", *sys.argv[1:]]),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "flags": sorted(set(_flags()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})},
        "server": f"charrnn serve --model FOLDER --num-cpus {args.num_cpus} {' '.join(serve_args)}",
        "load": {"scores": args.scores, "score_chars": args.score_chars, "statuses": dict(statuses),
                 "queued_when_the_short_request_went": at_start, "queued_after_the_streams": after_streams,
                 "seconds_from_the_streams_end_to_the_last_score": round(scores_wall, 1)},
        "short_generate_s": round(short_s, 3), "short_generate_text_chars": len(short["text"]),
        "streams_unloaded": u, "streams_under_score_load": lo,
        "stream_rate_ratio": round(ratio, 2) if ratio else None,
        "targets": {"short_generate_under_1s": short_s < 1.0, "streams_keep_half": bool(ratio and ratio >= 0.5),
                    "load_held_through_the_streams": after_streams["queued_chars"] > 0},
    }, indent=1))


def _flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


if __name__ == "__main__":
    main()
