#!/usr/bin/env python3
"""Serving benchmark: `charrnn serve` under concurrent HTTP clients against the classic sampling loop.

Prints one JSON object. In one run it:
  0. runs the classic script itself (/work/shared/baselines/notebook_charrnn.py --steps 1
     --sample-chars 1000), unchanged, in fresh processes on the idle machine, best of three: its own
     `sample_chars_per_s` is the classic rate every target is taken against;
  1. builds the seed-size model (2x512 LSTM, vocabulary: the characters of anna.txt) with random
     weights, seed 0, and saves it as a model folder (or takes a trained one: --model); speed does
     not depend on the weights;
  2. starts `charrnn serve --model FOLDER --port P --num-cpus N` as a user would, in its own
     session, waits for GET /healthz, sends one warm-up request, then for each level of --levels
     runs that many client threads at once, each streaming requests of --chars characters from
     POST /v1/generate (prime "The", top_k 5, seed --seed + request number). A client at a level
     makes max(--min-rounds, ceil(--min-requests / clients)) requests one after the other: small
     levels get several samples, and at 64 clients the level is not one burst of simultaneous
     starts and finishes but a steady load, as a service sees it. Per level: aggregate characters
     per second (all characters received / wall time from the common start to the last request's
     end), time to first character and latency percentiles, errors (a failed request, or one
     that returned another number of characters);
  3. runs the shared-preamble level: --prefix-clients clients whose primes share a 2,000-character
     preamble and differ after it, on that server (prefix-state cache on), then on a second one
     started with --state-cache-mb 0 (cache off): time to first character with and without;
  4. stops the server (SIGINT, as Ctrl-C) and also runs the classic recipe's sampling loop
     (/work/shared/baselines/notebook_charrnn.py: one character at a time, numpy one-hot input,
     softmax, top-k, np.random.choice) in this process on the SAME function: the baseline's own
     CharRNN class holding our weights, its one-hot layer-0 input weights being ours multiplied by
     the embedding (checked: the logits agree). It runs with the replica's torch threads and with
     torch's default if that differs (reported beside the script's own rate).

Time to first character is measured at the client: from sending the request to the first streamed
chunk, which the server sends as soon as the first character is sampled (then every 32 characters
or 0.25 s). The clients run on the same machine and share its cores.

  python bench/serve.py                           # the full run: 1, 8, 64 clients x 500 characters
  python bench/serve.py --levels 1,4 --chars 50   # a smoke run (1-2 minutes, mostly Ray start-up)
  python bench/serve.py --serve-args '--threads 2'  # any other `charrnn serve` options
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, installed or not

from deploy.client import CharRNNClient  # noqa: E402
from deploy.source import resolve  # noqa: E402
from models import CharRNN, ModelConfig, load_model, save_model  # noqa: E402
from pipeline.text.vocab import UNKNOWN_CHAR, Vocabulary  # noqa: E402
from train import foreign_cores, machine  # noqa: E402  (bench/train.py, beside this file)

BASELINE = Path("/work/shared/baselines/notebook_charrnn.py")
CORPUS = Path("/work/shared/data/anna.txt")
PRIME, TOP_K = "The", 5  # the classic recipe's sampling settings


# ---------------------------------------------------------------------------------------- the model

def seed_model(folder: Path) -> None:
    """The classic recipe's network (2x512 LSTM, one-hot-wide input) with random weights, saved."""
    text = CORPUS.read_text(encoding="utf-8")
    vocab = Vocabulary.from_counts(Counter(map(ord, text)))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab.size, layers=2, hidden=512)
    save_model(CharRNN(config), config, vocab.to_json(), folder, info={"weights": "random (torch seed 0)"})


# ---------------------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: str, port: int, num_cpus: int, extra: list[str], log: Path,
                 timeout_s: float) -> subprocess.Popen:
    """`charrnn serve` in its own session, once GET /healthz answers. Run as `python -m charrnn` from
    the repository, as bench/train.py and the tests do: it needs no working console script."""
    cmd = [sys.executable, "-m", "charrnn", "serve", "--model", folder, "--port", str(port),
           "--num-cpus", str(num_cpus), *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return proc
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.5)
    why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not healthy after {timeout_s:.0f} s"
    stop_server(proc)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise SystemExit(f"{' '.join(cmd)}: {why}:\n{tail}")


