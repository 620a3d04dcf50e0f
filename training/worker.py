"""What each Ray Train worker runs: stream its share of the runs, train, evaluate, checkpoint.

Rank 0 alone writes the run folder (metrics.jsonl, the best model folder, the trainer state of each
checkpoint); every rank takes part in the collectives (DDP's gradient all-reduce, the per-step
agreement, the validation all-reduce), saves its own data position into each checkpoint and calls
each ray.train.report, so all ranks stop at the same step."""
from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from training.checkpoint import load_lanes, restore_trainer, save_lanes, save_trainer
from training.console import quiet_ray_logs
from training.job import Job, Position
from training.order import epoch_runs, validation_runs
from training.run_folder import MetricsLog, RunFolder
from training.step import choose_training_precision, evaluate, keep_freed_memory, make_optimizer, train_step
from training.tasks import TASKS
from training.tensorboard import TensorBoardLog
from training.windows import EpochStream, Lanes, windows


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point on each worker; `loop_config` is the driver's Job.to_dict()."""
    _Worker(Job.from_dict(loop_config)).train()


@dataclass
class _Pace:
    """This session's training time (a resumed run's starts anew): the throughput and ETA in the
    log, and the --max-minutes deadline."""

    deadline: Optional[float]  # time.monotonic() past which the run stops
    seconds: float = 0.0  # in training steps: evaluations and checkpoints left out
    steps: int = 0

    def over_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def eta(self, steps_left: int) -> float:
        eta = steps_left * self.seconds / self.steps
        if self.deadline is not None:
            eta = max(0.0, min(eta, self.deadline - time.monotonic()))
        return eta


