#!/usr/bin/env python3
"""Training benchmark: `charrnn train` against the classic recipe and a bare PyTorch loop.

Prints one JSON object. For each configuration (`seed`: 2x512 LSTM, batch 128; `small`: 2x128,
batch 32; seq 100) it runs, one after the other on this machine, each in its own process:

  baseline  ../shared/baselines/notebook_charrnn.py, unchanged: its own `train_chars_per_s`, which
            times each step with its one-hot encoding and leaves out its first 3 steps
  bare      the limit for the stack: models.CharRNN and training.step.train_step over windows from
            training.windows, the prepared runs held in memory, no Ray
  bare_beside_ray  the bare loop again, while an idle local Ray (started as `charrnn train` starts
            it) runs beside it: `bare_beside_ray_vs_bare` is what Ray's own processes cost the loop
            on this machine, and `stack_vs_bare_beside_ray` what is left to the stack's own work
  stack     `charrnn train --data DS --out RUN --max-steps N ...` as a user runs it: local Ray, Ray
            Train with one worker streaming the prepared dataset through Ray Data

`chars_per_s`, which the targets use (stack/bare >= 0.95; stack/baseline >= 1.3 at seed and >= 1.5
at small on a CPU with native bf16, >= 1.0 elsewhere; `--precision` sets the stack's and the bare
loop's, both `auto` by default, and the report says what each chose), is batch x seq x timed steps
over the wall time from the end of the last warm-up step to
the end of the last timed one: data feeding and bookkeeping count. A stack step ends when its
record appears in RUN/metrics.jsonl (polled every 10 ms); one more, untimed step holds the final
validation and save. `compute_chars_per_s` counts train_step time alone, like the stack's own
`chars_per_s` field and the baseline's figure. `foreign_cores`: how busy the machine was (cores,
/proc/stat, 2 s) before each run, while none of ours ran; above ~0.2 other load disturbs the figures.
`cores_during_timed_steps` (stack): the cores the training worker, the stack's other processes
(Ray's daemons and actors, the driver) and everything else kept busy over the timed steps;
`trainer_minor_faults_per_step`: the training worker's minor page faults per timed step.
On a machine whose speed drifts from process to process, `--rounds N` runs the three sides N times
in turn and reports each side's median round, with every round's figure and ratio beside it.

The quality comparisons (held-out loss after the same time, epochs or steps) are bench/quality.py.

From the repository root (the corpus is prepared once into --work; rough durations, 2 idle cores):

  python bench/train.py                                                    # ~15 min
  python bench/train.py --seed-steps 40 --small-steps 600 --rounds 3       # steadier figures, ~60 min
  python bench/train.py --configs small --small-steps 15 --small-warmup 3  # smoke test, ~2 min
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the project's packages, from this checkout
BASELINE = REPO.parent / "shared" / "baselines" / "notebook_charrnn.py"
CORPUS = REPO.parent / "shared" / "data" / "anna.txt"
CONFIGS = {"seed": dict(hidden=512, layers=2, batch=128, seq=100),
           "small": dict(hidden=128, layers=2, batch=32, seq=100)}
# Issue 14: the stack within 5% of its own bare loop; above the classic script by what native bf16 buys.
TARGETS = {"stack_vs_bare": {"seed": 0.95, "small": 0.95}}
TARGETS_VS_BASELINE = {"native bf16": {"seed": 1.3, "small": 1.5}, "no native bf16": {"seed": 1.0, "small": 1.0}}
BIG = 10**9
BUSY: list[float] = []  # every foreign_cores() figure


# ------------------------------------------------------------------------------ processes, CPU

def busy_cores(seconds: float = 2) -> float:
    """Busy cores of the whole machine over `seconds` (/proc/stat)."""
    def jiffies():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values) - values[3] - values[4], sum(values)  # (busy, all); idle and iowait are not busy
    (b0, t0), _, (b1, t1) = jiffies(), time.sleep(seconds), jiffies()
    return round((b1 - b0) / max(1, t1 - t0) * os.cpu_count(), 2)


def foreign_cores(before: str = "", wait_s: float = 0, threshold: float = 0.2) -> float:
    """Busy cores of the whole machine over 2 s (call it while nothing of ours runs), kept in BUSY and
    printed `before` a run. With `wait_s`, sample again until the machine is quieter than `threshold`
    or `wait_s` has passed."""
    deadline = time.time() + wait_s
    while True:
        busy = busy_cores()
        if busy < threshold or time.time() >= deadline:
            BUSY.append(busy)
            if before:
                print(f"[bench] {before} (machine busy {busy} cores) ...", file=sys.stderr, flush=True)
            return busy


def session_cpu(sid: int, faults: dict | None = None) -> dict:
    """CPU seconds so far: of each process in session `sid` by its name ("ray::RayTrainWo", "raylet", ...,
    summed over processes of one name), and of the whole machine ("machine"). `faults`, if given, gets
    each name's minor page faults so far."""
    hz, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ... minflt(7) ... utime(11) stime(12)
        if int(fields[3]) == sid:
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / hz
            if faults is not None:
                faults[name] = faults.get(name, 0) + int(fields[7])
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    out["machine"] = (sum(values) - values[3] - values[4]) / hz
    return out


