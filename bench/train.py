#!/usr/bin/env python3
"""Training benchmark: `charrnn train` characters per second against the classic recipe and a bare loop.

Prints one JSON object. For each model configuration (default: the seed 2x512, batch 128 and a small
2x128, batch 32; seq 100 for both) it runs, one after the other on the same machine:

  baseline  /work/shared/baselines/notebook_charrnn.py (the classic single-process recipe: one-hot
            input, dict-encoded text) in a subprocess; its own `train_chars_per_s` (it skips 3 steps)
  bare      the limit for the stack: models.CharRNN and training.step.train_step over windows from
            training.windows, fed from the prepared runs held in memory; no Ray (a subprocess of this
            script, so that nothing of the other runs lingers in it)
  stack     `charrnn train --data DS ...` as a user runs it: local Ray, Ray Train TorchTrainer with one
            worker streaming the prepared dataset with Ray Data

All three count batch x seq characters per step and skip warm-up steps. For the bare loop and the
stack two figures are given: `chars_per_s` from the wall time between the ends of consecutive steps
(data feeding, metrics and everything else included: the headline figure) and `compute_chars_per_s`
from the time around train_step alone (the stack's own `chars_per_s` measure, which the classic
script's figure also resembles). The stack's per-step times come from RUN/metrics.jsonl: the
records' cumulative `chars_per_s` gives each step's train_step time, and this script stamps each
record as it appears in the file (polled every 10 ms) for the wall time.

CPU use is sampled from /proc for every process each run started: `cores` is the CPU time of the
process that trains, divided by wall time; `busy_threads` the threads of it that did at least a
quarter of the busiest thread's work; `ray_other_cores` the rest of the stack's process tree (Ray's
GCS, raylet, Train controller, Data tasks, ...); `foreign_cores` what the rest of the machine used
meanwhile (other users: if this is not ~0 the figures are disturbed, see --quiet-wait).

  python bench/train.py                          # both configurations, ~10 min on 2 cores
  python bench/train.py --configs small --small-steps 100
  python bench/train.py --quality-minutes 10     # + validation loss after equal training time

--quality-minutes M trains the seed configuration for M minutes of training time with the baseline
(`--minutes M`) and with the stack (stopped after M minutes of train_step time), one after the other,
and evaluates both models on the same held-out text: the validation runs of the prepared dataset
that lie inside the baseline's held-out last 10% of the corpus (neither model trained on them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = Path("/work/shared/baselines/notebook_charrnn.py")
CORPUS = Path("/work/shared/data/anna.txt")
HZ = os.sysconf("SC_CLK_TCK")
CONFIGS = {"seed": dict(hidden=512, layers=2, batch=128, seq=100),
           "small": dict(hidden=128, layers=2, batch=32, seq=100)}
BIG = 10**9


# ------------------------------------------------------------------------------------ /proc sampling

def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = list(map(int, f.readline().split()[1:]))
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _stat(pid) -> tuple[int, int] | None:
    """(ppid, utime + stime) of a process or thread, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Samples, every `interval` s, the CPU time of every process under `root` (and of each thread of
    the training process, once known), and the machine's busy time."""

    def __init__(self, root: int, interval: float = 0.5, trainer_match: str | None = None):
        super().__init__(daemon=True)
        self.root, self.interval, self.trainer_match = root, interval, trainer_match
        self.trainer = root if trainer_match is None else None
        self.samples: list[dict] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> "Sampler":
        self._halt.set()
        self.join()
        return self

    def sample(self) -> None:
        t = time.time()
        busy, total = _machine_jiffies()
        parents, cpu = {}, {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                s = _stat(name)
                if s:
                    parents[int(name)], cpu[int(name)] = s
        tree, frontier = {self.root}, [self.root]
        while frontier:
            p = frontier.pop()
            kids = [c for c, pp in parents.items() if pp == p and c not in tree]
            tree.update(kids)
            frontier.extend(kids)
        if self.trainer is None:
            self.trainer = next((p for p in tree if self.trainer_match in _cmdline(p)), None)
        threads = {}
        if self.trainer is not None:
            try:
                for tid in os.listdir(f"/proc/{self.trainer}/task"):
                    s = _stat(f"{self.trainer}/task/{tid}")
                    if s:
                        threads[int(tid)] = s[1]
            except OSError:
                pass
        self.samples.append({"t": t, "busy": busy, "total": total, "tree": {p: cpu[p] for p in tree if p in cpu},
                             "threads": threads})

    def report(self, t0: float | None = None, t1: float | None = None) -> dict:
        """CPU use between the samples nearest to wall-clock times t0 and t1 (default: all)."""
        samples = [s for s in self.samples if s["threads"] or self.trainer is None] or self.samples
        if len(samples) < 2:
            return {}
        a = min(samples, key=lambda s: abs(s["t"] - t0)) if t0 else samples[0]
        b = min(samples, key=lambda s: abs(s["t"] - t1)) if t1 else samples[-1]
        if b["t"] - a["t"] < 1e-3:
            return {}
        seconds = b["t"] - a["t"]
        delta = lambda d0, d1: sum(max(0, v - d0.get(k, 0)) for k, v in d1.items())
        tree = delta(a["tree"], b["tree"]) / HZ / seconds
        trainer = ((b["tree"].get(self.trainer, 0) - a["tree"].get(self.trainer, 0)) / HZ / seconds
                   if self.trainer else 0.0)
        machine = (b["busy"] - a["busy"]) / max(1, b["total"] - a["total"]) * os.cpu_count()
        per_thread = [max(0, v - a["threads"].get(k, 0)) for k, v in b["threads"].items()]
        top = max(per_thread, default=0)
        out = {"cores": round(trainer, 2), "busy_threads": sum(1 for v in per_thread if top and v >= top / 4),
               "foreign_cores": round(max(0.0, machine - tree), 2), "sampled_s": round(seconds, 1)}
        if self.trainer != self.root:
            out["ray_other_cores"] = round(tree - trainer, 2)
        return out


def wait_quiet(limit_s: float, threshold: float = 0.15) -> float:
    """Wait until the machine is nearly idle (at most `limit_s`); returns the busy cores last seen."""
    deadline = time.time() + limit_s
    while True:
        b0, t0 = _machine_jiffies()
        time.sleep(2)
        b1, t1 = _machine_jiffies()
        busy = (b1 - b0) / max(1, t1 - t0) * os.cpu_count()
        if busy < threshold or time.time() > deadline:
            return round(busy, 2)


def run_sampled(cmd: list[str], trainer_match: str | None = None, on_poll=None, timeout: float = 3600,
                env: dict | None = None) -> tuple[subprocess.CompletedProcess, Sampler, float]:
    """Run `cmd`, sampling its process tree; `on_poll()` is called every 10 ms while it runs."""
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env or dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    sampler = Sampler(proc.pid, trainer_match=trainer_match)
    sampler.start()
    out, err = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    while proc.poll() is None:
        if on_poll:
            on_poll()
        if time.time() - started > timeout:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the process this script started
        time.sleep(0.01)
    if on_poll:
        on_poll()
    for r in readers:
        r.join()
    sampler.stop()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(err)), sampler, time.time() - started


