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

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from training.checkpoint import load_lanes, restore_trainer, save_lanes, save_trainer
from training.config import TrainConfig
from training.console import quiet_ray_logs
from training.order import epoch_runs, validation_runs
from training.run_folder import MetricsLog, RunFolder
from training.step import choose_precision, evaluate, keep_freed_memory, make_optimizer, train_step
from training.tasks import TASKS
from training.windows import EpochStream, Lanes, windows


def train_loop_per_worker(job: dict) -> None:
    config = TrainConfig.from_json(job["train"])
    task = TASKS[job["task"]](job)
    run_dir = RunFolder(job["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job["threads"])
    keep_freed_memory()
    if not job["verbose"]:
        quiet_ray_logs()
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    device = ray.train.torch.get_device()

    model = task.build()
    optimizer, scheduler = make_optimizer(model, config.lr, config.lr_schedule, job["total_steps"])
    position, saved_lanes = {"step": 0, "epoch": 0, "taken": 0, "best_val_loss": math.inf}, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            position = restore_trainer(folder, task, model, optimizer, scheduler)
            saved_lanes = load_lanes(folder, rank, world, device)
        _log(rank, f"resumed from step {position['step']} (epoch {position['epoch']})")
    metrics_log = MetricsLog(run_dir) if rank == 0 else None
    if checkpoint and rank == 0:
        metrics_log.truncate(position["step"])
        metrics_log.append({"event": "resumed", "step": position["step"]})
    ddp_model = ray.train.torch.prepare_model(model)
    module = ddp_model.module if hasattr(ddp_model, "module") else ddp_model

    dataset = task.open(job["data"])
    val_runs = validation_runs(dataset, task, rank, world, config.val_max_tokens)
    shuffle_buffer = config.shuffle_buffer if config.shuffle else 0
    if saved_lanes:
        epoch, taken = saved_lanes["epoch"], saved_lanes["taken"]
    else:  # none, or saved by another number of workers: rank 0's count, scaled to this share
        epoch, taken = position["epoch"], position["taken"] * position.get("world", world) // world
    stream = EpochStream(lambda e: epoch_runs(dataset, task, e, rank, world, config.seed, shuffle_buffer), epoch, taken)
    lanes = Lanes(stream, config.lanes_per_worker, config.seq, saved_lanes and saved_lanes["remainders"])
    state = saved_lanes["state"] if saved_lanes else module.init_state(config.lanes_per_worker)
    batches, start_epoch = iter(lanes), stream.epoch  # the first window may already cross into the next epoch
    first = next(batches, None)
    if first is None:
        raise ValueError(f"{job['data']} has no training run of two or more points")
    precision = _agree_precision(config.precision, module, first, state, device, world, rank, metrics_log)
    loop = _Loop(job, config, task, run_dir, rank, world, device, precision, metrics_log)
    loop.run(ddp_model, module, optimizer, scheduler, itertools.chain([first], batches), lanes, stream, start_epoch, state,
             position, val_runs)


class _Loop:
    """The training loop of one worker: step, agree, validate and save, log, checkpoint."""

    def __init__(self, job, config: TrainConfig, task, run_dir, rank, world, device, precision, metrics_log):
        self.job, self.config, self.task, self.run_dir = job, config, task, run_dir
        self.rank, self.world, self.device, self.precision = rank, world, device, precision
        self.metrics_log = metrics_log
        self.points_per_step = config.batch * config.seq

    def run(self, ddp_model, module, optimizer, scheduler, batches, lanes, stream, last_epoch, state, position,
            val_runs):
        config, job, rank = self.config, self.job, self.rank
        step, best = position["step"], position["best_val_loss"]
        train_seconds, steps_this_session = 0.0, 0
        deadline = time.monotonic() + 60 * config.max_minutes if config.max_minutes else None
        for window in batches:
            step_started = time.perf_counter()
            torch.manual_seed(step_seed(config.seed, rank, step))  # dropout masks: the same on resume
            loss, grad_norm, state = train_step(ddp_model, optimizer, scheduler, window, state, config.clip,
                                                self.device, self.precision)
            step += 1
            steps_this_session += 1
            over_time = deadline is not None and time.monotonic() > deadline
            loss_value, epoch_ended, over_time = _agree(loss, stream.epoch != last_epoch, over_time,
                                                        world=self.world, device=self.device)
            last_epoch = stream.epoch
            if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)) or self.task.diverged(loss_value):
                self._diverged(step, loss_value)
                return
            train_seconds += time.perf_counter() - step_started
            per_s = steps_this_session * self.points_per_step / train_seconds
            record = {"step": step, "epoch": round(step * self.points_per_step / job["train_points"], 4),
                      "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      f"{self.task.unit}_per_s": per_s}
            done = step >= job["total_steps"] or over_time
            if step % config.val_every == 0 or epoch_ended or done:
                best = self._validate(module, val_runs, record, best)
            if rank == 0:
                self._log_step(record, train_seconds / steps_this_session, deadline)
            checkpointing = step % config.checkpoint_every == 0 or done
            if rank == 0 and (checkpointing or "val_loss" in record):
                self.metrics_log.flush()
            if checkpointing:
                position = {"step": step, "epoch": stream.epoch, "taken": stream.taken, "world": self.world,
                            "best_val_loss": best}
                self._checkpoint(record, module, optimizer, scheduler, position, lanes, stream, state)
            if done:
                return

    def _validate(self, module, val_runs, record: dict, best: float) -> float:
        """Adds the validation figures to `record`; rank 0 saves the model if it is the best yet."""
        total, count = evaluate(module, windows(val_runs, self.config.lanes_per_worker, self.config.seq), self.device,
                                precision=self.precision)
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)  # NCCL: on the GPU
        if self.world > 1:
            dist.all_reduce(sums)
        val_loss = float(sums[0] / max(sums[1], 1.0))
        record.update(self.task.val_metrics(val_loss))
        if val_loss < best and self.rank == 0:
            info = {"step": record["step"], **self.task.val_metrics(val_loss)}
            self.run_dir.save_folder("model", lambda path: self.task.save(module, path, info=info))
            record["best"] = True
        return min(best, val_loss)

    def _log_step(self, record: dict, seconds_per_step: float, deadline) -> None:
        self.metrics_log.append(record)
        step = record["step"]
        if step % self.config.log_every and "val_loss" not in record:
            return
        eta = (self.job["total_steps"] - step) * seconds_per_step
        if deadline is not None:
            eta = max(0.0, min(eta, deadline - time.monotonic()))
        val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
        val += " (best: model saved)" if record.get("best") else ""
        unit = self.task.unit
        _log(0, f"step {step}/{self.job['total_steps']} loss {record['loss']:.4f}{val} "
                f"{record[f'{unit}_per_s']:,.0f} {unit}/s ETA {eta / 60:.1f} min")

    def _diverged(self, step: int, loss_value: float) -> None:
        _log(self.rank, f"step {step}: loss {loss_value:.4g}, stopping: the training diverged")
        if self.rank == 0:  # the driver reads it there: Train's result holds only checkpointed reports
            self.metrics_log.append({"event": "diverged", "step": step,
                                     "loss": loss_value if math.isfinite(loss_value) else None})
            self.metrics_log.flush()

    def _checkpoint(self, record, module, optimizer, scheduler, position, lanes, stream, state) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory() as folder:
            save_lanes(folder, self.rank, self.world, stream.epoch, stream.taken, lanes.remainders(), state)
            if self.rank == 0:
                save_trainer(folder, self.task, module, optimizer, scheduler, position)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"checkpoint-{position['step']:09d}")
        _log(self.rank, f"checkpoint at step {position['step']}")


def step_seed(seed: int, rank: int, step: int) -> int:
    """The random seed of one rank's step: dropout masks differ between ranks and steps, and a
    resumed run draws the masks the uninterrupted one drew."""
    return (seed * 1_000_003 + rank * 100_000_007 + step) % 2**63


def _agree_precision(requested, module, window, state, device, world, rank, metrics_log) -> str:
    """One precision for every rank: bf16 only if every rank chose it."""
    precision, why = choose_precision(requested, module, window, state, device)
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