def cores_between(before: dict, after: dict, seconds: float, main: str) -> dict:
    """Cores busy between two session_cpu() snapshots: the process `main`, the session's other
    processes (the biggest named), and everything outside the session."""
    used = {name: (after[name] - before.get(name, 0.0)) / seconds for name in after}
    machine, ours = used.pop("machine"), sum(used.values())
    main_cores = used.pop(main, 0.0)
    top = dict(sorted(((k, round(v, 3)) for k, v in used.items() if v >= 0.005), key=lambda kv: -kv[1])[:8])
    return {"trainer": round(main_cores, 3), "other_ray_processes": round(ours - main_cores, 3),
            "outside": round(max(0.0, machine - ours), 3), "biggest_others": top}


def run(cmd: list[str], log: Path, poll=None) -> tuple[int, float]:
    """Run `cmd` with its output in `log`: (exit status, wall seconds). `poll(session id)` is called
    every 10 ms while it runs; when it returns true, or this script is interrupted, the command is
    stopped: Ctrl-C (charrnn then stops its Ray), SIGKILL to its process group 2 minutes later."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            while proc.poll() is None and not (poll and poll(proc.pid)):
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the process group this call created
                    proc.wait()
    if poll:
        poll(proc.pid)
    return proc.returncode, time.time() - started


def run_ok(what: str, cmd: list[str], log: Path, poll=None) -> float:
    """run(); if the command fails, stop this script with the end of `log`."""
    code, wall = run(cmd, log, poll)
    if code:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-30:])
        raise SystemExit(f"{what} failed (output in {log}):\n{tail}")
    return wall


def last_json(log: Path) -> dict:
    return json.loads(next(l for l in reversed(log.read_text().splitlines()) if l.startswith("{")))


def steady(ends: list[float], compute: list[float], warmup: int, steps: int, tokens: int) -> dict:
    """Figures over steps warmup+1 .. warmup+steps: ends[i] is the wall time at which step i+1 ended,
    compute[i] the train_step seconds of steps 1 .. i+1 together."""
    if warmup < 1 or steps < 1 or len(ends) < warmup + steps:
        raise SystemExit(f"need >= 1 warm-up and >= 1 timed step, {warmup + steps} in all; got {len(ends)} steps")
    last = warmup + steps - 1
    return {"chars_per_s": round(steps * tokens / (ends[last] - ends[warmup - 1])),
            "compute_chars_per_s": round(steps * tokens / (compute[last] - compute[warmup - 1])),
            "timed_steps": steps, "warmup_steps": warmup}


# ------------------------------------------------------------------------------------ the runs

def baseline_cmd(cfg: dict, args, *extra: str) -> list[str]:
    cmd = [str(BASELINE), "--corpus", str(args.corpus), *(f"--{k}={v}" for k, v in cfg.items()),
           "--sample-chars", "0", *extra]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


def baseline(cfg: dict, steps: int, warmup: int, data: Path, args, log: Path) -> dict:
    cmd = baseline_cmd(cfg, args, "--steps", str(steps + 3))  # it always leaves its first 3 steps out
    wall = run_ok("baseline", [sys.executable, *cmd], log)
    got = last_json(log)
    return {"chars_per_s": round(got["train_chars_per_s"]), "timed_steps": steps, "warmup_steps": 3,
            "threads": got["threads"], "train_loss": round(got["train_loss"], 4), "process_s": round(wall, 1),
            "cmd": "python " + " ".join(cmd)}


def bare(cfg: dict, steps: int, warmup: int, data: Path, args, log: Path) -> dict:
    job = {"cfg": cfg, "steps": warmup + steps, "data": str(data), "threads": args.threads, "precision": args.precision}
    wall = run_ok("bare loop", [sys.executable, __file__, "--bare-loop", json.dumps(job)], log)
    got = last_json(log)
    return {**steady(got["ends"], got["compute"], warmup, steps, cfg["batch"] * cfg["seq"]),
            "threads": got["threads"], "precision": got["precision"], "precision_why": got["why"],
            "train_loss": round(got["loss"], 4), "process_s": round(wall, 1)}


def bare_beside_ray(cfg: dict, steps: int, warmup: int, data: Path, args, log: Path) -> dict:
    """The bare loop while an idle local Ray runs beside it, started as `charrnn train` starts its own
    (charrnn.ray_session.connect, dashboard included): what Ray's own processes take from the loop on
    this machine, before any of the stack's work."""
    idle_ray = ("import time; from charrnn.ray_session import connect, require_token_for_local_ray; "
                f"require_token_for_local_ray(); connect(None, {args.num_cpus}); print('up', flush=True); "
                "time.sleep(10**9)")
    with open(log.with_suffix(".ray.log"), "w") as out:
        ray_proc = subprocess.Popen([sys.executable, "-c", idle_ray], stdout=subprocess.PIPE, stderr=out, text=True,
                                    cwd=REPO, start_new_session=True)
        try:
            if ray_proc.stdout.readline().strip() != "up":
                raise SystemExit(f"the idle local Ray did not start (output in {out.name})")
            time.sleep(5)  # past Ray's own start-up work
            cores = busy_cores(5)
            got = bare(cfg, steps, warmup, data, args, log)
        finally:
            ray_proc.send_signal(signal.SIGINT)  # its exit hooks stop the local Ray
            try:
                ray_proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(ray_proc.pid, signal.SIGKILL)  # the process group this call created
                ray_proc.wait()
    return {**got, "idle_ray_cores": cores}