def stop_server(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """Ctrl-C, as a user would (the CLI shuts Serve and its local Ray down); the session it leads
    is killed only if that hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------- the clients

def one_request(client: CharRNNClient, chars: int, seed: int, prime: str = PRIME) -> dict:
    """Stream one generation; the client-side timings, or the error."""
    start = time.perf_counter()
    first, received = None, 0
    try:
        for chunk in client.stream(prime, max_chars=chars, top_k=TOP_K, seed=seed):
            first = first or time.perf_counter()
            received += len(chunk)
        if received != chars or client.last is None:
            raise RuntimeError(f"got {received} of {chars} characters (final event: {client.last})")
    except Exception as err:  # noqa: BLE001 - every failure is a benchmark error, counted and shown
        return {"chars": received, "error": f"{type(err).__name__}: {err}"[:300]}
    return {"chars": received, "ttfc_s": first - start, "latency_s": time.perf_counter() - start}


def run_level(url: str, clients: int, rounds: int, chars: int, first_seed: int, prime_of=lambda n: PRIME) -> dict:
    """`clients` threads started together, each making `rounds` requests in turn on its own connection;
    request n (from 0) primes with prime_of(n)."""
    start_line = threading.Barrier(clients + 1)

    def client_thread(index: int) -> list[dict]:
        client = CharRNNClient(url, timeout=600)
        start_line.wait()
        return [one_request(client, chars, first_seed + index * rounds + r, prime_of(index * rounds + r))
                for r in range(rounds)]

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_thread, i) for i in range(clients)]
        start_line.wait()
        start = time.perf_counter()
        results = [r for f in futures for r in f.result()]
        wall = time.perf_counter() - start
    good = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    total = sum(r["chars"] for r in results)
    return {"clients": clients, "requests": len(results), "chars_per_request": chars, "total_chars": total,
            "wall_s": round(wall, 3), "chars_per_s": round(total / wall, 1),
            "ttfc_ms": percentiles([1e3 * r["ttfc_s"] for r in good]),
            "latency_s": percentiles([r["latency_s"] for r in good]),
            "errors": len(errors), "error_messages": list(dict.fromkeys(errors))[:5]}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3)}


def decoder_counts(url: str) -> tuple[int, int, float, float]:
    """(batched steps, characters, seconds in steps, of which on a core) the replica that answers
    has decoded so far."""
    decoder = requests.get(f"{url}/v1/stats", timeout=30).json()["decoder"]
    steps = decoder["steps"]
    return steps, decoder["chars"], decoder["mean_step_ms"] * steps / 1e3, decoder["mean_step_cpu_ms"] * steps / 1e3


def network_step_ms(model: CharRNN, rows: int, threads: int, repeats: int = 200) -> dict:
    """Milliseconds of one network step for `rows` sequences on an otherwise idle process: through
    nn.LSTM's sequence path (`model(ids[:, None])`) and through `model.step`, which the decoder uses."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    ids = torch.randint(model.config.vocab_size, (rows,), generator=torch.Generator().manual_seed(0))
    state = model.init_state(rows)
    ways = {"sequence_path_ms": lambda: model(ids[:, None], state), "step_ms": lambda: model.step(ids, state)}
    out = {}
    try:
        with torch.inference_mode():
            for name, way in ways.items():
                for _ in range(10):
                    way()
                t = time.perf_counter()
                for _ in range(repeats):
                    way()
                out[name] = round(1e3 * (time.perf_counter() - t) / repeats, 2)
    finally:
        torch.set_num_threads(saved_threads)
    return {"rows": rows, "torch_threads": threads, **out}


def shared_preamble_level(url: str, args) -> dict:
    """--prefix-clients clients, --prefix-rounds requests each, whose primes are the same
    --preamble-chars characters of anna.txt followed by 40 characters of their own (from further on
    in the book), each generating --prefix-chars: what the prefix-state cache is for."""
    text = CORPUS.read_text(encoding="utf-8")
    preamble = text[:args.preamble_chars]
    tails = text[args.preamble_chars:]

    def prime_of(n: int) -> str:
        return preamble + tails[97 * n: 97 * n + 40]
    before = requests.get(f"{url}/v1/stats", timeout=30).json()["decoder"]
    level = run_level(url, args.prefix_clients, args.prefix_rounds, args.prefix_chars, 10_000, prime_of)
    after = requests.get(f"{url}/v1/stats", timeout=30).json()["decoder"]
    level["prime_chars_run"] = after["prime_chars"] - before["prime_chars"]
    level["prime_chars_asked"] = sum(len(prime_of(n)) for n in range(args.prefix_clients * args.prefix_rounds))
    level["state_cache"] = after["state_cache"]
    return level


def classic_script_rate(args) -> dict:
    """The classic script itself, unchanged, in a fresh process on the idle machine, as a user runs
    it (`--steps 1 --sample-chars N`): its own `sample_chars_per_s`, best of --classic-repeats."""
    cmd = [sys.executable, str(BASELINE), "--corpus", str(CORPUS), "--hidden", "512", "--layers", "2", "--steps", "1",
           "--sample-chars", str(args.classic_chars)]
    runs, busy = [], foreign_cores("the classic script", wait_s=60)
    for _ in range(args.classic_repeats):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        runs.append(round(json.loads(next(l for l in reversed(out.splitlines()) if l.startswith("{")))
                          ["sample_chars_per_s"], 1))
    return {"chars_per_s": max(runs), "runs": runs, "busy_cores_before": busy,
            "command": "python " + " ".join(shlex.quote(str(c)) for c in cmd[1:])}


# ---------------------------------------------------------------------------------------- the classic loop

def classic_network(model: CharRNN):
    """notebook_charrnn.py's own CharRNN computing the same function as `model`: a one-hot row
    through weight_ih equals that row's embedding through our weight_ih, so its layer-0 input
    weights are ours times the embedding's transpose; every other weight is copied as it is."""
    spec = importlib.util.spec_from_file_location("notebook_charrnn", BASELINE)
    classic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(classic)
    cfg = model.config
    net = classic.CharRNN(cfg.vocab_size, cfg.hidden, cfg.layers, cfg.dropout)
    ours = model.state_dict()
    weights = {f"lstm.{name[len('rnn.'):]}": value for name, value in ours.items() if name.startswith("rnn.")}
    weights["lstm.weight_ih_l0"] = ours["rnn.weight_ih_l0"] @ ours["embedding.weight"].T
    weights.update({"fc.weight": ours["head.weight"], "fc.bias": ours["head.bias"]})
    net.load_state_dict(weights)
    net.eval()
    # The proof that both compute one function: the same logits for a stretch of text.
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)[0].reshape(-1, cfg.vocab_size)
        got, _ = net(torch.from_numpy(classic.one_hot_encode(ids.numpy(), cfg.vocab_size)), net.init_hidden(1, "cpu"))
    difference = float((expected - got).abs().max())
    if difference > 1e-4:
        raise SystemExit(f"the classic network does not reproduce the model: logits differ by {difference}")
    return classic, net, difference


