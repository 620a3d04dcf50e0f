"""`charrnn train`, the driver: open (or prepare) the data, size the run, start Ray Train's
TorchTrainer with N data-parallel workers, and write the run folder:

  RUN_DIR/model/            the best model so far (lowest validation loss): a model folder
  RUN_DIR/metrics.jsonl     one record per step and evaluation
  RUN_DIR/loss.png          training and validation loss over steps
  RUN_DIR/run.json          the options of the run, for --resume
  RUN_DIR/ray/              Ray Train's checkpoints (model, optimizer, scheduler, step, data position)

RUN_DIR is a local path or a pyarrow.fs URI (run_folder.py); a run on several nodes needs one that
every node reaches.
"""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Callable

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.shards import MANIFEST
from pipeline.text.prepare import prepare
from storage import (absolute_location, check_out_location, is_uri, out_lock, public_location, redact_uris,
                     with_access_of)
from training.config import TrainConfig, TrainingError
from training.console import quiet_ray_logs
from training.job import Job
from training.plot import plot_losses
from training.run_folder import CHECKPOINTS, METRICS, RunFolder, metric_records
from training.tasks import SERIES_DEFAULTS, TASKS
from training.checkpoint import TRAINER_STATE
from training.worker import train_loop_per_worker

RUN_FILE = "run.json"
WORKER_ENV = {
    # Train's print patch would echo each worker line a second time through its logger.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The training loop runs in a thread of the worker, and glibc gives a thread its own arena, whose
    # heaps are at most 64 MB: a bigger activation buffer is then mapped and unmapped at every step,
    # faulting it in afresh (keep_freed_memory cannot help there). One arena, the main one, keeps
    # them (BENCHMARKS.md, session 16: faults per step in the worker).
    "MALLOC_ARENA_MAX": "1",
}
# What --resume may change: how long to train and on what, not the model, the optimiser or the data.
RESUMABLE = {"epochs", "max_steps", "max_minutes", "workers", "gpu", "threads_per_worker", "max_failures", "val_every",
             "val_max_tokens", "checkpoint_every", "log_every", "tensorboard", "precision"}


def is_prepared(data: list[str]) -> bool:
    return len(data) == 1 and (is_uri(data[0]) or (Path(data[0]) / MANIFEST).exists())


def train(data: list[str], out: str, options: dict, resume: bool = False, log: Callable[[str], None] = print,
          before_ray: Callable[[], None] = lambda: None, verbose: bool = False,
          callbacks: list[ray.train.UserCallback] = ()) -> dict:
    """Train with `options` (TrainConfig fields; the rest keep their defaults) and return a summary:
    steps, best validation loss, where the model is. With `resume`, the run in `out` continues
    with its saved options, of which only RESUMABLE ones may be changed. `verbose` shows Ray
    Train's and Ray Data's own progress lines besides this project's. `callbacks`: Ray Train's,
    run by its controller; their after_report sees the metrics every --log-every steps, at each
    evaluation and each checkpoint (where experiment trackers hook in)."""
    if not verbose:
        quiet_ray_logs()
    run_dir = RunFolder(out)
    if not resume:
        check_out_location(run_dir.fs, run_dir.path, out, data)
    with out_lock(run_dir.fs, run_dir.path, out):
        return _train(run_dir, out, data, options, resume, log, before_ray, verbose, list(callbacks))


def _train(run_dir: RunFolder, out: str, data: list[str], options: dict, resume: bool, log: Callable[[str], None],
           before_ray: Callable[[], None], verbose: bool, callbacks: list) -> dict:
    config, data = _options(run_dir, out, data, options, resume, log)
    task = TASKS[config.task]
    dataset = _dataset(run_dir, data, task, log, before_ray)
    run_dir.write_text(RUN_FILE, json.dumps({"data": [public_location(dataset.location)], "train": config.to_json()},
                                            indent=1))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    job = _job(config, task, dataset, run_dir, cpus, verbose, log)
    try:
        result = _fit(_trainer(job, run_dir, cpus, callbacks))
    except ray.train.TrainingFailedError as err:
        raise TrainingError(f"training failed after {config.max_failures} restart(s): {_first_line(err)}") from None
    finally:
        records = _plot(run_dir, task.loss_unit)  # a failed or interrupted run's curve too
    return _summary(run_dir, out, result, records)


def _options(run_dir: RunFolder, out: str, data: list[str], options: dict, resume: bool,
             log: Callable[[str], None]) -> tuple[TrainConfig, list[str]]:
    """The run's options and data: a new run's own, or on --resume the saved ones, of which
    `options` may change the RESUMABLE ones. A new run never lands on an existing one."""
    checkpoint = run_dir.latest_checkpoint_step(TRAINER_STATE)
    saved_text = run_dir.read_text(RUN_FILE)
    if resume:
        if saved_text is None:
            raise TrainingError(f"--resume: {out} holds no run to resume (no {RUN_FILE})")
        options, data = _resumed_options(json.loads(saved_text), options, out)
        if checkpoint is None:
            log(f"--resume: {out} has no checkpoint yet; starting from step 0")
    elif checkpoint is not None or saved_text is not None:
        raise TrainingError(f"{out} already holds a run; use --resume to continue it or choose another --out")
    elif not run_dir.is_empty():
        raise TrainingError(f"--out {out} is a non-empty folder that is not a charrnn run (no {RUN_FILE}); "
                            f"choose a new or empty folder")
    else:
        options = {**(SERIES_DEFAULTS if options.get("task") == "series" else {}), **options}
    config = TrainConfig.from_json(options)
    config.validate()
    return config, data