def bare_loop(job: dict) -> None:
    """In a child process: what the stack's worker does per step, without Ray or data streaming."""
    import numpy as np
    import torch

    from models import CharRNN, ModelConfig
    from pipeline.text.dataset import PreparedDataset
    from training.step import choose_training_precision, keep_freed_memory, make_optimizer, train_step
    from training.windows import EpochStream, windows

    cfg, cpu = job["cfg"], torch.device("cpu")
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    keep_freed_memory()  # as the stack's worker does
    dataset = PreparedDataset(job["data"])
    runs = [np.array(r) for r in dataset.iter_runs("train")]  # in memory, in the stack's order
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=dataset.manifest["vocab"]["size"], layers=cfg["layers"],
                                hidden=cfg["hidden"]))
    optimizer, scheduler = make_optimizer(model, 1e-3, "constant", job["steps"])
    state, ends, compute, spent = model.init_state(cfg["batch"]), [], [], 0.0
    batches = windows(EpochStream(lambda epoch: runs), cfg["batch"], cfg["seq"])
    first = next(batches)
    precision, why = choose_training_precision(job["precision"], model, first, state, cpu)  # as the stack's worker does
    for window in itertools.chain([first], batches):
        started = time.perf_counter()
        loss, grad_norm, state = train_step(model, optimizer, scheduler, window, state, 5.0, cpu, precision)
        loss, grad_norm = float(loss), float(grad_norm)  # the worker reads both every step
        spent += time.perf_counter() - started
        ends.append(time.time())
        compute.append(spent)
        if len(ends) == job["steps"]:
            break
    print(json.dumps({"ends": ends, "compute": compute, "loss": loss, "threads": torch.get_num_threads(),
                      "precision": precision, "why": why}))


class MetricsTail:
    """Each call reads the step records newly written to RUN/metrics.jsonl into `steps`, stamping
    each `seen` with the time it was read."""

    def __init__(self, path: Path):
        self.path, self.offset, self.steps = path, 0, []

    def __call__(self, sid: int | None = None) -> None:
        try:
            if self.path.stat().st_size == self.offset:
                return
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        now, chunk = time.time(), chunk[: chunk.rfind(b"\n") + 1]  # whole lines only
        self.offset += len(chunk)
        records = (json.loads(line) for line in chunk.splitlines() if line.strip())
        self.steps += [dict(r, seen=now) for r in records if "chars_per_s" in r]

    def compute(self, tokens: int) -> list[float]:
        """Train_step seconds of steps 1 .. each step: the worker's chars_per_s is step x tokens over
        that time (for a run that was not resumed)."""
        return [r["step"] * tokens / r["chars_per_s"] for r in self.steps]