def classic_rate(classic, net, chars: tuple[str, ...], sample_chars: int, threads: int, seed: int) -> float:
    """Characters per second of notebook_charrnn.py's sampling loop, as it is written there (its
    `predict` lives inside main(), so it is repeated here line for line, on the CPU)."""
    char2int = {ch: i for i, ch in enumerate(chars)}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    np.random.seed(seed)

    def predict(ch, h):
        x = classic.one_hot_encode(np.array([[char2int[ch]]]), len(chars))
        with torch.no_grad():
            o, h = net(torch.from_numpy(x), h)
        p = F.softmax(o, dim=1).data.cpu()
        p, top = p.topk(TOP_K)
        top, p = top.numpy().squeeze(), p.numpy().squeeze()
        return chars[np.random.choice(top, p=p / p.sum())], h

    try:
        t = time.perf_counter()
        h = net.init_hidden(1, "cpu")
        for ch in PRIME:
            nxt, h = predict(ch, h)
        produced = [nxt]
        for _ in range(sample_chars - 1):
            nxt, h = predict(produced[-1], h)
            produced.append(nxt)
        return sample_chars / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(saved_threads)


# ---------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,8,64", help="concurrent clients per level (default 1,8,64)")
    ap.add_argument("--chars", type=int, default=500, help="characters per request (default 500)")
    ap.add_argument("--min-requests", type=int, default=8,
                    help="requests per level at least: small levels make several rounds (default 8)")
    ap.add_argument("--min-rounds", type=int, default=2,
                    help="requests each client makes one after the other, at least (default 2)")
    ap.add_argument("--model", help="a trained model or run folder (default: the seed-size model, random weights)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="`charrnn serve --num-cpus` (default: all)")
    ap.add_argument("--serve-args", default="", help="more `charrnn serve` options, e.g. '--threads 2'")
    ap.add_argument("--classic-repeats", type=int, default=3, help="runs of the classic loop per thread count")
    ap.add_argument("--seed", type=int, default=1, help="seed of the first request (default 1)")
    ap.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for the server")
    ap.add_argument("--classic-chars", type=int, default=1000, help="the classic script's --sample-chars (1000)")
    ap.add_argument("--prefix-clients", type=int, default=64,
                    help="the shared-preamble level's clients, with the cache on and off (default 64; 0: skip)")
    ap.add_argument("--prefix-rounds", type=int, default=4, help="requests per client there (default 4)")
    ap.add_argument("--preamble-chars", type=int, default=2000, help="the preamble they share (default 2000)")
    ap.add_argument("--prefix-chars", type=int, default=50, help="characters each of them generates (default 50)")
    args = ap.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    started, load_before = time.perf_counter(), os.getloadavg()
    script = classic_script_rate(args)  # first, on the idle machine

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = resolve(args.model) if args.model else str(Path(tmp) / "model")
        if not args.model:
            seed_model(Path(folder))
        model, config, vocab_json, _ = load_model(folder)
        log = Path(tmp) / "serve.log"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        server = start_server(folder, port, args.num_cpus, shlex.split(args.serve_args), log, args.startup_timeout)
        try:
            startup_s = time.perf_counter() - t0
            warmup = one_request(CharRNNClient(url), args.chars, args.seed - 1)
            if "error" in warmup:
                raise SystemExit(f"the warm-up request failed: {warmup['error']}")
            stats = requests.get(f"{url}/v1/stats", timeout=30).json()
            results, next_seed = [], args.seed
            for clients in levels:
                before = decoder_counts(url)
                rounds = max(args.min_rounds, math.ceil(args.min_requests / clients))
                level = run_level(url, clients, rounds, args.chars, next_seed)
                steps, chars, busy, on_core = (after - then for then, after in zip(before, decoder_counts(url)))
                level["decoder_mean_batch"] = round(chars / max(steps, 1), 1)
                level["decoder_mean_step_ms"] = round(1e3 * busy / max(steps, 1), 2)
                level["decoder_mean_step_cpu_ms"] = round(1e3 * on_core / max(steps, 1), 2)
                level["decoder_busy_fraction"] = round(busy / level["wall_s"], 2)
                results.append(level)
                next_seed += clients * rounds
            prefix = {"cache_on": shared_preamble_level(url, args)} if args.prefix_clients else {}
        finally:
            stop_server(server)
        if args.prefix_clients:  # the same level on a server without the cache
            server = start_server(folder, port, args.num_cpus, [*shlex.split(args.serve_args), "--state-cache-mb", "0"],
                                  log, args.startup_timeout)
            try:
                prefix["cache_off"] = shared_preamble_level(url, args)
            finally:
                stop_server(server)

    # Only now, so that none of the server's processes competes with the classic loop.
    classic, net, logit_difference = classic_network(model)
    table = tuple(vocab_json["chars"]) + (UNKNOWN_CHAR,)  # id -> character for every id, unknown last
    thread_counts = sorted({stats["threads"], torch.get_num_threads()})
    classic_runs = {str(n): [round(classic_rate(classic, net, table, args.chars, n, args.seed + r), 1)
                             for r in range(args.classic_repeats)] for n in thread_counts}
    classic_best = max(max(runs) for runs in classic_runs.values())
    network_step = network_step_ms(model.eval(), max(levels), stats["threads"])
    for level in results:
        level["ratio_vs_classic_script"] = round(level["chars_per_s"] / script["chars_per_s"], 2)
        level["ratio_vs_classic_in_process"] = round(level["chars_per_s"] / classic_best, 2)
    errors = sum(level["errors"] for level in results) + sum(level["errors"] for level in prefix.values())
    at_64 = next((level for level in results if level["clients"] == 64), None)
    if prefix:
        on, off = prefix["cache_on"]["ttfc_ms"]["p50"], prefix["cache_off"]["ttfc_ms"]["p50"]
        prefix["ttfc_p50_off_over_on"] = round(off / on, 2) if on and off else None

    print(json.dumps({
        "command": " ".join(["python", "bench/serve.py", *sys.argv[1:]]),
        "machine": {**machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": importlib.metadata.version("ray"),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "model": {"folder": args.model or "seed-size, random weights", **config.to_json(),
                  "params": sum(p.numel() for p in model.parameters())},
        "server": {"command": f"charrnn serve --model FOLDER --num-cpus {args.num_cpus} {args.serve_args}".strip(),
                   "startup_s": round(startup_s, 1), "replica_threads": stats["threads"], "limits": stats["limits"],
                   "min_step_batch": stats["decoder"]["min_step_batch"]},
        "classic_script": script,
        "classic_in_process": {"chars_per_s": classic_best, "runs_by_torch_threads": classic_runs,
                               "sample_chars": args.chars, "max_logit_difference_vs_model": logit_difference,
                               "weights": "the served model's, converted to the baseline's one-hot CharRNN"},
        "levels": results,
        "shared_preamble": prefix,
        "network_step": network_step,
        "ratio_64_vs_classic_script": at_64["ratio_vs_classic_script"] if at_64 else None,
        "errors": errors,
        "target_met": bool(at_64 and at_64["ratio_vs_classic_script"] >= 30 and errors == 0
                           and at_64["ttfc_ms"]["p99"] is not None and at_64["ttfc_ms"]["p99"] < 1000
                           and (not prefix or (prefix["ttfc_p50_off_over_on"] or 0) >= 5)),
        "notes": ["chars_per_s: characters received by all clients / wall time of the level",
                  "ttfc_ms: request sent -> first streamed chunk (sent with the first character)",
                  "classic_script: notebook_charrnn.py itself, unchanged, in a fresh process before the server "
                  "started, its own sample_chars_per_s, best of --classic-repeats: the rate every target is "
                  "taken against",
                  "classic_in_process: the same loop in this process after the server stopped, at the replica's "
                  "torch threads or torch's default (the faster), timed as notebook_charrnn.py times it",
                  "shared_preamble: clients whose primes share --preamble-chars characters, on the server with "
                  "its prefix-state cache (cache_on) and on one started with --state-cache-mb 0 (cache_off)",
                  "decoder_mean_batch, decoder_mean_step_ms: rows per batched step and milliseconds per step "
                  "(sampling included) during the level, from /v1/stats; decoder_mean_step_cpu_ms: of that, the "
                  "step thread's CPU time (the rest it waited for a core or the GIL); decoder_busy_fraction: "
                  "the step thread's time in steps / the level's wall time",
                  "network_step: one network step for as many rows as the largest level, in this process "
                  "after the server stopped, through nn.LSTM's sequence path and through model.step"],
        "total_wall_s": round(time.perf_counter() - started, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
