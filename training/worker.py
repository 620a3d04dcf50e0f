"""What each Ray Train worker runs: stream its shard of the runs, train, evaluate, checkpoint.

Rank 0 alone writes files (metrics.jsonl, the best model folder, checkpoints); every rank takes
part in the collectives (DDP's gradient all-reduce, the loss and validation all-reduces) and in
each ray.train.report, so all ranks stop at the same step."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from training.config import TrainConfig
from training.step import evaluate, make_optimizer, train_step
from training.run_folder import MetricsLog, RunFolder
from training.tasks import TASKS
from training.windows import EpochStream, windows

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"


def runs_of(dataset, rank: int, world: int, task):
    """This rank's runs (global run number % world == rank) in one pass over the dataset, as numpy
    arrays read by the task from Arrow.

    Every rank streams the dataset on its own and keeps its share, rather than using Ray Data's
    streaming_split: the split's iterators meet at a barrier at each epoch start, and ranks
    whose runs differ in length reach their epoch's end at different steps while DDP holds them
    in lockstep, which would deadlock. Reading is cheap next to training, so the extra reads
    cost nothing that shows."""
    for table in dataset.iter_batches(batch_size=64, batch_format="pyarrow", prefetch_batches=2):
        mine = np.asarray(table["run"]) % world == rank
        yield from task.runs(table.filter(mine))


def train_loop_per_worker(job: dict) -> None:
    config = TrainConfig.from_json(job["train"])
    task = TASKS[job["task"]](job)
    run_dir = RunFolder(job["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job["threads"])
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    device = ray.train.torch.get_device()

    model = task.build()
    optimizer, scheduler = make_optimizer(model, config.lr, config.lr_schedule, job["total_steps"])
    position = {"step": 0, "epoch": 0, "taken": 0, "best_val_loss": math.inf}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            position = _restore(folder, task, model, optimizer, scheduler)
        _log(rank, f"resumed from step {position['step']} (epoch {position['epoch']})")
    metrics_log = MetricsLog(run_dir) if rank == 0 else None
    if checkpoint and rank == 0:
        metrics_log.truncate(position["step"])
        metrics_log.append({"event": "resumed", "step": position["step"]})
    torch.manual_seed(config.seed + 1000 * (rank + 1) + position["step"])  # dropout masks differ per rank
    ddp_model = ray.train.torch.prepare_model(model)
    module = ddp_model.module if hasattr(ddp_model, "module") else ddp_model

    train_shard = ray.train.get_dataset_shard("train")
    val_runs = validation_runs(ray.train.get_dataset_shard("validation"), config, rank, world, task)
    stream = EpochStream(lambda epoch: runs_of(train_shard, rank, world, task), position["epoch"], position["taken"])
    lanes, seq = config.lanes_per_worker, config.seq
    state = module.init_state(lanes)
    step, best = position["step"], position["best_val_loss"]
    points_per_step = config.batch * seq
    train_seconds, last_epoch = 0.0, stream.epoch
    steps_this_session = 0

    deadline = time.monotonic() + 60 * config.max_minutes if config.max_minutes else None
    for window in windows(stream, lanes, seq):
        step_started = time.perf_counter()
        loss, grad_norm, state = train_step(ddp_model, optimizer, scheduler, window, state, config.clip, device)
        step += 1
        steps_this_session += 1
        over_time = deadline is not None and time.monotonic() > deadline
        loss_value, epoch_ended, over_time = _agree(loss, stream.epoch != last_epoch, over_time, world=world, device=device)
        last_epoch = stream.epoch
        diverged = not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)) or task.diverged(loss_value)
        if diverged:
            _log(rank, f"step {step}: loss {loss_value:.4g}, stopping: the training diverged")
            if rank == 0:  # the driver reads it there: Train's result holds only checkpointed reports
                metrics_log.append({"event": "diverged", "step": step, "loss": _json_number(loss_value)})
                metrics_log.flush()
            return
        record = {"step": step, "epoch": round(step * points_per_step / job["train_points"], 4),
                  "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
        train_seconds += time.perf_counter() - step_started
        per_s = steps_this_session * points_per_step / train_seconds
        record[f"{task.unit}_per_s"] = per_s
        done = step >= job["total_steps"] or over_time
        if step % config.val_every == 0 or epoch_ended or done:
            val_loss = _validate(module, val_runs, config, device, world)
            record.update(task.val_metrics(val_loss))
            if val_loss < best:
                best = val_loss
                if rank == 0:
                    info = {"step": step, **task.val_metrics(val_loss)}
                    run_dir.save_folder("model", lambda path: task.save(module, path, info=info))
        if rank == 0:
            metrics_log.append(record)
            if step % config.log_every == 0 or "val_loss" in record:
                eta = (job["total_steps"] - step) * train_seconds / steps_this_session
                if deadline is not None:
                    eta = max(0.0, min(eta, deadline - time.monotonic()))
                val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
                _log(rank, f"step {step}/{job['total_steps']} loss {loss_value:.4f}{val} "
                           f"{per_s:,.0f} {task.unit}/s ETA {eta / 60:.1f} min")
        checkpointing = step % config.checkpoint_every == 0 or done
        if rank == 0 and (checkpointing or "val_loss" in record):
            metrics_log.flush()
        if checkpointing:
            position = {"step": step, "epoch": stream.epoch, "taken": stream.taken, "best_val_loss": best}
            _report_with_checkpoint(rank, record, module, task, optimizer, scheduler, position)
        if done:
            return


def validation_runs(val_shard, config: TrainConfig, rank: int, world: int, task) -> list[np.ndarray]:
    """This rank's share of the validation runs, at most val_max_tokens / world points: read once
    and kept, since a bounded set is cheaper to hold than to stream again at every evaluation."""
    budget, used, kept = config.val_max_tokens // world, 0, []
    for run in runs_of(val_shard, rank, world, task):
        if used >= budget:
            break
        kept.append(np.array(run[: budget - used + 1]))
        used += len(kept[-1]) - 1
    return kept


def _validate(module, val_runs: list[np.ndarray], config: TrainConfig, device, world: int) -> float:
    """Mean validation loss over every rank's share."""
    total, count = evaluate(module, windows(val_runs, config.lanes_per_worker, config.seq), device)
    sums = torch.tensor([total, float(count)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    return float(sums[0] / max(sums[1], 1.0))


def _agree(loss: torch.Tensor, *flags: bool, world: int, device) -> tuple:
    """(mean loss over ranks, each flag true on every rank if it is on any rank), in one all-reduce
    per step. Ranks must agree on when to validate and when to stop: each rank's stream reaches its
    epoch's end at its own step, and a rank that validated while another took a training step
    would cross their collectives (gloo aborts on the size mismatch)."""
    values = torch.tensor([float(loss), *map(float, flags)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(values)
    return (float(values[0]) / world, *(bool(v > 0) for v in values[1:].tolist()))


def _report_with_checkpoint(rank, record, module, task, optimizer, scheduler, position) -> None:
    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        task.save(module, os.path.join(folder, "model"), info={"step": position["step"]})
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   os.path.join(folder, OPTIMIZER))
        Path(folder, TRAINER_STATE).write_text(json.dumps({**position, "best_val_loss": _json_number(position["best_val_loss"])}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint-{position['step']:09d}")


def _restore(folder: str, task, model, optimizer, scheduler) -> dict:
    model.load_state_dict(task.load_state(os.path.join(folder, "model")))
    # weights_only: the optimizer state is tensors and numbers; nothing in it may run code.
    saved = torch.load(os.path.join(folder, OPTIMIZER), weights_only=True, map_location="cpu")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    position = json.loads(Path(folder, TRAINER_STATE).read_text())
    if position["best_val_loss"] is None:
        position["best_val_loss"] = math.inf
    return position


def _json_number(value: float):
    return value if math.isfinite(value) else None


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[train] {message}", flush=True)
