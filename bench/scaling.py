#!/usr/bin/env python3
"""Scaling benchmark: `charrnn train` throughput against --workers and `charrnn serve` throughput
against --replicas, each beside the figure for 1 as a ratio.

Prints one JSON object (also when a step fails: what was measured, and `incomplete`; exit 1):
  1. prepares the corpus once (`charrnn prepare CORPUS --out WORK/data`; default anna.txt);
  2. for each N of --workers (default 1,2; 1,2,4 with >= 4 cores) runs `python -m charrnn train
     --data WORK/data --workers N --batch B --num-cpus C ...` as a user would, with no progress line,
     evaluation or checkpoint inside the timed steps. Strong scaling: the global batch B is fixed
     (default 64; each worker walks B/N streams; --weak makes it B*N). The driver gives each worker
     C/N torch threads, so every N uses the same cores. Rank 0 appends one record per step to
     RUN/metrics.jsonl and DDP keeps the ranks in lockstep, so each record is stamped as it appears
     (polled every 10 ms): chars_per_s = timed steps x B x seq / wall time from the end of the last
     warm-up step to the end of the last timed step; data feeding and every all-reduce count. One
     more, untimed step holds the final validation and checkpoint. rank0_step_chars_per_s is over
     the same steps from the records' own chars_per_s (time inside train_step on rank 0: forward,
     backward with DDP's gradient all-reduce, optimizer); a gap between the two is time outside it;
  3. for each R of --replicas (default as for --workers) starts `charrnn serve --replicas R
     --num-cpus max(C, R)` (by default one CPU and one torch thread per replica), sends 2R warm-up
     requests at once, then runs --serve-clients client threads at once, each streaming --serve-rounds
     requests of --serve-chars characters (bench/serve.py's clients: prime "The", top_k 5):
     chars_per_s = all characters received / wall time; errors counted as bench/serve.py does. The
     model is bench/serve.py's seed-size one (2x512 LSTM, random weights) unless --serve-model.

Clients, Ray and every worker or replica share this one machine. On 2 cores one training worker
already runs 2 threads, so 2 workers add no compute, only DDP's costs: expect a ratio near or
below 1. A replica decodes on one thread, so a second one takes the core the clients and the HTTP
proxy otherwise have: below 2x. loadavg_1m_before of each run shows whether other load disturbed it.

  python bench/scaling.py        # the full run; estimated 5-10 min on 2 idle cores (not yet timed idle)
  python bench/scaling.py --train-steps 10 --train-warmup 2 --hidden 64 --serve-chars 30 --serve-clients 4
                                 # smoke run: ~4 min on 2 idle cores, mostly Ray start-ups
  python bench/scaling.py --workers 1,2,4,8 --replicas 1,2,4,8 --train-args=--gpu --serve-args=--gpu
                                 # on one 8-GPU node (one GPU per worker and per replica)
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bs = _bench_module("serve")  # its server, client and model helpers, reused
bt = _bench_module("train")  # its metrics.jsonl reader, reused

BIG = 10**9
DEFAULT_COUNTS = "1,2,4" if (os.cpu_count() or 1) >= 4 else "1,2"


def counts(text: str) -> list[int]:
    got = sorted({int(n) for n in text.split(",") if n.strip()})
    return got if 1 in got else [1, *got]  # every ratio is taken against 1


def ratios(results: dict) -> None:
    base = results["1"]["chars_per_s"]
    for n, r in results.items():
        r["ratio_vs_1"] = round(r["chars_per_s"] / base, 2) if base else None
        r["efficiency"] = round(r["ratio_vs_1"] / int(n), 2) if base else None  # ratio per worker/replica


def say(message: str) -> None:
    print(f"[scaling] {message}", file=sys.stderr, flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def tail_of(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").strip().splitlines()[-30:])


def run(cmd: list[str], log: Path, timeout_s: float, poll=lambda: None) -> float:
    """Run `cmd` (own session, output in `log`), calling poll() every 10 ms; its wall seconds. On
    failure, timeout or interruption it is stopped: Ctrl-C (charrnn stops its Ray), then SIGKILL to
    the process group it leads after 60 s."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        while proc.poll() is None and time.time() - started < timeout_s:
            poll()
            time.sleep(0.01)
    finally:
        bs.stop_server(proc)
    poll()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}"
                         f"{' (timed out)' if time.time() - started >= timeout_s else ''}:\n{tail_of(log)}")
    return time.time() - started