class _Worker:
    """One rank's training: restore, then for each window step, validate and save, report; until
    the job's last step or --max-minutes, at the same step on every rank, or divergence."""

    def __init__(self, job: Job):
        self.job, self.config = job, job.config
        self.task = TASKS[job.config.task](job.spec)
        self.run_dir = RunFolder(job.run_dir)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        torch.set_num_threads(job.threads)
        keep_freed_memory()
        if not job.verbose:
            quiet_ray_logs()
        torch.manual_seed(self.config.seed)  # the same initial weights on every rank
        self.device = ray.train.torch.get_device()
        model = self.task.build()
        self.optimizer, self.scheduler = make_optimizer(model, self.config.lr, self.config.lr_schedule,
                                                        job.total_steps)
        self.metrics_log = MetricsLog(self.run_dir) if self.rank == 0 else None
        self.position, saved_lanes = self._restore(model)
        self.tensorboard = (TensorBoardLog(self.config.tensorboard, self.position.step, bits=self.task.name == "text")
                            if self.rank == 0 and self.config.tensorboard else None)
        self.ddp_model = ray.train.torch.prepare_model(model)
        self.module = self.ddp_model.module if hasattr(self.ddp_model, "module") else self.ddp_model
        first = self._open_data(saved_lanes)
        self.precision = _agree_precision(self.config.precision, self.module, first, self.state, self.device,
                                          self.world, self.rank, self.metrics_log)

    def _restore(self, model) -> tuple[Position, Optional[dict]]:
        """The position of the latest checkpoint (a restart or --resume), with this rank's saved
        lanes if it has them, or a fresh start's. Rank 0 drops the records of the steps to run again."""
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return Position(), None
        with checkpoint.as_directory() as folder:
            position = restore_trainer(folder, self.task, model, self.optimizer, self.scheduler)
            saved_lanes = load_lanes(folder, self.rank, self.world, self.device)
        _log(self.rank, f"resumed from step {position.step} (epoch {position.epoch})")
        if self.rank == 0:
            self.metrics_log.truncate(position.step)
            self.metrics_log.append({"event": "resumed", "step": position.step})
        return position, saved_lanes

    def _open_data(self, saved_lanes: Optional[dict]):
        """This rank's validation runs and its walk over the training runs from the saved data
        position; returns the walk's first window."""
        config, task, rank, world = self.config, self.task, self.rank, self.world
        dataset = task.open(self.job.data)
        self.val_runs = validation_runs(dataset, task, rank, world, config.val_max_tokens)
        shuffle_buffer = config.shuffle_buffer if config.shuffle else 0
        if saved_lanes:
            epoch, taken = saved_lanes["epoch"], saved_lanes["taken"]
        else:
            epoch, taken = self.position.epoch, self.position.taken_by_one_of(world)
        self.stream = EpochStream(lambda e: epoch_runs(dataset, task, e, rank, world, config.seed, shuffle_buffer),
                                  epoch, taken)
        self.lanes = Lanes(self.stream, config.lanes_per_worker, config.seq, saved_lanes and saved_lanes["remainders"])
        self.state = saved_lanes["state"] if saved_lanes else self.module.init_state(config.lanes_per_worker)
        # Read before the first window, which may already cross into the next epoch.
        batches, self.last_epoch = iter(self.lanes), self.stream.epoch
        first = next(batches, None)
        if first is None:
            raise ValueError(f"{self.job.data} has no training run of two or more points")
        self.batches = itertools.chain([first], batches)
        return first

    def train(self) -> None:
        """Steps until done (every rank stops at the same step), or until the training diverges."""
        try:
            self._steps()
        finally:
            if self.tensorboard:
                self.tensorboard.close()

    def _steps(self) -> None:
        config, position = self.config, self.position
        # --max-minutes counts the loop alone, not the setup before it.
        self.pace = _Pace(time.monotonic() + 60 * config.max_minutes if config.max_minutes else None)
        for window in self.batches:
            started = time.perf_counter()
            loss, grad_norm, epoch_ended, over_time = self._step(window)
            if self._diverged(loss, grad_norm):
                return
            self.pace.seconds += time.perf_counter() - started
            record = self._record(loss, grad_norm)
            done = position.step >= self.job.total_steps or over_time
            if position.step % config.val_every == 0 or epoch_ended or done:
                self._validate(record)
            self._report(record, done)
            if done:
                return

    def _step(self, window) -> tuple[float, float, bool, bool]:
        """One training step, then every rank's agreement: (the mean loss, this rank's gradient
        norm, whether any rank's epoch ended, whether any rank is past --max-minutes)."""
        # Dropout masks: the same on resume.
        torch.manual_seed(step_seed(self.config.seed, self.rank, self.position.step))
        loss, grad_norm, self.state = train_step(self.ddp_model, self.optimizer, self.scheduler, window, self.state,
                                                 self.config.clip, self.device, self.precision)
        self.position.step += 1
        self.pace.steps += 1
        loss_value, epoch_ended, over_time = _agree(loss, self.stream.epoch != self.last_epoch, self.pace.over_time(),
                                                    world=self.world, device=self.device)
        self.last_epoch = self.stream.epoch
        return loss_value, float(grad_norm), epoch_ended, over_time

    def _record(self, loss: float, grad_norm: float) -> dict:
        """The step's line in metrics.jsonl."""
        step, points_per_step = self.position.step, self.config.batch * self.config.seq
        return {"step": step, "epoch": round(step * points_per_step / self.job.train_points, 4), "loss": loss,
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                f"{self.task.unit}_per_s": self.pace.steps * points_per_step / self.pace.seconds}

    def _validate(self, record: dict) -> None:
        """Adds the validation figures to `record`; rank 0 saves the model if it is the best yet."""
        total, count = evaluate(self.module, windows(self.val_runs, self.config.lanes_per_worker, self.config.seq),
                                self.device, precision=self.precision)
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)  # NCCL: on the GPU
        if self.world > 1:
            dist.all_reduce(sums)
        val_loss = float(sums[0] / max(sums[1], 1.0))
        record.update(self.task.val_metrics(val_loss))
        if val_loss < self.position.best_val_loss and self.rank == 0:
            info = {"step": record["step"], **self.task.val_metrics(val_loss)}
            self.run_dir.save_folder("model", lambda path: self.task.save(self.module, path, info=info))
            record["best"] = True
        self.position.best_val_loss = min(self.position.best_val_loss, val_loss)

    def _report(self, record: dict, done: bool) -> None:
        """Rank 0 logs the step; every rank checkpoints every --checkpoint-every steps and at the end,
        and reports to Ray Train every --log-every steps and at evaluations (Result.metrics and Ray
        Train's UserCallbacks see these; each report waits for every rank, so not at every step)."""
        checkpointing = record["step"] % self.config.checkpoint_every == 0 or done
        if self.rank == 0:
            self._log_step(record)
            if checkpointing or "val_loss" in record:
                self.metrics_log.flush()
                if self.tensorboard:
                    self.tensorboard.flush()
        if checkpointing:
            self._checkpoint(record)
        elif record["step"] % self.config.log_every == 0 or "val_loss" in record:
            ray.train.report(_numbers(record))

    def _log_step(self, record: dict) -> None:
        self.metrics_log.append(record)
        if self.tensorboard:
            self.tensorboard.add(record)
        step = record["step"]
        if step % self.config.log_every and "val_loss" not in record:
            return
        eta = self.pace.eta(self.job.total_steps - step)
        val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
        val += " (best: model saved)" if record.get("best") else ""
        unit = self.task.unit
        _log(0, f"step {step}/{self.job.total_steps} loss {record['loss']:.4f}{val} "
                f"{record[f'{unit}_per_s']:,.0f} {unit}/s ETA {eta / 60:.1f} min")

    def _diverged(self, loss: float, grad_norm: float) -> bool:
        """Whether the step's loss or gradients blew up; if so the run stops, and says why."""
        if math.isfinite(loss) and math.isfinite(grad_norm) and not self.task.diverged(loss):
            return False
        step = self.position.step
        _log(self.rank, f"step {step}: loss {loss:.4g}, stopping: the training diverged")
        if self.rank == 0:  # the driver reads it there: Train's result holds only checkpointed reports
            self.metrics_log.append({"event": "diverged", "step": step, "loss": loss if math.isfinite(loss) else None})
            self.metrics_log.flush()
        return True

    def _checkpoint(self, record: dict) -> None:
        """Every rank saves its lanes, rank 0 the model, optimizer and position; all report."""
        stream, position = self.stream, self.position
        # The stream counts the data position as it goes; the saved position takes it as of now.
        position.epoch, position.taken, position.world = stream.epoch, stream.taken, self.world
        metrics = _numbers(record)
        with tempfile.TemporaryDirectory() as folder:
            save_lanes(folder, self.rank, self.world, stream.epoch, stream.taken, self.lanes.remainders(), self.state)
            if self.rank == 0:
                save_trainer(folder, self.task, self.module, self.optimizer, self.scheduler, position)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"checkpoint-{position.step:09d}")
        _log(self.rank, f"checkpoint at step {position.step}")