def _resumed_options(saved: dict, options: dict, out: str) -> tuple[dict, list[str]]:
    """run.json's options updated with `options`, and its data."""
    saved["train"].setdefault("shuffle", False)  # a run begun before shuffling existed walked corpus order
    fixed = sorted(k for k, v in options.items() if k not in RESUMABLE and v != saved["train"].get(k))
    if fixed:
        raise TrainingError(f"--resume cannot change {', '.join(fixed)}; the run keeps its model and data")
    data = [with_access_of(d, out) for d in saved["data"]]  # stored without the query: the --out URI's
    return {**saved["train"], **options}, data


def _dataset(run_dir: RunFolder, data: list[str], task, log: Callable[[str], None], before_ray: Callable[[], None]):
    """The prepared dataset `data` names, or text INPUTs prepared into RUN_DIR/data."""
    if not data:
        inputs = " or text INPUTs" if task.name == "text" else ""
        raise TrainingError(f"--data is required: a prepared dataset folder{inputs}")
    if is_prepared(data):
        dataset = task.open(data[0])
        before_ray()
        return dataset
    if task.name == "series":
        raise TrainingError(f"--task series needs a dataset prepared by charrnn prepare-series; {data[0]} is not one")
    log(redact_uris(f"preparing {' '.join(data)} into {run_dir.uri('data')}"))
    prepare(data, run_dir.uri("data"), log=log, before_ray=before_ray)
    return task.open(run_dir.uri("data"))


def _job(config: TrainConfig, task, dataset, run_dir: RunFolder, cpus: int, verbose: bool,
         log: Callable[[str], None]) -> Job:
    """The run sized: steps per epoch and in all (the fewer of --max-steps and --epochs'), threads."""
    train_points = task.train_points(dataset)
    steps_per_epoch = max(1, train_points // (config.batch * config.seq))
    total_steps = min(s for s in (config.max_steps, config.epochs and math.ceil(config.epochs * steps_per_epoch)) if s)
    log(f"training {config.cell} {config.layers}x{config.hidden} on {train_points:,} {task.unit} "
        f"({steps_per_epoch:,} steps per epoch), {total_steps:,} steps, {config.workers} worker(s), "
        f"batch {config.batch} (global) x seq {config.seq}")
    # Absolute: Ray's workers do not run in this process's folder.
    return Job(config=config, spec=task.spec(dataset, config), train_points=train_points,
               data=absolute_location(dataset.location),
               run_dir=run_dir.location, total_steps=total_steps,
               threads=config.threads_per_worker or max(1, cpus // config.workers), verbose=verbose)


def _trainer(job: Job, run_dir: RunFolder, cpus: int, callbacks: list) -> TorchTrainer:
    config = job.config
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        torch_config=TorchConfig(backend="nccl" if config.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.gpu,
                                               resources_per_worker=_worker_resources(config, cpus)),
        # --resume: a run started again in the same RUN_DIR/ray resumes from Train's own record of its
        # latest checkpoint.
        run_config=ray.train.RunConfig(
            # The folder inside its filesystem, not the URI: Ray keeps no endpoint or key in its records.
            name=CHECKPOINTS, storage_path=run_dir.path, storage_filesystem=None if run_dir.is_local else run_dir.fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": WORKER_ENV},
            callbacks=callbacks,
            # Ray Train's lines at every report and checkpoint: with --verbose only.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if job.verbose else "WARNING"),
        ),
    )


def _plot(run_dir: RunFolder, loss_unit: str) -> list[dict]:
    """RUN_DIR/loss.png from metrics.jsonl, whose records it returns."""
    records = metric_records(run_dir.read_text(METRICS) or "")
    png = plot_losses(records, loss_unit)
    if png:
        run_dir.write_bytes("loss.png", png)
    return records


def _summary(run_dir: RunFolder, out: str, result: ray.train.Result, records: list[dict]) -> dict:
    """What train() returns, unless the run diverged: rank 0 records that in metrics.jsonl alone,
    since Train's result holds only the checkpointed reports."""
    diverged = records[-1] if records and records[-1].get("event") == "diverged" else None
    if diverged:
        raise TrainingError(f"training diverged at step {diverged['step']} (loss {diverged['loss']}); "
                            f"the last good checkpoint and the best model are kept in {out}")
    model_config = run_dir.read_text("model/config.json")
    info = json.loads(model_config)["info"] if model_config else {}
    return {"steps": (result.metrics or {}).get("step"), "best_val_loss": info.get("val_loss"),
            "model": run_dir.uri("model"), "run_dir": run_dir.location}


def _fit(trainer: TorchTrainer) -> ray.train.Result:
    """trainer.fit() on a helper thread. On the main thread Ray Train installs a SIGINT handler of
    its own, which ends the command with status 1 and no word; here Ctrl-C raises
    KeyboardInterrupt in the main thread as it does everywhere else in charrnn, and the exit hooks
    (charrnn.ray_session) end the run's processes. Its checkpoints stay for --resume."""
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="charrnn-fit", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _worker_resources(config: TrainConfig, cpus: int) -> dict:
    """At most one CPU per worker, leaving one for Ray Data's read tasks: workers that held every
    CPU would wait forever for the data they stream."""
    resources = {"CPU": min(1.0, max(cpus - 1, 1) / config.workers)}
    if config.gpu:
        resources["GPU"] = 1
    return resources


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), type(err).__name__)