# ------------------------------------------------------------------------------------------ training

def train_one(n: int, data: Path, args) -> dict:
    batch = args.batch * n if args.weak else args.batch
    out = args.work / f"run-w{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "charrnn", "train", "--data", str(data), "--out", str(out), "--workers", str(n),
           "--layers", str(args.layers), "--hidden", str(args.hidden), "--batch", str(batch), "--seq", str(args.seq),
           "--max-steps", str(args.train_warmup + args.train_steps + 1), "--val-every", str(BIG),
           "--val-max-tokens", "100", "--checkpoint-every", str(BIG), "--log-every", str(BIG),
           "--num-cpus", str(args.num_cpus), *shlex.split(args.train_args)]
    tail, before, launched = bt.MetricsTail(out / "metrics.jsonl"), load1(), time.time()
    wall = run(cmd, args.work / f"train-w{n}.log", args.timeout, tail)
    w, last, tokens = args.train_warmup, args.train_warmup + args.train_steps - 1, batch * args.seq
    if len(tail.steps) <= last:
        raise SystemExit(f"charrnn train --workers {n}: {len(tail.steps)} step records, needed {last + 1}")
    first_end, last_end = tail.steps[w - 1], tail.steps[last]
    # A record's chars_per_s is step x tokens / rank 0's train_step seconds so far (one session).
    compute = [r["step"] * tokens / r["chars_per_s"] for r in (first_end, last_end)]
    return {"chars_per_s": round(args.train_steps * tokens / (last_end["seen"] - first_end["seen"])),
            "rank0_step_chars_per_s": round(args.train_steps * tokens / (compute[1] - compute[0])),
            "global_batch": batch, "batch_per_worker": batch // n, "threads_per_worker": max(1, args.num_cpus // n),
            "startup_s": round(tail.steps[0]["seen"] - launched, 1), "process_s": round(wall, 1),
            "loadavg_1m_before": before, "cmd": " ".join(["python", *cmd[1:]]).replace(str(args.work), "WORK")}


# ------------------------------------------------------------------------------------------- serving

