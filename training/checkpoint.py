"""What a training checkpoint holds, written by the workers and read back on resume or restart.

  model/                  rank 0: the weights (a model folder: safetensors + JSON)
  optimizer.pt            rank 0: Adam's and the scheduler's state (loaded with weights_only=True)
  trainer_state.json      rank 0: step, epoch, runs taken in the epoch, best validation loss
  lanes-rank{R}.safetensors
                          every rank: what each of its lanes has yet to feed and the recurrent
                          state it carries, so a resumed run makes exactly the windows and states
                          the uninterrupted one would have made

Ray Train merges every rank's files into one checkpoint folder."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from training.job import Position

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
LANES_FORMAT = "charrnn-lanes"


def lanes_file(rank: int) -> str:
    return f"lanes-rank{rank}.safetensors"


def save_lanes(folder: str, rank: int, world: int, epoch: int, taken: int, remainders: list, state) -> None:
    """This rank's data position: its stream's (epoch, runs taken), each lane's remaining points
    (None: it takes a new run next) and the state after the step."""
    kept = [r for r in remainders if r is not None]
    points = np.concatenate(kept) if kept else np.empty(0, np.uint8)
    lengths = np.array([0 if r is None else len(r) for r in remainders], np.int64)
    tensors = {"points": np.ascontiguousarray(points), "lengths": lengths}
    parts = state if isinstance(state, tuple) else (state,)
    for i, part in enumerate(parts):
        tensors[f"state.{i}"] = part.detach().float().cpu().numpy()
    save_file(tensors, os.path.join(folder, lanes_file(rank)),
              metadata={"format": LANES_FORMAT, "version": "1", "world": str(world), "epoch": str(epoch),
                        "taken": str(taken)})


def load_lanes(folder: str, rank: int, world: int, device) -> dict | None:
    """{epoch, taken, remainders, state} as this rank saved them, or None when the checkpoint has
    none for it (one written by a different number of workers)."""
    path = os.path.join(folder, lanes_file(rank))
    if not os.path.exists(path):
        return None
    with safe_open(path, "np") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != LANES_FORMAT or metadata.get("world") != str(world):
        return None
    tensors = load_file(path)
    ends = np.cumsum(tensors["lengths"])
    remainders = [tensors["points"][end - length:end] for end, length in zip(ends, tensors["lengths"])]
    # float32 whatever the run computed in: exact for a bf16 state, which bf16 autocast casts back,
    # and what float32 computation needs if --precision changed on resume.
    parts = [torch.from_numpy(tensors[f"state.{i}"].copy()).to(device) for i in range(2) if f"state.{i}" in tensors]
    return {"epoch": int(metadata["epoch"]), "taken": int(metadata["taken"]), "remainders": remainders,
            "state": tuple(parts) if len(parts) == 2 else parts[0]}


def save_trainer(folder: str, task, module, optimizer, scheduler, position: Position) -> None:
    task.save(module, os.path.join(folder, "model"), info={"step": position.step})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(folder, OPTIMIZER))
    best = position.best_val_loss
    Path(folder, TRAINER_STATE).write_text(
        json.dumps({**asdict(position), "best_val_loss": best if math.isfinite(best) else None}))


def restore_trainer(folder: str, task, model, optimizer, scheduler) -> Position:
    """Loads the weights and the optimizer and scheduler state; returns the position."""
    model.load_state_dict(task.load_state(os.path.join(folder, "model")))
    # weights_only: the optimizer state is tensors and numbers; nothing in it may run code.
    saved = torch.load(os.path.join(folder, OPTIMIZER), weights_only=True, map_location="cpu")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    position = json.loads(Path(folder, TRAINER_STATE).read_text())
    if position["best_val_loss"] is None:
        position["best_val_loss"] = math.inf
    return Position(**position)
