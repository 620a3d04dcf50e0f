"""Every training option as plain values, with the classic recipe's defaults."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional


class TrainingError(ValueError):
    """A bad option or run folder: the message is one line naming what is wrong."""


@dataclass(frozen=True)
class TrainConfig:
    task: str = "text"  # or "series": a dataset from prepare-series, models.SeriesRNN, squared error
    # model (see models.ModelConfig and models.SeriesConfig)
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 512
    dropout: float = 0.5
    embedding_dim: Optional[int] = None
    # optimisation
    batch: int = 128  # global: split evenly over the workers (each walks batch/workers text streams)
    seq: int = 100  # characters per window of truncated backpropagation through time
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine" (decays to lr/10 at the last step; needs --max-steps or --epochs)
    clip: float = 5.0
    epochs: Optional[float] = 20.0
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None  # wall-time budget of the training loop, per session (a resume starts anew)
    seed: int = 0
    precision: str = "auto"  # fp32, bf16 (autocast; weights and optimizer state stay fp32), or auto: see step.py
    shuffle: bool = True  # each epoch in its own seeded order (training/order.py); False: corpus order
    shuffle_buffer: int = 1024  # runs drawn from at random, after a per-epoch permutation of the shards
    # evaluation, checkpoints, logging
    val_every: int = 200  # steps; also at each epoch end
    val_max_tokens: int = 2_000_000  # evaluate on at most this many validation tokens
    checkpoint_every: int = 200
    log_every: int = 10
    tensorboard: Optional[str] = None  # a local folder where rank 0 also writes TensorBoard event files
    # placement
    workers: int = 1
    gpu: bool = False
    threads_per_worker: Optional[int] = None  # torch threads; default: this node's CPUs / workers
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails

    def validate(self) -> None:
        positive = ("layers", "hidden", "batch", "seq", "val_every", "val_max_tokens", "checkpoint_every",
                    "log_every", "workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.task not in ("text", "series"):
            raise TrainingError(f"--task must be text or series, got {self.task!r}")
        if self.cell not in ("lstm", "gru", "rnn"):
            raise TrainingError(f"--cell must be lstm, gru or rnn, got {self.cell!r}")
        if not 0 <= self.dropout < 1:
            raise TrainingError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.clip <= 0:
            raise TrainingError("--lr and --clip must be > 0")
        if self.batch % self.workers:
            raise TrainingError(f"--batch {self.batch} is global and must divide evenly over --workers {self.workers}")
        if self.epochs is None and self.max_steps is None:
            raise TrainingError("give --epochs or --max-steps")
        if self.epochs is not None and self.epochs <= 0 or self.max_steps is not None and self.max_steps < 1:
            raise TrainingError("--epochs and --max-steps must be positive")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainingError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainingError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TrainingError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.shuffle_buffer < 1:
            raise TrainingError(f"--shuffle-buffer must be >= 1, got {self.shuffle_buffer}")
        if self.tensorboard is not None and "://" in self.tensorboard:
            raise TrainingError(f"--tensorboard takes a local folder, got {self.tensorboard!r}")
        if self.max_failures < 0:
            raise TrainingError("--max-failures must be >= 0")

    @property
    def lanes_per_worker(self) -> int:
        return self.batch // self.workers

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})