def _fail(what: str, result: subprocess.CompletedProcess) -> None:
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
    raise SystemExit(f"{what} failed (exit {result.returncode}):\n{tail}")


# ----------------------------------------------------------------------------------------- the runs

def run_baseline(cfg: dict, steps: int, corpus: Path, threads: int) -> dict:
    cmd = [sys.executable, str(BASELINE), "--corpus", str(corpus), "--hidden", str(cfg["hidden"]),
           "--layers", str(cfg["layers"]), "--batch", str(cfg["batch"]), "--seq", str(cfg["seq"]),
           "--steps", str(steps + 3), "--sample-chars", "0"]  # the script times all but its first 3 steps
    if threads:
        cmd += ["--threads", str(threads)]
    result, sampler, wall = run_sampled(cmd)
    if result.returncode:
        _fail("baseline", result)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    return {"chars_per_s": round(got["train_chars_per_s"]), "threads": got["threads"], "timed_steps": steps,
            "warmup_steps": 3, "train_loss": round(got["train_loss"], 4), "process_s": round(wall, 1),
            "cpu": sampler.report(), "cmd": " ".join(cmd[1:])}


def _steady(ends: list[float], compute: list[float], warmup: int, tokens: int) -> dict:
    """Figures over the steps after `warmup`: ends[i] is when step i+1 ended (wall clock), compute[i]
    its train_step time."""
    n = len(ends) - warmup
    if n < 2:
        raise SystemExit(f"too few steps after {warmup} warm-up steps: {len(ends)}")
    wall = ends[-1] - ends[warmup - 1] if warmup else ends[-1] - ends[0]
    steps = n if warmup else n - 1
    gaps = sorted(b - a for a, b in zip(ends[max(0, warmup - 1):], ends[max(1, warmup):]))
    comp = compute[warmup:]
    return {"chars_per_s": round(steps * tokens / wall), "compute_chars_per_s": round(len(comp) * tokens / sum(comp)),
            "step_s_median": round(gaps[len(gaps) // 2], 4), "step_s_max": round(gaps[-1], 4),
            "timed_steps": steps, "warmup_steps": warmup}


def run_bare(cfg: dict, steps: int, warmup: int, data: Path, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-loop",
           json.dumps({"cfg": cfg, "steps": steps + warmup, "data": str(data), "threads": threads})]
    result, sampler, wall = run_sampled(cmd)
    if result.returncode:
        _fail("bare loop", result)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    out = _steady(got["ends"], got["compute"], warmup, cfg["batch"] * cfg["seq"])
    out.update(threads=got["threads"], train_loss=round(got["loss"], 4), process_s=round(wall, 1),
               cpu=sampler.report(got["ends"][warmup - 1] if warmup else None, got["ends"][-1]))
    return out


def bare_loop(job: dict) -> None:
    """The limit for the stack: what its worker does per step, minus Ray (child process mode)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from models import CharRNN, ModelConfig
    from pipeline import PreparedDataset
    from training.step import make_optimizer, train_step
    from training.windows import EpochStream, windows

    cfg = job["cfg"]
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    dataset = PreparedDataset(job["data"])
    runs = [np.array(r) for r in dataset.iter_runs("train")]  # in memory, in the stack's order
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=dataset.manifest["vocab"]["size"], layers=cfg["layers"],
                                hidden=cfg["hidden"]))
    optimizer, scheduler = make_optimizer(model, 1e-3, "constant", job["steps"])
    device = torch.device("cpu")
    state = model.init_state(cfg["batch"])
    ends, compute, loss = [], [], None
    for window in windows(EpochStream(lambda epoch: runs), cfg["batch"], cfg["seq"]):
        started = time.perf_counter()
        loss, grad_norm, state = train_step(model, optimizer, scheduler, window, state, 5.0, device)
        loss, grad_norm = float(loss), float(grad_norm)  # the worker reads both every step
        compute.append(time.perf_counter() - started)
        ends.append(time.time())
        if len(ends) == job["steps"]:
            break
    print(json.dumps({"ends": ends, "compute": compute, "loss": loss, "threads": torch.get_num_threads()}))


class MetricsTail:
    """Reads RUN/metrics.jsonl as it grows and stamps each record with the time it was seen."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial, self.records = path, 0, b"", []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        if not chunk:
            return
        now = time.time()
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        self.records += [dict(json.loads(line), _seen=now) for line in lines if line.strip()]


def stack_cmd(data: Path, out: Path, cfg: dict, steps: int, num_cpus: int, threads: int,
              extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "charrnn", "train", "--data", str(data), "--out", str(out),
           "--hidden", str(cfg["hidden"]), "--layers", str(cfg["layers"]), "--batch", str(cfg["batch"]),
           "--seq", str(cfg["seq"]), "--max-steps", str(steps), "--val-every", str(BIG),
           "--checkpoint-every", str(BIG), "--log-every", str(BIG), "--val-max-tokens", "100",
           "--num-cpus", str(num_cpus), *extra]
    if threads:
        cmd += ["--threads-per-worker", str(threads)]
    return cmd


def run_stack(cfg: dict, steps: int, warmup: int, data: Path, work: Path, num_cpus: int, threads: int) -> dict:
    out = work / f"run-{cfg['hidden']}x{cfg['layers']}-b{cfg['batch']}"
    shutil.rmtree(out, ignore_errors=True)
    tail = MetricsTail(out / "metrics.jsonl")
    cmd = stack_cmd(data, out, cfg, steps + warmup, num_cpus, threads)
    launched = time.time()
    result, sampler, wall = run_sampled(cmd, trainer_match="RayTrainWorker", on_poll=tail.poll)
    if result.returncode:
        _fail("charrnn train", result)
    steps_seen = [r for r in tail.records if "chars_per_s" in r]
    tokens = cfg["batch"] * cfg["seq"]
    # The worker's chars_per_s is k * tokens / (train_step seconds of steps 1..k): recover each step's.
    cumulative = [r["step"] * tokens / r["chars_per_s"] for r in steps_seen]
    compute = [b - a for a, b in zip([0.0] + cumulative, cumulative)]
    ends = [r.get("time", r["_seen"]) for r in steps_seen]
    res = _steady(ends, compute, warmup, tokens)
    res.update(threads=threads or num_cpus, train_loss=round(steps_seen[-1]["loss"], 4), process_s=round(wall, 1),
               # from launch to the end of step 1: Ray start-up, Train and Data set-up, the first step
               startup_s=round(ends[0] - launched, 1),
               cpu=sampler.report(ends[warmup - 1] if warmup else None, ends[-1]),
               cmd="charrnn " + " ".join(cmd[3:]))
    if not threads:
        res["threads_note"] = "driver default (node CPUs / workers); busy_threads shows what ran"
    return res


# --------------------------------------------------------------------------------------- quality

def quality(minutes: float, data: Path, corpus: Path, work: Path, num_cpus: int, threads: int) -> dict:
    """Validation loss after `minutes` of training time each (seed configuration), one after the other."""
    import numpy as np

    cfg = CONFIGS["seed"]
    out: dict = {"minutes": minutes, "config": cfg}
    # Baseline: it saves nothing, so it reports its own val loss (last 10% of the text); we also need
    # its model on our held-out text, so run a copy of its training that saves the weights: no, keep
    # the script as is, and compare on its own split and ours separately.
    cmd = [sys.executable, str(BASELINE), "--corpus", str(corpus), "--hidden", str(cfg["hidden"]),
           "--layers", str(cfg["layers"]), "--batch", str(cfg["batch"]), "--seq", str(cfg["seq"]),
           "--minutes", str(minutes), "--sample-chars", "0"] + (["--threads", str(threads)] if threads else [])
    result, _, wall = run_sampled(cmd)
    if result.returncode:
        _fail("baseline (quality)", result)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    out["baseline"] = {"steps": got["train_steps"], "val_loss": round(got["val_loss"], 4),
                       "train_loss": round(got["train_loss"], 4), "process_s": round(wall, 1),
                       "val_text": "the last 10% of the corpus"}
    out["stack"] = _stack_for_minutes(minutes, cfg, data, work, num_cpus, threads)
    out["stack"]["val_loss_on_baseline_split"] = _eval_on_text_tail(Path(out["stack"]["model"]), corpus)
    return out


def _stack_for_minutes(minutes: float, cfg: dict, data: Path, work: Path, num_cpus: int, threads: int) -> dict:
    """Train until `minutes` of train_step time have passed, then stop the run at a checkpoint."""
    run = work / "quality-run"
    shutil.rmtree(run, ignore_errors=True)
    tail = MetricsTail(run / "metrics.jsonl")
    tokens = cfg["batch"] * cfg["seq"]
    budget = minutes * 60
    cmd = stack_cmd(data, run, cfg, BIG, num_cpus, threads)
    cmd[cmd.index("--val-every") + 1] = str(BIG)
    state = {"proc": None}

    def poll():
        tail.poll()

    # The run cannot be told "stop at T seconds", so train with checkpoints every 25 steps and a
    # validation at each, then stop it after the budget and keep the last model folder written
    # before the budget ran out (its step's training time is at most the budget).
    cmd[cmd.index("--checkpoint-every") + 1] = "25"
    cmd[cmd.index("--val-every") + 1] = "25"
    cmd[cmd.index("--val-max-tokens") + 1] = str(BIG)
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    state["proc"] = proc
    log = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    train_s = 0.0
    while proc.poll() is None:
        poll()
        steps = [r for r in tail.records if "chars_per_s" in r]
        if steps:
            train_s = steps[-1]["step"] * tokens / steps[-1]["chars_per_s"]
        if train_s >= budget:
            os.killpg(proc.pid, signal.SIGINT)  # the CLI's own process group: ray.init children included
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            break
        time.sleep(0.5)
    poll()
    steps = [r for r in tail.records if "chars_per_s" in r]
    vals = [r for r in steps if r.get("val_loss") is not None
            and r["step"] * tokens / r["chars_per_s"] <= budget]
    last = vals[-1] if vals else None
    return {"steps": steps[-1]["step"] if steps else 0, "train_s": round(train_s, 1),
            "wall_s": round(time.time() - started, 1),
            "val_loss": round(last["val_loss"], 4) if last else None, "val_at_step": last and last["step"],
            "val_text": "the prepared dataset's validation runs (spread over the corpus)",
            "model": str(run / "model")}


def _eval_on_text_tail(model_dir: Path, corpus: Path) -> float | None:
    """The baseline's validation procedure (its last 10% of the text, batch rows, state carried) on
    a model folder: a number comparable with the baseline's own val_loss, though this model trained
    on part of that text (the stack holds out other runs)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from models import load_model

    if not (model_dir / "config.json").exists():
        return None
    model, _, vocab, _ = load_model(str(model_dir))
    text = corpus.read_text()
    ids = {ch: i for i, ch in enumerate(vocab["chars"])}
    encoded = np.array([ids.get(ch, vocab["unknown_id"]) for ch in text[int(len(text) * 0.9):]])
    batch, seq = CONFIGS["seed"]["batch"], CONFIGS["seed"]["seq"]
    n = len(encoded) // (batch * seq)
    arr = encoded[: n * batch * seq].reshape(batch, -1)
    losses, state = [], None
    with torch.no_grad():
        for i in range(0, arr.shape[1], seq):
            x = torch.from_numpy(arr[:, i:i + seq])
            y = np.zeros_like(arr[:, i:i + seq])
            y[:, :-1] = arr[:, i + 1:i + seq]
            y[:, -1] = arr[:, i + seq] if i + seq < arr.shape[1] else arr[:, 0]
            logits, state = model(x, state)
            losses.append(F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten()).item())
    return round(float(np.mean(losses)), 4)


# ------------------------------------------------------------------------------------------ main

def prepared(corpus: Path, work: Path, num_cpus: int) -> Path:
    data = work / f"{corpus.stem}-prepared"
    if not (data / "manifest.json").exists():
        result = subprocess.run([sys.executable, "-m", "charrnn", "prepare", str(corpus), "--out", str(data),
                                 "--num-cpus", str(num_cpus)], capture_output=True, text=True, cwd=REPO)
        if result.returncode:
            _fail("charrnn prepare", result)
    return data


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-loop":
        bare_loop(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS, help=f"text corpus (default {CORPUS})")
    ap.add_argument("--data", type=Path, default=None,
                    help="prepared dataset of --corpus (default: WORK/<corpus>-prepared, prepared once)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/charrnn-bench-train"),
                    help="folder for the prepared dataset and run folders (default /tmp/charrnn-bench-train)")
    ap.add_argument("--configs", default="seed,small", help="which of seed (2x512, batch 128), small (2x128, batch 32)")
    ap.add_argument("--seed-steps", type=int, default=20, help="timed steps at the seed configuration (default 20)")
    ap.add_argument("--seed-warmup", type=int, default=3, help="untimed first steps at the seed configuration (default 3)")
    ap.add_argument("--small-steps", type=int, default=150, help="timed steps at the small configuration (default 150)")
    ap.add_argument("--small-warmup", type=int, default=10, help="untimed first steps at the small configuration (default 10)")
    ap.add_argument("--runs", default="baseline,bare,stack", help="which runs, in this order (default all three)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for all three (default 0: each one's own default, reported)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs for the stack's local Ray (default all)")
    ap.add_argument("--quiet-wait", type=float, default=0,
                    help="before each run, wait up to this many seconds for the machine to be idle (default 0)")
    ap.add_argument("--quality-minutes", type=float, default=0,
                    help="also compare validation loss after this much training time each (default 0: skip)")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data or prepared(args.corpus, args.work, args.num_cpus)
    report: dict = {"machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
                                "torch": _version("torch"), "ray": _version("ray")},
                    "corpus": str(args.corpus), "data": str(data), "configs": {}}
    started = time.time()
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        steps, warmup = (args.seed_steps, args.seed_warmup) if name == "seed" else (args.small_steps, args.small_warmup)
        entry: dict = {**cfg}
        for run in args.runs.split(","):
            idle = wait_quiet(args.quiet_wait) if args.quiet_wait else None
            print(f"[bench] {name}: {run} ...", file=sys.stderr, flush=True)
            if run == "baseline":
                entry[run] = run_baseline(cfg, steps, args.corpus, args.threads)
            elif run == "bare":
                entry[run] = run_bare(cfg, steps, warmup, data, args.threads)
            elif run == "stack":
                entry[run] = run_stack(cfg, steps, warmup, data, args.work, args.num_cpus, args.threads)
            else:
                raise SystemExit(f"unknown run {run!r}")
            if idle is not None:
                entry[run]["busy_cores_before"] = idle
            print(f"[bench] {name}: {run} {entry[run]['chars_per_s']:,} chars/s", file=sys.stderr, flush=True)
        if "stack" in entry:
            stack = entry["stack"]["chars_per_s"]
            if "baseline" in entry:
                entry["stack_vs_baseline"] = round(stack / entry["baseline"]["chars_per_s"], 3)
                entry["stack_compute_vs_baseline"] = round(entry["stack"]["compute_chars_per_s"]
                                                           / entry["baseline"]["chars_per_s"], 3)
            if "bare" in entry:
                entry["stack_vs_bare"] = round(stack / entry["bare"]["chars_per_s"], 3)
        if "bare" in entry and "baseline" in entry:
            entry["bare_vs_baseline"] = round(entry["bare"]["chars_per_s"] / entry["baseline"]["chars_per_s"], 3)
        report["configs"][name] = entry
    report["targets"] = {"stack_vs_baseline": {"seed": 1.0, "small": 1.5}, "stack_vs_bare": 0.9}
    if args.quality_minutes:
        print(f"[bench] quality: {args.quality_minutes} min each ...", file=sys.stderr, flush=True)
        report["quality"] = quality(args.quality_minutes, data, args.corpus, args.work, args.num_cpus, args.threads)
    report["bench_s"] = round(time.time() - started, 1)
    print(json.dumps(report, indent=1))


def _cpu_model() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    main()
