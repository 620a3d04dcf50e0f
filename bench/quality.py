#!/usr/bin/env python3
"""Training quality benchmark: held-out loss of `charrnn train` against the classic recipe's.

Prints one JSON object. Both sides train the seed configuration (2x512 LSTM, batch 128, seq 100;
--config small for a smoke test) on the first 90% of the corpus, the classic script's training
text, and are scored alike (one stream, 4096 characters a pass, state carried) on the last 10%, its
validation text, which neither trained on. The stack's dataset is prepared from that 90% (runs of
8192, 2% of them for its own validation).

--minutes M  M minutes of training-loop wall time each: the classic script (`--minutes M`; a wrapper
             saves the network it trained), then the stack, stopped once its loop has run M minutes
             from the start of step 1 and scored on its last checkpoint inside the budget (one every
             10 steps).
--epochs E   E epochs each (the recipe's 20: one to two hours each on 2 cores), the stack as a user
             runs it (`charrnn train --epochs E`, its defaults), scored on RUN/model (the best by its
             own validation split) and on its final weights. --side baseline|stack runs one side and
             saves its result in --work; --reuse takes a saved side whose command matches (or a stack
             run folder finished by hand with `charrnn train --resume --out RUN`), so the sides can
             run apart and be scored together.
--parity-steps N  the stack alone, N steps at --precision fp32 and N at bf16 from the same seed:
             bf16's held-out loss against fp32's (target: within 0.02 nats/char).

From the repository root (rough durations, 2 idle cores):

  python bench/quality.py --minutes 20                          # ~45 min
  python bench/quality.py --epochs 20 --side baseline           # ~1 h 50 min (the classic, float32)
  python bench/quality.py --epochs 20 --side stack              # ~1 h 10 min (bf16 where native)
  python bench/quality.py --epochs 20 --reuse                   # both sides saved: scores them together
  python bench/quality.py --parity-steps 200                    # ~15 min
  python bench/quality.py --minutes 0.5 --config small          # smoke test, ~3 min
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from train import (BASELINE, BIG, CONFIGS, MetricsTail, add_common_options, baseline_cmd, finish_report,
                   foreign_cores, last_json, machine, prepare_run, prepared, open_dataset, run, run_ok, stack_cmd)

HELD_OUT = "the last 10% of {}, the classic script's validation text"

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
    """Held-out loss of both sides after the same budget: --minutes of training-loop wall time
    or --epochs over the same first 90% of the corpus."""
    cfg, work = CONFIGS[name], args.work / "quality"
    text, split, data = first_90(work, args)
    budget = ("--epochs", str(args.epochs)) if args.epochs else ("--minutes", str(args.minutes))
    out = {"config": name, **cfg, budget[0].strip("-"): float(budget[1])}
    if args.side in ("both", "baseline"):
        out["baseline"], weights = quality_baseline(cfg, budget, work, args)
    if args.side in ("both", "stack"):
        if args.epochs:
            out["stack"], model_dirs = quality_stack_epochs(cfg, data, work, args)
        else:
            out["stack"], model_dirs = quality_stack_minutes(cfg, data, work, args)
    if "stack" not in out:
        return out

    # The stack alone (--side stack) is scored too, on the same targets, with no baseline beside it.
    print("[bench] quality: scoring ...", file=sys.stderr, flush=True)
    losses, out["held_out"] = held_out_losses(text[split:], sorted(set(text)), cfg,
                                              weights if "baseline" in out else None,
                                              {f"held_out_loss{k}": v for k, v in model_dirs.items()},
                                              data, args.threads)
    out["held_out"]["text"] = HELD_OUT.format(args.corpus.name)
    if "baseline" in out:
        out["baseline"]["held_out_loss"] = losses.pop("baseline")
    out["stack"].update(losses)
    if "baseline" in out:
        out["stack_minus_baseline_loss"] = round(out["stack"]["held_out_loss"] - out["baseline"]["held_out_loss"], 4)
    return out


def first_90(work: Path, args) -> tuple[str, int, Path]:
    """The corpus, where the classic script splits it (it trains on text[:split] and validates on the
    rest), and a dataset prepared from its first 90%, in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    text = args.corpus.read_text()  # newlines read as the classic script reads them
    split = int(len(text) * 0.9)
    train_text = work / f"{args.corpus.stem}-first90.txt"
    train_text.write_text(text[:split])
    # Runs of 8192: the default 16384 cuts this text into fewer runs than the seed batch's 128 lanes.
    data = prepared(train_text, work / f"{train_text.stem}-prepared", args, "--val-fraction", "0.02",
                    "--run-length", "8192", fresh=not args.reuse)
    return text, split, data


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
    key = f"epochs-{args.epochs}"
    run_dir, log, saved = work / f"stack-run-{key}", work / f"stack-{key}.log", work / f"stack-{key}.json"
    cmd = ["charrnn", "train", "--data", str(data), "--out", str(run_dir), *(f"--{k}={v}" for k, v in cfg.items()),
           "--epochs", str(args.epochs), "--num-cpus", str(args.num_cpus), *args.stack_args.split()]
    cmd += ["--threads-per-worker", str(args.threads)] if args.threads else []
    found = reused(saved, " ".join(cmd), args)
    if found:
        return found, {"": run_dir / "model", "_final": Path(found.pop("final_model"))}
    if args.reuse and (run_dir / "run.json").exists():
        # Finished by hand: `charrnn train --resume --out RUN` (exactly the uninterrupted run's steps)
        print(f"[bench] quality: reused {run_dir}, trained apart from this script", file=sys.stderr, flush=True)
        return stack_result(run_dir, cmd, None, None)
    busy = foreign_cores(f"quality: stack, {args.epochs} epochs", args.quiet_wait)
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
              "best_own_val_loss": round(best["val_loss"], 4), "process_s": wall and round(wall, 1),
              "foreign_cores": busy,
              "precision": next((r["precision"] for r in records if "precision" in r), "fp32"), "cmd": " ".join(cmd),
              "sessions": [r for r in records if r.get("event") in ("precision", "resumed")]}
    return result, {"": run_dir / "model", "_final": done[max(done)] / "model"}


