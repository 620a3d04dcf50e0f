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
from storage import check_out_location, is_uri, out_lock, public_location, redact_uris, with_access_of
from training.config import TrainConfig, TrainingError
from training.console import quiet_ray_logs
from training.plot import plot_losses
from training.run_folder import CHECKPOINTS, METRICS, RunFolder, metric_records
from training.tasks import SERIES_DEFAULTS, TASKS
from training.checkpoint import TRAINER_STATE
from training.worker import train_loop_per_worker

RUN_FILE = "run.json"
# What --resume may change: how long to train and on what, not the model, the optimiser or the data.
RESUMABLE = {"epochs", "max_steps", "max_minutes", "workers", "gpu", "threads_per_worker", "max_failures", "val_every",
             "val_max_tokens", "checkpoint_every", "log_every", "precision"}


def is_prepared(data: list[str]) -> bool:
    return len(data) == 1 and (is_uri(data[0]) or (Path(data[0]) / MANIFEST).exists())


def train(data: list[str], out: str, options: dict, resume: bool = False, log: Callable[[str], None] = print,
          before_ray: Callable[[], None] = lambda: None, verbose: bool = False) -> dict:
    """Train with `options` (TrainConfig fields; the rest keep their defaults) and return a summary:
    steps, best validation loss, where the model is. With `resume`, the run in `out` continues
    with its saved options, of which only RESUMABLE ones may be changed. `verbose` shows Ray
    Train's and Ray Data's own progress lines besides this project's."""
    if not verbose:
        quiet_ray_logs()
    run_dir = RunFolder(out)
    if not resume:
        check_out_location(run_dir.fs, run_dir.path, out, data)
    with out_lock(run_dir.fs, run_dir.path, out):
        return _train(run_dir, out, data, options, resume, log, before_ray, verbose)


def _train(run_dir: RunFolder, out: str, data: list[str], options: dict, resume: bool, log: Callable[[str], None],
           before_ray: Callable[[], None], verbose: bool) -> dict:
    checkpoint = run_dir.latest_checkpoint_step(TRAINER_STATE)
    saved_text = run_dir.read_text(RUN_FILE)
    if resume:
        if saved_text is None:
            raise TrainingError(f"--resume: {out} holds no run to resume (no {RUN_FILE})")
        saved = json.loads(saved_text)
        saved["train"].setdefault("shuffle", False)  # a run begun before shuffling existed walked corpus order
        fixed = sorted(k for k, v in options.items() if k not in RESUMABLE and v != saved["train"].get(k))
        if fixed:
            raise TrainingError(f"--resume cannot change {', '.join(fixed)}; the run keeps its model and data")
        if checkpoint is None:
            log(f"--resume: {out} has no checkpoint yet; starting from step 0")
        options = {**saved["train"], **options}
        data = [with_access_of(d, out) for d in saved["data"]]  # stored without the query: the --out URI's
    elif checkpoint is not None or saved_text is not None:
        raise TrainingError(f"{out} already holds a run; use --resume to continue it or choose another --out")
    elif not run_dir.is_empty():
        raise TrainingError(f"--out {out} is a non-empty folder that is not a charrnn run (no {RUN_FILE}); "
                            f"choose a new or empty folder")
    else:
        options = {**(SERIES_DEFAULTS if options.get("task") == "series" else {}), **options}
    config = TrainConfig.from_json(options)
    config.check()
    task = TASKS[config.task]
    if not data:
        raise TrainingError("--data is required: a prepared dataset folder" + (" or text INPUTs" if task.name == "text" else ""))
    if is_prepared(data):
        dataset = task.open(data[0])
        before_ray()
    elif task.name == "series":
        raise TrainingError(f"--task series needs a dataset prepared by charrnn prepare-series; {data[0]} is not one")
    else:
        log(redact_uris(f"preparing {' '.join(data)} into {run_dir.uri('data')}"))
        prepare(data, run_dir.uri("data"), log=log, before_ray=before_ray)
        dataset = task.open(run_dir.uri("data"))
    run_dir.write_text(RUN_FILE, json.dumps({"data": [public_location(dataset.location)], "train": config.to_json()},
                                            indent=1))

    job = task.job(dataset, config)
    train_points = job["train_points"]
    steps_per_epoch = max(1, train_points // (config.batch * config.seq))
    total_steps = min(s for s in (config.max_steps, config.epochs and math.ceil(config.epochs * steps_per_epoch)) if s)
    log(f"training {config.cell} {config.layers}x{config.hidden} on {train_points:,} {task.unit} "
        f"({steps_per_epoch:,} steps per epoch), {total_steps:,} steps, {config.workers} worker(s), "
        f"batch {config.batch} (global) x seq {config.seq}")

    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = config.threads_per_worker or max(1, cpus // config.workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**job, "train": config.to_json(), "data": dataset.location, "run_dir": run_dir.location,
                           "total_steps": total_steps, "threads": threads, "verbose": verbose},
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
            # Train's print patch would echo each worker line a second time through its logger.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            # Ray Train's lines at every report and checkpoint: with --verbose only.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )
    try:
        result = _fit(trainer)
    except ray.train.TrainingFailedError as err:
        raise TrainingError(f"training failed after {config.max_failures} restart(s): {_first_line(err)}") from None
    finally:
        records = metric_records(run_dir.read_text(METRICS) or "")
        png = plot_losses(records, task.loss_unit)
        if png:
            run_dir.write_bytes("loss.png", png)
    metrics = result.metrics or {}
    diverged = records[-1] if records and records[-1].get("event") == "diverged" else None
    if diverged:
        raise TrainingError(f"training diverged at step {diverged['step']} (loss {diverged['loss']}); "
                            f"the last good checkpoint and the best model are kept in {out}")
    model_config = run_dir.read_text("model/config.json")
    info = json.loads(model_config)["info"] if model_config else {}
    return {"steps": metrics.get("step"), "best_val_loss": info.get("val_loss"), "model": run_dir.uri("model"),
            "run_dir": run_dir.location}


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