def stack_cmd(cfg: dict, data: Path, out: Path, max_steps: int, args, checkpoint_every: int = BIG,
              precision: str | None = None) -> list[str]:
    # No evaluation, checkpoint or progress line inside the timed steps; the validation at the last
    # step (and at an epoch's end) reads one window (--val-max-tokens 100).
    cmd = ["charrnn", "train", "--data", str(data), "--out", str(out), *(f"--{k}={v}" for k, v in cfg.items()),
           "--max-steps", str(max_steps), "--val-every", str(BIG), "--val-max-tokens", "100",
           "--checkpoint-every", str(checkpoint_every), "--log-every", str(BIG), "--num-cpus", str(args.num_cpus),
           "--precision", precision or args.precision]
    return cmd + (["--threads-per-worker", str(args.threads)] if args.threads else [])


def stack(cfg: dict, steps: int, warmup: int, data: Path, args, log: Path) -> dict:
    out = args.work / f"run-{cfg['layers']}x{cfg['hidden']}-b{cfg['batch']}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = stack_cmd(cfg, data, out, warmup + steps + 1, args)
    tail, snapshots = MetricsTail(out / "metrics.jsonl"), {}

    def poll(sid: int) -> None:  # CPU use of the stack's processes at the start and the end of the timed steps
        tail()
        for mark in (warmup, warmup + steps):
            if len(tail.steps) >= mark and mark not in snapshots:
                faults = {}
                snapshots[mark] = (time.time(), session_cpu(sid, faults), faults)

    launched = time.time()
    wall = run_ok("charrnn train", [sys.executable, "-m", *cmd], log, poll=poll)
    (t0, before, faults0), (t1, after, faults1) = snapshots[warmup], snapshots[warmup + steps]
    worker = "ray::RayTrainWo"
    tokens = cfg["batch"] * cfg["seq"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    chosen = next(e for e in events if e["event"] == "precision")
    return {**steady([r["seen"] for r in tail.steps], tail.compute(tokens), warmup, steps, tokens),
            "precision": chosen["precision"], "precision_why": chosen["why"], "threads": args.threads or args.num_cpus,
            "train_loss": round(tail.steps[-1]["loss"], 4),
            "process_s": round(wall, 1), "startup_s": round(tail.steps[0]["seen"] - launched, 1),
            "cores_during_timed_steps": cores_between(before, after, t1 - t0, worker),
            # Page faults are counted by the kernel, not timed: they compare across loaded and idle runs.
            "trainer_minor_faults_per_step": round((faults1.get(worker, 0) - faults0.get(worker, 0)) / steps),
            "cmd": " ".join(cmd)}


# ------------------------------------------------------------------------------- shared with quality.py

def add_common_options(ap) -> None:
    add = ap.add_argument
    add("--corpus", type=Path, default=CORPUS, help="text corpus (default %(default)s)")
    add("--work", type=Path, default=Path("/tmp/charrnn-bench-train"),
        help="folder for the prepared datasets, run folders and logs (default %(default)s)")
    add("--threads", type=int, default=0, help="torch threads in every run (default 0: each one's default)")
    add("--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="of the stack and the bare loop, which resolve auto alike (default %(default)s); the classic is float32")
    add("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the stack's local Ray (default all)")
    add("--quiet-wait", type=float, default=0, help="before each run, wait up to this many s for an idle machine")


def prepare_run(args) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run() stops the command in progress
    args.work.mkdir(parents=True, exist_ok=True)
    args.corpus = args.corpus.resolve()


def machine() -> dict:
    """The CPU, its flags that matter here, and the versions: figures compare within one machine only."""
    import torch

    from models import native_bf16

    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    cpu = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    return {"cpus": os.cpu_count(), "cpu": cpu,
            "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
            "native_bf16": "native bf16" if native_bf16(torch.device("cpu")) else "no native bf16",
            "python": platform.python_version(), "torch": version("torch"), "ray": version("ray")}


def finish_report(report: dict, started: float) -> None:
    """Print `report` with how busy the machine was around the runs and how long they took."""
    report["foreign_cores_after"] = foreign_cores()
    if max(BUSY) >= 0.2:
        report["warning"] = (f"other processes kept up to {max(BUSY)} of {os.cpu_count()} cores busy around the "
                             f"runs: the figures are disturbed (see --quiet-wait)")
    report["bench_s"] = round(time.time() - started, 1)
    print(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------------------- main

def measure_config(name: str, data: Path, args, bf16: str) -> dict:
    """The three sides at one configuration, --rounds times in turn: each side's median round (its
    `chars_per_s` and the round figures beside it), and the ratios of the medians against the targets."""
    cfg = CONFIGS[name]
    steps, warmup = (args.seed_steps, args.seed_warmup) if name == "seed" else (args.small_steps, args.small_warmup)
    sides = {"baseline": baseline, "bare": bare, "bare_beside_ray": bare_beside_ray, "stack": stack}
    rounds: dict[str, list[dict]] = {kind: [] for kind in sides}
    for _ in range(args.rounds):
        for kind, measure in sides.items():
            busy = foreign_cores(f"{name}: {kind}", args.quiet_wait)
            got = {**measure(cfg, steps, warmup, data, args, args.work / f"{name}-{kind}.log"), "foreign_cores": busy}
            rounds[kind].append(got)
            print(f"[bench] {name}: {kind} {got['chars_per_s']:,} chars/s", file=sys.stderr, flush=True)
    entry = {**cfg}
    for kind, got in rounds.items():
        ordered = sorted(got, key=lambda r: r["chars_per_s"])
        entry[kind] = {**ordered[len(ordered) // 2], "rounds_chars_per_s": [r["chars_per_s"] for r in got]}
    targets = {**TARGETS, "stack_vs_baseline": TARGETS_VS_BASELINE[bf16]}
    for a, b in (("stack", "baseline"), ("stack", "bare"), ("bare", "baseline"), ("stack", "bare_beside_ray"),
                 ("bare_beside_ray", "bare")):
        ratio = entry[a]["chars_per_s"] / entry[b]["chars_per_s"]
        entry[f"{a}_vs_{b}"] = round(ratio, 3)
        if args.rounds > 1:
            entry[f"{a}_vs_{b}_by_round"] = [round(x["chars_per_s"] / y["chars_per_s"], 3)
                                             for x, y in zip(rounds[a], rounds[b])]
        if f"{a}_vs_{b}" in targets:
            target = targets[f"{a}_vs_{b}"][name]
            entry[f"{a}_vs_{b}_target"], entry[f"{a}_vs_{b}_target_met"] = target, ratio >= target
    return entry



def open_dataset(data: Path):
    from pipeline.text.dataset import PreparedDataset

    return PreparedDataset(str(data))


def prepared(corpus: Path, data: Path, args, *options: str, fresh: bool = False) -> Path:
    """`charrnn prepare CORPUS --out DATA`, unless DATA already holds a dataset this code reads."""
    if not fresh:
        try:
            open_dataset(data)
            return data
        except Exception:  # none yet, or an older format
            pass
    run_ok("charrnn prepare", [sys.executable, "-m", "charrnn", "prepare", str(corpus), "--out", str(data),
                               "--num-cpus", str(args.num_cpus), *options], args.work / f"prepare-{data.name}.log")
    return data


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-loop":
        return bare_loop(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add_common_options(ap)
    add("--configs", default="seed,small", help="seed and/or small, '' for none (default %(default)s)")
    add("--seed-steps", type=int, default=20, help="timed steps, seed configuration (default %(default)s)")
    add("--seed-warmup", type=int, default=3, help="untimed first steps, seed configuration (default %(default)s)")
    add("--small-steps", type=int, default=150, help="timed steps, small configuration (default %(default)s)")
    add("--small-warmup", type=int, default=10, help="untimed first steps, small configuration (default %(default)s)")
    add("--rounds", type=int, default=1,
        help="run the three sides this many times in turn and report each one's median (default %(default)s)")
    args = ap.parse_args()
    names = [name for name in args.configs.split(",") if name]
    if set(names) - set(CONFIGS):
        ap.error(f"--configs: choose from {', '.join(CONFIGS)}")
    if min(args.seed_steps, args.seed_warmup, args.small_steps, args.small_warmup, args.rounds) < 1:
        ap.error("steps, warm-up steps and rounds must be >= 1")
    started = time.time()
    prepare_run(args)
    data = prepared(args.corpus, args.work / f"{args.corpus.stem}-prepared", args)
    report: dict = {"machine": machine(), "corpus": str(args.corpus), "data": str(data), "configs": {}}
    for name in names:
        report["configs"][name] = measure_config(name, data, args, report["machine"]["native_bf16"])
    finish_report(report, started)


if __name__ == "__main__":
    main()