def _numbers(record: dict) -> dict:
    """A step record's figures, as Ray Train takes them."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def step_seed(seed: int, rank: int, step: int) -> int:
    """The random seed of one rank's step: dropout masks differ between ranks and steps, and a
    resumed run draws the masks the uninterrupted one drew."""
    return (seed * 1_000_003 + rank * 100_000_007 + step) % 2**63


def _agree_precision(requested, module, window, state, device, world, rank, metrics_log) -> str:
    """One precision for every rank: bf16 only if every rank chose it."""
    precision, why = choose_training_precision(requested, module, window, state, device)
    if world > 1:
        flag = torch.tensor([1.0 if precision == "bf16" else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if precision == "bf16" and flag.item() == 0:
            precision, why = "fp32", f"{why}; fp32 on every worker, since another one chose it"
    _log(rank, f"precision {precision}: {why}")
    if rank == 0:
        metrics_log.append({"event": "precision", "precision": precision, "why": why})
    return precision


def _agree(loss: torch.Tensor, *flags: bool, world: int, device) -> tuple:
    """(mean loss over ranks, each flag true on every rank if it is on any rank), in one all-reduce
    per step. Ranks must agree on when to validate and when to stop: each rank's stream reaches its
    epoch's end at its own step, and a rank that validated while another took a training step
    would cross their collectives (gloo aborts on the size mismatch)."""
    values = torch.tensor([float(loss), *map(float, flags)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(values)
    return (float(values[0]) / world, *(bool(v > 0) for v in values[1:].tolist()))


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[train] {message}", flush=True)
