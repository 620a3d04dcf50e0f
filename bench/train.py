#!/usr/bin/env python3
"""Training benchmark: `charrnn train` against the classic recipe and a bare PyTorch loop.

Prints one JSON object. For each configuration (`seed`: 2x512 LSTM, batch 128; `small`: 2x128,
batch 32; seq 100) it runs, one after the other on this machine, each in its own process:

  baseline  ../shared/baselines/notebook_charrnn.py, unchanged: its own `train_chars_per_s`, which
            times each step with its one-hot encoding and leaves out its first 3 steps
  bare      the limit for the stack: models.CharRNN and training.step.train_step over windows from
            training.windows, the prepared runs held in memory, no Ray
  stack     `charrnn train --data DS --out RUN --max-steps N ...` as a user runs it: local Ray, Ray
            Train with one worker streaming the prepared dataset through Ray Data

`chars_per_s`, which the targets use (stack/bare >= 0.95; stack/baseline >= 1.3 at seed and >= 1.5
at small on a CPU with native bf16, >= 1.0 elsewhere; `--precision` sets the stack's and the bare
loop's, both `auto` by default, and the report says what each chose), is batch x seq x timed steps over the wall time from the end of the last warm-up step to
the end of the last timed one: data feeding and bookkeeping count. A stack step ends when its
record appears in RUN/metrics.jsonl (polled every 10 ms); one more, untimed step holds the final
validation and save. `compute_chars_per_s` counts train_step time alone, like the stack's own
`chars_per_s` field and the baseline's figure. `foreign_cores`: how busy the machine was (cores,
/proc/stat, 2 s) before each run, while none of ours ran; above ~0.2 other load disturbs the figures.

--quality-minutes M trains the seed configuration for M minutes of training-loop wall time each:
the classic script (`--minutes M`; a wrapper saves the network it trained), then the stack (stopped
once its loop has run M minutes from the start of step 1; scored: its last checkpoint inside the
budget, one every 10 steps) on a dataset prepared from the first 90% of the corpus, the classic
script's training text. Both are scored alike (one stream, 4096 characters a pass, state carried)
on the last 10%, the classic script's validation text, which neither trained on.
--quality-epochs E instead trains each side E epochs (the recipe's 20: about an hour each), the stack
as a user runs it (`charrnn train --epochs E`, its defaults), scored on RUN/model (the best by its own
validation split) and on its final weights. --quality-side baseline|stack runs one side and saves its
result in --work; --reuse takes a saved side whose command matches, so the sides can run apart and
be scored together (`--reuse` with both sides saved).

From the repository root (the corpus is prepared once into --work; rough durations, 2 idle cores):

  python bench/train.py                                                    # ~15 min
  python bench/train.py --configs seed --quality-minutes 20                # ~55 min
  python bench/train.py --configs small --small-steps 15 --small-warmup 3  # smoke test, ~2 min
  python bench/train.py --configs '' --quality-minutes 0.5 --quality-config small   # smoke test, ~3 min
  python bench/train.py --configs '' --quality-epochs 20                   # ~2 hours
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

def foreign_cores(before: str = "", wait_s: float = 0, threshold: float = 0.2) -> float:
    """Busy cores of the whole machine over 2 s (call it while nothing of ours runs), kept in BUSY and
    printed `before` a run. With `wait_s`, sample again until the machine is quieter than `threshold`
    or `wait_s` has passed."""
    def jiffies():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values) - values[3] - values[4], sum(values)  # (busy, all); idle and iowait are not busy
    deadline = time.time() + wait_s
    while True:
        (b0, t0), _, (b1, t1) = jiffies(), time.sleep(2), jiffies()
        busy = round((b1 - b0) / max(1, t1 - t0) * os.cpu_count(), 2)
        if busy < threshold or time.time() >= deadline:
            BUSY.append(busy)
            if before:
                print(f"[bench] {before} (machine busy {busy} cores) ...", file=sys.stderr, flush=True)
            return busy


def run(cmd: list[str], log: Path, poll=None) -> tuple[int, float]:
    """Run `cmd` with its output in `log`: (exit status, wall seconds). `poll()` is called every
    10 ms while it runs; when it returns true, or this script is interrupted, the command is
    stopped: Ctrl-C (charrnn then stops its Ray), SIGKILL to its process group 2 minutes later."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            while proc.poll() is None and not (poll and poll()):
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
        poll()
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