def quality_stack_minutes(cfg: dict, data: Path, work: Path, args) -> tuple[dict, dict]:
    """`charrnn train` stopped once its loop has run the budget from the start of step 1, scored on
    its last checkpoint inside the budget (one every 10 steps)."""
    budget = args.minutes * 60
    busy = foreign_cores(f"quality: stack, {args.minutes} min", args.quiet_wait)
    run_dir, log, tokens = work / "stack-run", work / "stack.log", cfg["batch"] * cfg["seq"]
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = stack_cmd(cfg, data, run_dir, BIG, args, checkpoint_every=10) + args.stack_args.split()
    tail = MetricsTail(run_dir / "metrics.jsonl")

    def elapsed(record: dict) -> float:  # seconds from the start of step 1 to the end of this step
        first = tail.steps[0]
        return record["seen"] - first["seen"] + first["step"] * tokens / first["chars_per_s"]

    def over_budget(sid: int) -> bool:
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
    Returns ({"baseline": loss, key: loss for each of model_dirs}, how many characters were scored
    and left out)."""
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
        losses[key] = held_out_loss(lambda x, s: model(x[None], s), stack_ids, keep)
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


def parity(name: str, args) -> dict:
    """The stack at fp32 and at bf16 from the same seed, --parity-steps steps each on the first 90%
    of the corpus, both scored on the last 10%: what bf16 costs in quality (issue 14: within 0.02)."""
    cfg, work = CONFIGS[name], args.work / "quality"
    text, split, data = first_90(work, args)
    out, model_dirs = {"config": name, **cfg, "steps": args.parity_steps}, {}
    for precision in ("fp32", "bf16"):
        run_dir, log = work / f"parity-{precision}", work / f"parity-{precision}.log"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = stack_cmd(cfg, data, run_dir, args.parity_steps, args, checkpoint_every=args.parity_steps,
                        precision=precision)
        busy = foreign_cores(f"parity: stack {precision}, {args.parity_steps} steps", args.quiet_wait)
        wall = run_ok(f"charrnn train ({precision})", [sys.executable, "-m", *cmd], log)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r and "step" in r]
        out[precision] = {"train_loss": round(steps[-1]["loss"], 4), "chars_per_s": round(steps[-1]["chars_per_s"]),
                          "process_s": round(wall, 1), "foreign_cores": busy, "cmd": " ".join(cmd)}
        model_dirs[precision] = checkpoint_dirs(run_dir)[args.parity_steps] / "model"
    print("[bench] parity: scoring ...", file=sys.stderr, flush=True)
    losses, out["held_out"] = held_out_losses(text[split:], [], cfg, None, model_dirs, data, args.threads)
    out["held_out"]["text"] = HELD_OUT.format(args.corpus.name)
    for precision, loss in losses.items():
        out[precision]["held_out_loss"] = loss
    difference = losses["bf16"] - losses["fp32"]
    out.update(bf16_minus_fp32=round(difference, 4), target=0.02, target_met=abs(difference) <= 0.02)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(ap)
    add = ap.add_argument
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="compare after this much training-loop time each")
    budget.add_argument("--epochs", type=float, help="... or after this many epochs each (the recipe's 20)")
    budget.add_argument("--parity-steps", type=int,
                        help="... or the stack's bf16 against its fp32 after this many steps")
    add("--stack-args", default="", help="more `charrnn train` options for the stack's run, e.g. a recipe")
    add("--side", choices=["both", "baseline", "stack"], default="both",
        help="run one side only (its result is saved in --work; default both, scored)")
    add("--reuse", action="store_true", help="take a side that ran in --work with the same command from there")
    add("--config", choices=CONFIGS, default="seed", help="the network and batch (small: a smoke test)")
    args = ap.parse_args()
    if min(v for v in (args.minutes, args.epochs, args.parity_steps) if v is not None) <= 0:
        ap.error("the budget must be positive")
    started = time.time()
    prepare_run(args)
    report = {"machine": machine(), "corpus": str(args.corpus)}
    if args.parity_steps:
        report["parity"] = parity(args.config, args)
    else:
        report["quality"] = quality(args.config, args)
    finish_report(report, started)


if __name__ == "__main__":
    main()
