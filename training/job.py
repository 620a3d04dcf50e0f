"""What the driver hands every Ray Train worker (Job), and where a run stands (Position)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from training.config import TrainConfig


@dataclass(frozen=True)
class Job:
    """One training run as each worker sees it. It travels as TorchTrainer's train_loop_config,
    which Ray Train takes as a dict: to_dict() makes one of plain values, from_dict() reads it back."""

    config: TrainConfig
    spec: dict  # what the task's class (training.tasks) is built from: the model's JSON and its vocabulary or series
    train_points: int  # points in the training split: the fraction of an epoch each step is
    data: str  # the prepared dataset's location
    run_dir: str  # the run folder's location (run_folder.py)
    total_steps: int
    threads: int  # torch threads per worker
    verbose: bool  # Ray Train's and Ray Data's own log lines too

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict) -> "Job":
        return cls(**{**obj, "config": TrainConfig.from_json(obj["config"])})


@dataclass
class Position:
    """Where a run stands: rank 0 saves it in each checkpoint's trainer_state.json (checkpoint.py),
    whose keys are these fields in this order."""

    step: int = 0
    epoch: int = 0  # rank 0's data position: the epoch, and the runs its stream took in it
    taken: int = 0
    world: Optional[int] = None  # the number of workers that saved it; None: a fresh start
    best_val_loss: float = math.inf

    def taken_by_one_of(self, world: int) -> int:
        """Rank 0's count of runs taken, scaled to one rank's share among `world` ranks: where a
        rank resumes whose own lanes were not saved (a fresh start, or another number of workers)."""
        return self.taken * (self.world or world) // world