def bare_loop(job: dict) -> None:
    """In a child process: what the stack's worker does per step, without Ray or data streaming."""
    import numpy as np
    import torch

    from models import CharRNN, ModelConfig
    from pipeline import PreparedDataset
    from training.step import choose_precision, make_optimizer, train_step
    from training.windows import EpochStream, windows

    cfg, cpu = job["cfg"], torch.device("cpu")
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    dataset = PreparedDataset(job["data"])
    runs = [np.array(r) for r in dataset.iter_runs("train")]  # in memory, in the stack's order
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=dataset.manifest["vocab"]["size"], layers=cfg["layers"],
                                hidden=cfg["hidden"]))
    optimizer, scheduler = make_optimizer(model, 1e-3, "constant", job["steps"])
    state, ends, compute, spent = model.init_state(cfg["batch"]), [], [], 0.0
    batches = windows(EpochStream(lambda epoch: runs), cfg["batch"], cfg["seq"])
    first = next(batches)
    precision, why = choose_precision(job["precision"], model, first, state, cpu)  # as the stack's worker does
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

    def __call__(self) -> None:
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


def stack_cmd(cfg: dict, data: Path, out: Path, max_steps: int, args, checkpoint_every: int = BIG) -> list[str]:
    # No evaluation, checkpoint or progress line inside the timed steps; the validation at the last
    # step (and at an epoch's end) reads one window (--val-max-tokens 100).
    cmd = ["charrnn", "train", "--data", str(data), "--out", str(out), *(f"--{k}={v}" for k, v in cfg.items()),
           "--max-steps", str(max_steps), "--val-every", str(BIG), "--val-max-tokens", "100",
           "--checkpoint-every", str(checkpoint_every), "--log-every", str(BIG), "--num-cpus", str(args.num_cpus),
           "--precision", args.precision]
    return cmd + (["--threads-per-worker", str(args.threads)] if args.threads else [])


