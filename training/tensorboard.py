"""--tensorboard DIR: rank 0's step records (metrics.jsonl's) as TensorBoard scalars, beside metrics.jsonl."""
from __future__ import annotations

# metrics.jsonl's keys and their TensorBoard tags; throughput's key names the task's unit (chars_per_s, ...).
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "val_loss": "val/loss",
        "val_bpc": "val/bits_per_char"}


class TensorBoardLog:
    def __init__(self, folder: str, resumed_at: int, bits: bool):
        """`bits`: a text task's, whose training loss is also written in bits per character."""
        from tensorboardX import SummaryWriter

        self.bits = bits
        # A resumed run steps again from its checkpoint: the events a crashed session wrote after it are dropped.
        self.writer = SummaryWriter(folder, purge_step=resumed_at + 1 if resumed_at else None)

    def add(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key in TAGS:
                self.writer.add_scalar(TAGS[key], value, step)
            elif key.endswith("_per_s"):
                self.writer.add_scalar(f"throughput/{key}", value, step)
        if "loss" in record and self.bits:
            self.writer.add_scalar("train/bits_per_char", record["loss"] / 0.6931471805599453, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