def serve_one(r: int, folder: str, args) -> dict:
    port, log, before = bs.free_port(), args.work / f"serve-r{r}.log", load1()
    extra = ["--replicas", str(r), *shlex.split(args.serve_args)]
    t0 = time.perf_counter()
    server = bs.start_server(folder, port, max(args.num_cpus, r), extra, log, args.timeout)
    try:
        startup = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}"
        warmup = bs.run_level(url, 2 * r, 1, args.serve_chars, 10**6)  # concurrent: every replica gets some
        if warmup["errors"]:
            raise SystemExit(f"--replicas {r}: warm-up requests failed: {warmup['error_messages']}")
        level = bs.run_level(url, args.serve_clients, args.serve_rounds, args.serve_chars, 1)
    finally:
        bs.stop_server(server)
    return {"chars_per_s": level["chars_per_s"], "errors": level["errors"],
            "error_messages": level["error_messages"], "requests": level["requests"], "wall_s": level["wall_s"],
            "ttfc_ms": level["ttfc_ms"], "latency_s": level["latency_s"], "startup_s": round(startup, 1),
            "loadavg_1m_before": before,
            "cmd": f"python -m charrnn serve --model MODEL --port PORT --num-cpus {max(args.num_cpus, r)} "
                   + " ".join(extra)}


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--workers", default=DEFAULT_COUNTS, help="training worker counts (default %(default)s); '' skips training")
    add("--replicas", default=DEFAULT_COUNTS, help="serving replica counts (default %(default)s); '' skips serving")
    add("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of each command's local Ray (default all)")
    add("--corpus", type=Path, default=bs.CORPUS, help="training text (default %(default)s)")
    add("--work", type=Path, help="folder for the dataset, runs and logs, kept (default: a temporary one); "
                                  "a dataset already in WORK/data is reused")
    add("--layers", type=int, default=2, help="training model layers (default %(default)s)")
    add("--hidden", type=int, default=256, help="training model units per layer (default %(default)s)")
    add("--batch", type=int, default=64, help="GLOBAL training batch, fixed over worker counts (default %(default)s)")
    add("--weak", action="store_true", help="weak scaling: global batch = --batch x workers")
    add("--seq", type=int, default=100, help="training window (default %(default)s)")
    add("--train-warmup", type=int, default=5, help="untimed first steps (default %(default)s)")
    add("--train-steps", type=int, default=40, help="timed steps (default %(default)s)")
    add("--train-args", default="", help="more `charrnn train` options")
    add("--serve-model", help="a trained model or run folder (default: bench/serve.py's seed-size model, random)")
    add("--serve-clients", type=int, default=32, help="concurrent streaming clients (default %(default)s)")
    add("--serve-rounds", type=int, default=2, help="requests each client makes in turn (default %(default)s)")
    add("--serve-chars", type=int, default=300, help="characters per request (default %(default)s)")
    add("--serve-args", default="", help="more `charrnn serve` options, e.g. '--cpus-per-replica 2'")
    add("--timeout", type=float, default=900, help="seconds allowed for each command or server start")
    args = ap.parse_args()
    if args.train_warmup < 1 or args.train_steps < 1:
        ap.error("--train-warmup and --train-steps must be >= 1 (the timing starts at the end of a warm-up step)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally clauses stop what runs
    started, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-scaling-")
    args.work = (args.work or Path(tmp.name)).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": " ".join(["python", "bench/scaling.py", *sys.argv[1:]]), "machine": {}}
    failed = None
    try:
        if args.workers:
            workers: dict = {}
            report["training"] = {
                "corpus": str(args.corpus), "model": f"lstm {args.layers}x{args.hidden}", "seq": args.seq,
                "scaling": "weak: global batch = --batch x workers" if args.weak
                           else f"strong: global batch {args.batch} split over the workers",
                "warmup_steps": args.train_warmup, "timed_steps": args.train_steps, "workers": workers}
            data = args.work / "data"
            if not (data / "manifest.json").exists():
                run([sys.executable, "-m", "charrnn", "prepare", str(args.corpus), "--out", str(data),
                     "--num-cpus", str(args.num_cpus)], args.work / "prepare.log", args.timeout)
            for n in counts(args.workers):
                say(f"train --workers {n} ...")
                workers[str(n)] = train_one(n, data, args)
                say(f"train --workers {n}: {workers[str(n)]['chars_per_s']:,} chars/s")
            ratios(workers)
        if args.replicas:
            replicas: dict = {}
            report["serving"] = {
                "model": args.serve_model or "seed-size 2x512 LSTM, random weights (bench/serve.py)",
                "clients": args.serve_clients, "requests_per_client": args.serve_rounds,
                "chars_per_request": args.serve_chars, "replicas": replicas}
            folder = bs.resolve(args.serve_model) if args.serve_model else str(args.work / "serve-model")
            if not args.serve_model:
                bs.seed_model(Path(folder))
            for r in counts(args.replicas):
                say(f"serve --replicas {r} ...")
                replicas[str(r)] = serve_one(r, folder, args)
                say(f"serve --replicas {r}: {replicas[str(r)]['chars_per_s']:,} chars/s")
            ratios(replicas)
    except (SystemExit, KeyboardInterrupt) as err:  # still print what was measured, then fail
        failed = err
        report["incomplete"] = (str(err.code) if isinstance(err, SystemExit) else "interrupted")[-3000:]
    finally:
        if tmp:
            tmp.cleanup()
    report["machine"].update({"cpu": bs._cpu_model(), "cores": os.cpu_count(), "num_cpus": args.num_cpus,
                              "python": platform.python_version(), "torch": importlib.metadata.version("torch"),
                              "ray": importlib.metadata.version("ray"), "loadavg_before": load_before,
                              "loadavg_after": [round(x, 2) for x in os.getloadavg()]})
    report["notes"] = [
        "training chars_per_s: timed steps x global batch x seq / wall time between rank 0's metrics records "
        "of the last warm-up step and the last timed step (all ranks step in lockstep)",
        "rank0_step_chars_per_s: the same steps timed inside train_step on rank 0 (metrics.jsonl's chars_per_s)",
        "serving chars_per_s: characters received by all clients / wall time from their common start",
        "ratio_vs_1: chars_per_s / that with 1 worker or replica; efficiency: ratio_vs_1 / count",
        "clients, Ray and every worker or replica share this machine's cores"]
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