def stack(cfg: dict, steps: int, warmup: int, data: Path, args, log: Path) -> dict:
    out = args.work / f"run-{cfg['layers']}x{cfg['hidden']}-b{cfg['batch']}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = stack_cmd(cfg, data, out, warmup + steps + 1, args)
    tail = MetricsTail(out / "metrics.jsonl")
    launched = time.time()
    wall = run_ok("charrnn train", [sys.executable, "-m", *cmd], log, poll=tail)
    tokens = cfg["batch"] * cfg["seq"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    chosen = next(e for e in events if e["event"] == "precision")
    return {**steady([r["seen"] for r in tail.steps], tail.compute(tokens), warmup, steps, tokens),
            "precision": chosen["precision"], "precision_why": chosen["why"], "threads": args.threads or args.num_cpus, "train_loss": round(tail.steps[-1]["loss"], 4),
            "process_s": round(wall, 1), "startup_s": round(tail.steps[0]["seen"] - launched, 1),
            "cmd": " ".join(cmd)}


# ------------------------------------------------------------------------------------- quality

# Runs the classic script unchanged (its main(), its arguments), then saves the network it trained.
CAPTURE = r"""
import runpy, sys, torch
nb = runpy.run_path(sys.argv[1])
made, init = [], nb["CharRNN"].__init__
def capture(self, *args, **kwargs):
    init(self, *args, **kwargs)
    made.append(self)
nb["CharRNN"].__init__ = capture
save_to, sys.argv = sys.argv[2], [sys.argv[1]] + sys.argv[3:]
nb["main"]()
torch.save(made[-1].state_dict(), save_to)
"""


def quality(name: str, args) -> dict:
    """Held-out loss of both sides after the same budget: --quality-minutes of training-loop wall time
    or --quality-epochs over the same first 90% of the corpus."""
    cfg, work = CONFIGS[name], args.work / "quality"
    work.mkdir(parents=True, exist_ok=True)
    text = args.corpus.read_text()  # newlines read as the classic script reads them
    split = int(len(text) * 0.9)  # the classic script trains on text[:split] and validates on the rest
    train_text = work / f"{args.corpus.stem}-first90.txt"
    train_text.write_text(text[:split])
    # Runs of 8192: the default 16384 cuts this text into fewer runs than the seed batch's 128 lanes.
    data = prepared(train_text, work / f"{train_text.stem}-prepared", args, "--val-fraction", "0.02",
                    "--run-length", "8192", fresh=not args.reuse)
    budget = ("--epochs", str(args.quality_epochs)) if args.quality_epochs else ("--minutes", str(args.quality_minutes))
    out = {"config": name, **cfg, budget[0].strip("-"): float(budget[1])}
    if args.quality_side in ("both", "baseline"):
        out["baseline"], weights = quality_baseline(cfg, budget, work, args)
    if args.quality_side in ("both", "stack"):
        if args.quality_epochs:
            out["stack"], model_dirs = quality_stack_epochs(cfg, data, work, args)
        else:
            out["stack"], model_dirs = quality_stack_minutes(cfg, data, work, args)
    if "stack" not in out:
        return out

    # The stack alone (--quality-side stack) is scored too, on the same targets, with no baseline beside it.
    print("[bench] quality: scoring ...", file=sys.stderr, flush=True)
    losses, out["held_out"] = held_out_losses(text[split:], sorted(set(text)), cfg, weights if "baseline" in out else None,
                                              model_dirs, data, args.threads)
    for kind, loss in losses.items():
        out["stack"][f"held_out_loss{kind.removeprefix('stack')}"] = loss
    out["held_out"]["text"] = f"the last 10% of {args.corpus.name}, the classic script's validation text"
    if "baseline" in out:
        out["baseline"]["held_out_loss"] = losses.pop("baseline")
        out["stack_minus_baseline_loss"] = round(out["stack"]["held_out_loss"] - out["baseline"]["held_out_loss"], 4)
    return out


def quality_baseline(cfg: dict, budget: tuple, work: Path, args) -> tuple[dict, Path]:
    """The classic script's quality run and the weights it trained. With --reuse, an earlier run of
    the same command in --work is taken instead (the 20-epoch one takes about an hour)."""
    cmd = baseline_cmd(cfg, args, *budget)
    key = "-".join(budget).strip("-")
    weights, log, saved = work / f"baseline-{key}.pt", work / f"baseline-{key}.log", work / f"baseline-{key}.json"
    found = reused(saved, "python " + " ".join(cmd), args)
    if found and weights.exists():
        return found, weights
    busy = foreign_cores(f"quality: baseline, {' '.join(budget)}", args.quiet_wait)
    wall = run_ok("baseline (quality)", [sys.executable, "-c", CAPTURE, cmd[0], str(weights), *cmd[1:]], log)
    got = last_json(log)
    result = {"steps": got["train_steps"], "epochs": round(got["train_epochs"], 3),
              "train_loss": round(got["train_loss"], 4), "own_val_loss": round(got["val_loss"], 4),
              "process_s": round(wall, 1), "foreign_cores": busy, "cmd": "python " + " ".join(cmd)}
    saved.write_text(json.dumps(result))
    return result, weights


def reused(saved: Path, cmd: str, args) -> dict | None:
    """With --reuse, the result saved in `saved` by an earlier run of the same command."""
    if not (args.reuse and saved.exists()):
        return None
    found = json.loads(saved.read_text())
    if found["cmd"] != cmd:
        return None
    print(f"[bench] quality: reused {saved}", file=sys.stderr, flush=True)
    return {**found, "reused": str(saved)}


def quality_stack_epochs(cfg: dict, data: Path, work: Path, args) -> tuple[dict, dict]:
    """`charrnn train --epochs E` as a user runs it (its own evaluations and checkpoints), scored twice:
    RUN/model (the best by its own validation split) and the final weights."""
    key = f"epochs-{args.quality_epochs}"
    run_dir, log, saved = work / f"stack-run-{key}", work / f"stack-{key}.log", work / f"stack-{key}.json"
    cmd = ["charrnn", "train", "--data", str(data), "--out", str(run_dir), *(f"--{k}={v}" for k, v in cfg.items()),
           "--epochs", str(args.quality_epochs), "--num-cpus", str(args.num_cpus), *args.quality_stack_args.split()]
    cmd += ["--threads-per-worker", str(args.threads)] if args.threads else []
    found = reused(saved, " ".join(cmd), args)
    if found:
        return found, {"": run_dir / "model", "_final": Path(found.pop("final_model"))}
    if args.reuse and (run_dir / "run.json").exists():
        # Finished by hand: `charrnn train --resume --out RUN` (exactly the uninterrupted run's steps)
        print(f"[bench] quality: reused {run_dir}, trained apart from this script", file=sys.stderr, flush=True)
        return stack_result(run_dir, cmd, None, None)
    busy = foreign_cores(f"quality: stack, {args.quality_epochs} epochs", args.quiet_wait)
    shutil.rmtree(run_dir, ignore_errors=True)
    wall = run_ok("charrnn train (quality)", [sys.executable, "-m", *cmd], log)
    result, models = stack_result(run_dir, cmd, wall, busy)
    saved.write_text(json.dumps({**result, "final_model": str(models["_final"])}))
    return result, models


def checkpoint_dirs(run_dir: Path) -> dict[int, Path]:
    """A run folder's finished checkpoints by step."""
    return {json.loads(p.read_text())["step"]: p.parent for p in run_dir.glob("ray/**/checkpoint-*/trainer_state.json")}


def stack_result(run_dir: Path, cmd: list[str], wall: float | None, busy: float | None) -> tuple[dict, dict]:
    """What a finished `charrnn train` run folder says of its run, and its two models to score."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "step" in r]
    done = checkpoint_dirs(run_dir)
    best = json.loads((run_dir / "model" / "config.json").read_text())["info"]
    result = {"steps": steps[-1]["step"], "train_loss": round(steps[-1]["loss"], 4), "best_step": best["step"],
              "best_own_val_loss": round(best["val_loss"], 4), "process_s": wall and round(wall, 1), "foreign_cores": busy,
              "precision": next((r["precision"] for r in records if "precision" in r), "fp32"), "cmd": " ".join(cmd),
              "sessions": [r for r in records if r.get("event") in ("precision", "resumed")]}
    return result, {"": run_dir / "model", "_final": done[max(done)] / "model"}


def quality_stack_minutes(cfg: dict, data: Path, work: Path, args) -> tuple[dict, dict]:
    """`charrnn train` stopped once its loop has run the budget from the start of step 1, scored on
    its last checkpoint inside the budget (one every 10 steps)."""
    budget = args.quality_minutes * 60
    busy = foreign_cores(f"quality: stack, {args.quality_minutes} min", args.quiet_wait)
    run_dir, log, tokens = work / "stack-run", work / "stack.log", cfg["batch"] * cfg["seq"]
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = stack_cmd(cfg, data, run_dir, BIG, args, checkpoint_every=10) + args.quality_stack_args.split()
    tail = MetricsTail(run_dir / "metrics.jsonl")

    def elapsed(record: dict) -> float:  # seconds from the start of step 1 to the end of this step
        first = tail.steps[0]
        return record["seen"] - first["seen"] + first["step"] * tokens / first["chars_per_s"]

    def over_budget() -> bool:
        tail()
        return bool(tail.steps) and elapsed(tail.steps[-1]) >= budget

    _, wall = run([sys.executable, "-m", *cmd], log, poll=over_budget)
    inside = {r["step"] for r in tail.steps if elapsed(r) <= budget}
    done = checkpoint_dirs(run_dir)
    step = max(inside & set(done), default=None)
    if step is None:
        raise SystemExit(f"charrnn train (quality): no checkpoint inside the budget, {len(tail.steps)} steps "
                         f"(output in {log})")
    return ({"steps": tail.steps[-1]["step"], "scored_checkpoint_step": step,
             "train_loss": round(tail.steps[-1]["loss"], 4), "process_s": round(wall, 1),
             "foreign_cores": busy, "cmd": " ".join(cmd)}, {"": done[step] / "model"})



def held_out_losses(held: str, chars: list[str], cfg: dict, weights: Path, model_dirs: dict, data: Path,
                    threads: int = 0):
    """Each model's mean loss on `held`, on the same targets: the characters in both vocabularies
    (the classic script's, `chars`, is built from the whole corpus; the stack's from `data`).
    Returns ({"baseline": loss, "stack" + key: loss for each of model_dirs}, how many characters
    were scored and left out)."""
    import runpy

    import torch

    from models import load_model

    if threads:
        torch.set_num_threads(threads)
    dataset = open_dataset(data)
    stack_ids = torch.from_numpy(dataset.encode(held).astype("int64"))
    keep = stack_ids != dataset.vocab.unknown_id
    losses = {}
    if weights is not None:
        nb = runpy.run_path(str(BASELINE))  # its definitions; main() runs only as __main__
        net = nb["CharRNN"](len(chars), cfg["hidden"], cfg["layers"], 0.5)
        net.load_state_dict(torch.load(weights, weights_only=True))
        net.eval()
        char2int = {c: i for i, c in enumerate(chars)}
        one_hot = lambda x: torch.from_numpy(nb["one_hot_encode"](x[None].numpy(), len(chars)))
        classic_ids = torch.tensor([char2int[c] for c in held])
        losses["baseline"] = held_out_loss(lambda x, s: net(one_hot(x), s), classic_ids, keep)
    for key, model_dir in model_dirs.items():
        model = load_model(model_dir)[0]
        losses[f"stack{key}"] = held_out_loss(lambda x, s: model(x[None], s), stack_ids, keep)
    return (losses, {"scored_chars": int(keep[1:].sum()), "left_out_chars": int((~keep[1:]).sum())})


def held_out_loss(forward, ids, keep) -> float:
    """Mean cross-entropy (nats) over the targets where `keep`, the ids read as one stream, 4096 a
    forward pass, state carried (as models.score does). forward(ids, state) -> (logits, state)."""
    import torch
    import torch.nn.functional as F

    total, state = 0.0, None
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 4096):
            piece = ids[start:start + 4097]
            logits, state = forward(piece[:-1], state)
            losses = F.cross_entropy(logits.reshape(len(piece) - 1, -1), piece[1:], reduction="none")
            total += losses[keep[start + 1:start + len(piece)]].sum().item()
    return round(total / int(keep[1:].sum()), 4)


# ----------------------------------------------------------------------------------------- main

def open_dataset(data: Path):
    from pipeline import PreparedDataset

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
    sys.path.insert(0, str(REPO))
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-loop":
        return bare_loop(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--corpus", type=Path, default=CORPUS, help="text corpus (default %(default)s)")
    add("--work", type=Path, default=Path("/tmp/charrnn-bench-train"),
        help="folder for the prepared datasets, run folders and logs (default %(default)s)")
    add("--configs", default="seed,small", help="seed and/or small, '' for none (default %(default)s)")
    add("--seed-steps", type=int, default=20, help="timed steps, seed configuration (default %(default)s)")
    add("--seed-warmup", type=int, default=3, help="untimed first steps, seed configuration (default %(default)s)")
    add("--small-steps", type=int, default=150, help="timed steps, small configuration (default %(default)s)")
    add("--small-warmup", type=int, default=10, help="untimed first steps, small configuration (default %(default)s)")
    add("--threads", type=int, default=0, help="torch threads in every run (default 0: each one's default)")
    add("--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="of the stack and the bare loop, which resolve auto alike (default %(default)s); the classic is float32")
    add("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the stack's local Ray (default all)")
    add("--quiet-wait", type=float, default=0, help="before each run, wait up to this many s for an idle machine")
    add("--quality-minutes", type=float, default=0, help="also compare held-out loss after this much training each")
    add("--quality-epochs", type=float, default=0, help="... or after this many epochs each (the recipe's 20)")
    add("--quality-stack-args", default="", help="more `charrnn train` options for the quality run, e.g. a recipe")
    add("--quality-side", choices=["both", "baseline", "stack"], default="both",
        help="run one side of the quality comparison only (its result is saved in --work; default both, scored)")
    add("--reuse", action="store_true", help="take a quality side that ran in --work with the same command from there")
    add("--quality-config", choices=CONFIGS, default="seed", help="of the quality runs (small: a smoke test)")
    args = ap.parse_args()
    names = [name for name in args.configs.split(",") if name]
    if set(names) - set(CONFIGS):
        ap.error(f"--configs: choose from {', '.join(CONFIGS)}")
    if min(args.seed_steps, args.seed_warmup, args.small_steps, args.small_warmup) < 1:
        ap.error("steps and warm-up steps must be >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run() stops the command in progress
    args.work.mkdir(parents=True, exist_ok=True)
    args.corpus = args.corpus.resolve()
    started = time.time()
    data = prepared(args.corpus, args.work / f"{args.corpus.stem}-prepared", args)
    with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    import torch

    from training.step import native_bf16

    bf16 = "native bf16" if native_bf16(torch.device("cpu")) else "no native bf16"
    report: dict = {"machine": {"cpus": os.cpu_count(), "cpu": cpu, "bf16": bf16, "python": platform.python_version(),
                                "torch": version("torch"), "ray": version("ray")},
                    "corpus": str(args.corpus), "data": str(data), "configs": {}}
    for name in names:
        cfg = CONFIGS[name]
        steps, warmup = (args.seed_steps, args.seed_warmup) if name == "seed" else (args.small_steps, args.small_warmup)
        entry = {**cfg}
        for kind, measure in (("baseline", baseline), ("bare", bare), ("stack", stack)):
            busy = foreign_cores(f"{name}: {kind}", args.quiet_wait)
            entry[kind] = {**measure(cfg, steps, warmup, data, args, args.work / f"{name}-{kind}.log"),
                           "foreign_cores": busy}
            print(f"[bench] {name}: {kind} {entry[kind]['chars_per_s']:,} chars/s", file=sys.stderr, flush=True)
        for a, b in (("stack", "baseline"), ("stack", "bare"), ("bare", "baseline")):
            ratio = entry[a]["chars_per_s"] / entry[b]["chars_per_s"]
            entry[f"{a}_vs_{b}"] = round(ratio, 3)
            targets = {**TARGETS, "stack_vs_baseline": TARGETS_VS_BASELINE[report["machine"]["bf16"]]}
            if f"{a}_vs_{b}" in targets:
                target = targets[f"{a}_vs_{b}"][name]
                entry[f"{a}_vs_{b}_target"], entry[f"{a}_vs_{b}_target_met"] = target, ratio >= target
        report["configs"][name] = entry
    if args.quality_minutes or args.quality_epochs:
        report["quality"] = quality(args.quality_config, args)
    report["foreign_cores_after"] = foreign_cores()
    if max(BUSY) >= 0.2:
        report["warning"] = (f"other processes kept up to {max(BUSY)} of {os.cpu_count()} cores busy around the "
                             f"runs: the figures are disturbed (see --quiet-wait)")
    report["bench_s"] = round(time.time() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
