"""charrnn train on Ray Train: learning, DDP equivalence, resume, divergence. A worker lost mid-run
(restart from the checkpoint) is tested on a multi-node cluster in test_multinode.py."""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import ray.train
import torch

from conftest import BF16_RUNS, needs_bf16, write_story_corpus
from pipeline.text.prepare import PrepareOptions, prepare
from training.config import TrainingError
from training.driver import train

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier

TINY = dict(cell="lstm", layers=1, hidden=48, dropout=0.1, batch=8, seq=32, lr=0.01, val_every=50,
            checkpoint_every=25, log_every=25, max_failures=2, precision="fp32")


@pytest.fixture(scope="module")
def story_dataset(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("story")
    write_story_corpus(root / "story.txt", 60_000)
    prepare([str(root / "story.txt")], str(root / "ds"), PrepareOptions(run_length=1500), log=lambda m: None)
    return str(root / "ds")


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TensorBoard event files in `folder` (TFRecord framing: length,
    its CRC, the Event, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def records(run_dir) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


class ReportLog(ray.train.UserCallback):
    """Each Ray Train report's metrics, as its controller sees them, one JSON line per worker."""

    def __init__(self, path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.writelines(json.dumps({**m, "checkpoint": checkpoint is not None}) + "\n" for m in metrics)


@pytest.fixture(scope="module")
def tiny_run(story_dataset, tmp_path_factory):
    """An uninterrupted 150-step run: what the resume test compares against, and a learning check.
    Its Ray Train reports are in run_dir/../reports.jsonl."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    return run_dir, train([story_dataset], str(run_dir), {**TINY, "max_steps": 150, "log_every": 10},
                          log=lambda m: None, callbacks=[ReportLog(run_dir.parent / "reports.jsonl")])


def test_ray_train_gets_the_metrics_every_log_interval_evaluation_and_checkpoint(tiny_run):
    run_dir, _ = tiny_run
    reports = [json.loads(l) for l in (run_dir.parent / "reports.jsonl").read_text().splitlines()]
    checkpoints = set(range(25, 151, 25))
    assert [r["step"] for r in reports] == sorted(set(range(10, 151, 10)) | checkpoints)
    assert {r["step"] for r in reports if r["checkpoint"]} == checkpoints
    logged = {r["step"]: r for r in records(run_dir) if "loss" in r}
    for report in reports:
        assert report["loss"] == logged[report["step"]]["loss"] and report["lr"] == pytest.approx(TINY["lr"])
        assert report["chars_per_s"] > 0
    assert [r["step"] for r in reports if "val_loss" in r] == [50, 100, 150]
    assert all(r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2)) for r in reports if "val_loss" in r)


def test_tiny_model_learns_far_below_uniform(tiny_run):
    run_dir, summary = tiny_run
    vocab_size = json.loads((run_dir / "model" / "config.json").read_text())["model"]["vocab_size"]
    assert summary["steps"] == 150
    assert summary["best_val_loss"] < 0.6 * math.log(vocab_size)
    metrics = records(run_dir)
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 151))
    assert {"val_loss", "val_bpc"} <= set(metrics[-1])  # evaluated at the end
    assert all(r["chars_per_s"] > 0 for r in metrics if "loss" in r)
    assert [r["precision"] for r in metrics if r.get("event") == "precision"] in (["fp32"], ["bf16"])
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_ddp_step(job):
    """One train_step on this rank's rows of a fixed batch; rank 0 saves the updated weights."""
    import ray.train
    import ray.train.torch

    from models import CharRNN, ModelConfig
    from training.step import make_optimizer, train_step
    from training.windows import Window

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=11, layers=2, hidden=16, dropout=0.0))
    optimizer, scheduler = make_optimizer(model, 0.05, "constant", 1)
    ddp = ray.train.torch.prepare_model(model)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    inputs, targets = np.array(job["inputs"]), np.array(job["targets"])
    window = Window(inputs[rows], targets[rows], np.ones(8 // world, bool))
    train_step(ddp, optimizer, scheduler, window, model.init_state(8 // world), 0.5, torch.device("cpu"))
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, job["out"])


def test_two_worker_ddp_equals_one_worker_on_the_whole_batch(ray_local, tmp_path):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 11, size=(8, 13))
    job = {"inputs": tokens[:, :-1].tolist(), "targets": tokens[:, 1:].tolist()}
    weights = {}
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}.pt")
        TorchTrainer(_one_ddp_step, train_loop_config={**job, "out": out},
                     scaling_config=ScalingConfig(num_workers=workers)).fit()
        weights[workers] = torch.load(out, weights_only=True)
    initial = _initial_weights()
    for name, value in weights[1].items():
        assert not torch.equal(value, initial[name])  # the step did move the weights
        torch.testing.assert_close(weights[2][name], value, rtol=1e-4, atol=1e-5)  # Adam magnifies tiny gradients


def _initial_weights():
    from models import CharRNN, ModelConfig

    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=11, layers=2, hidden=16, dropout=0.0)).state_dict()


def step_losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r and "event" not in r}


def test_resumed_run_matches_an_uninterrupted_one_and_keeps_its_options(story_dataset, tiny_run, tmp_path):
    whole_dir, whole = tiny_run
    tensorboard = tmp_path / "tb"
    train([story_dataset], str(tmp_path / "split"), {**TINY, "max_steps": 75, "tensorboard": str(tensorboard)},
          log=lambda m: None)
    resumed = train([], str(tmp_path / "split"), {"max_steps": 150}, resume=True, log=lambda m: None)
    assert resumed["steps"] == whole["steps"] == 150
    metrics = records(tmp_path / "split")
    assert {"event": "resumed", "step": 75} in metrics
    steps = [r["step"] for r in metrics if "loss" in r]
    assert steps == list(range(1, 151))  # no step lost or repeated
    # The same weights, optimizer state, data position (each lane's place in its run, in the epoch's
    # shuffled order), recurrent state and dropout masks: step for step the uninterrupted run's losses.
    assert step_losses(tmp_path / "split") == pytest.approx(step_losses(whole_dir), rel=1e-6)
    assert resumed["best_val_loss"] == pytest.approx(whole["best_val_loss"], rel=1e-6)

    # --tensorboard, kept by the resume: every step once, in both sessions' event files, as metrics.jsonl says.
    scalars = tensorboard_scalars(tensorboard)
    assert len(list(tensorboard.glob("events.out.tfevents.*"))) == 2
    assert sorted(scalars["train/loss"]) == list(range(1, 151))
    assert [scalars["train/loss"][r["step"]] for r in metrics if "loss" in r] == pytest.approx(
        [r["loss"] for r in metrics if "loss" in r], rel=1e-6)
    assert sorted(scalars["val/loss"]) == [r["step"] for r in metrics if "val_loss" in r]
    assert all(scalars["val/bits_per_char"][s] == pytest.approx(v / math.log(2), rel=1e-6)
               for s, v in scalars["val/loss"].items())
    assert sorted(scalars["throughput/chars_per_s"]) == list(range(1, 151))
    assert scalars["train/bits_per_char"][150] == pytest.approx(scalars["train/loss"][150] / math.log(2), rel=1e-6)
    assert sorted(scalars["train/bits_per_char"]) == list(range(1, 151))
    assert scalars["train/lr"][150] == pytest.approx(TINY["lr"])

    # A resume keeps the run's model and data; a fresh run never overwrites one.
    with pytest.raises(TrainingError, match="cannot change hidden"):
        train([], str(tmp_path / "split"), {"hidden": 64}, resume=True, log=lambda m: None)
    with pytest.raises(TrainingError, match="already holds a run"):
        train([story_dataset], str(tmp_path / "split"), TINY, log=lambda m: None)


@needs_bf16
def test_a_bf16_run_resumes_in_another_precision(story_dataset, tmp_path):
    out = str(tmp_path / "run")
    train([story_dataset], out, {**TINY, "precision": "bf16", "max_steps": 10, "checkpoint_every": 5},
          log=lambda m: None)
    resumed = train([], out, {"max_steps": 15, "precision": "fp32"}, resume=True, log=lambda m: None)
    assert resumed["steps"] == 15
    assert [r["precision"] for r in records(tmp_path / "run") if r.get("event") == "precision"] == ["bf16", "fp32"]


def test_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(story_dataset, tmp_path):
    # Adam at lr 100 moves every weight by ~100 in its first step: the second step's loss is ~70x ln V.
    with pytest.raises(TrainingError, match=r"training diverged at step 2 \(loss [0-9.e+]+\)"):
        train([story_dataset], str(tmp_path / "run"), {**TINY, "lr": 100.0, "checkpoint_every": 1, "max_steps": 50},
              log=lambda m: None)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "ray").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-000000001"]
    assert [(r.get("event"), r["step"]) for r in records(tmp_path / "run") if "step" in r] == \
        [(None, 1), ("diverged", 2)]


CLI_TINY = ["--hidden", "32", "--layers", "1", "--batch", "8", "--seq", "32", "--max-steps", "20",
            "--checkpoint-every", "10", "--val-every", "15", "--log-every", "10", "--num-cpus", "2"]
RAY_CHATTER = ["Reporting training result", "Checkpoint successfully created", "execution finished",
               "Moving model to device", "Estimated parquet", "Progress bars disabled", "tqdm is not installed"]


def test_console_shows_progress_evaluations_and_checkpoints_and_verbose_shows_ray(tmp_path):
    from conftest import run_cli, write_story_corpus

    write_story_corpus(tmp_path / "story.txt", 30_000)
    quiet = run_cli("train", "--data", tmp_path / "story.txt", "--out", tmp_path / "quiet", *CLI_TINY)
    assert quiet.returncode == 0, quiet.stderr
    console = quiet.stdout + quiet.stderr
    for line in ("[train] precision ", "[train] step 10/20 loss", "val ", "(best: model saved)",
                 "[train] checkpoint at step 20", "trained 20 steps"):
        assert line in console
    assert not [chatter for chatter in RAY_CHATTER if chatter in console], console

    # Relative folders, as the README's commands give them: Ray's workers run elsewhere.
    forced = "bf16" if BF16_RUNS else "fp32"
    verbose = run_cli("train", "--data", "quiet/data", "--out", "verbose", *CLI_TINY, "--verbose", "--precision",
                      forced, "--no-shuffle", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    console = verbose.stdout + verbose.stderr
    assert "Reporting training result" in console and f"[train] precision {forced}: --precision {forced}" in console
    saved = json.loads((tmp_path / "verbose" / "run.json").read_text())["train"]
    assert saved["precision"] == forced and saved["shuffle"] is False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_train_ends_every_process_it_started(tmp_path, signum):
    from conftest import REPO, alive, descendants

    write_story_corpus(tmp_path / "story.txt", 30_000)
    cmd = [sys.executable, "-m", "charrnn", "train", "--data", str(tmp_path / "story.txt"),
           "--out", str(tmp_path / "run"), *CLI_TINY, "--max-steps", "100000", "--log-every", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    family = []
    try:
        for line in proc.stdout:  # until the first training step: the trainer and its workers are up
            if "[train] step" in line:
                break
        assert proc.poll() is None, "train ended before its first step"
        family = descendants(proc.pid)
        proc.send_signal(signum)
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == 130, rest
        assert "interrupted" in rest
        assert len(family) > 5 and not [p for p in family if alive(*p)], "processes of charrnn train outlived it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid, started in family:
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)


def test_keep_freed_memory_stops_refaulting_big_buffers():
    """A step's activation buffers, freed and allocated again, come back without page faults."""
    import subprocess
    import sys

    script = """
import resource, sys, torch
sys.path.insert(0, ".")
from training.step import keep_freed_memory

def faults_per_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(8 << 20).fill_(1.0)  # 32 MB, written (8192 pages), freed
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

default = faults_per_round()
applied = keep_freed_memory()
faults_per_round()  # the first round maps the heap once
print(default, applied, faults_per_round())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    default, applied, kept = done.stdout.split()
    assert applied == "True"
    assert float(default) > 4000 and float(kept) < 400, done.stdout


def test_a_training_thread_in_a_ray_worker_does_not_refault_its_buffers(ray_local):
    """In the environment the driver gives Train's workers, a step run in a thread of the worker (as
    Ray Train runs the loop) reuses its activation buffers: without it, every step faults them in
    afresh (BENCHMARKS.md, sessions 16 and 21)."""
    from training.driver import WORKER_ENV

    @ray_local.remote(runtime_env={"env_vars": WORKER_ENV})
    def fewest_faults_in_a_step() -> int:
        import resource
        import threading

        import torch
        import torch.nn.functional as F

        from models import CharRNN, ModelConfig
        from training.step import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(1)
        # One layer of the seed's network: its gate buffers (128 x 100 x 2048 floats) are beyond the
        # 64 MB that a thread's own glibc arena can hold, as the seed's are; half the seed's time.
        config = ModelConfig(vocab_size=83, layers=1, hidden=512)
        model = CharRNN(config)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        batch = torch.randint(83, (128, 101))
        faults = []

        def steps():
            for _ in range(7):
                before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                logits, _ = model(batch[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, 83), batch[:, 1:].reshape(-1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

        thread = threading.Thread(target=steps)
        thread.start()
        thread.join()
        return min(faults[4:])  # after four warm-up steps the heap has settled

    # The fewest in a step, not the mean: a step that reuses its buffers faults almost nothing, and
    # one that maps them afresh faults them all, so the minimum tells the two apart even when
    # something else on the machine disturbs a step (a mean of 61,000 was seen in CI once).
    assert ray_local.get(fewest_faults_in_a_step.remote()) < 30_000


def test_a_torn_last_metrics_line_breaks_neither_resume_nor_the_plot(tmp_path):
    """A run killed while writing metrics.jsonl leaves half a line: the restart's truncation (what
    --resume does) and the plot read past it."""
    from training.plot import plot_losses
    from training.run_folder import METRICS, MetricsLog, RunFolder, metric_records

    lines = [json.dumps({"step": s, "loss": 3.0 - s / 10}) for s in range(1, 6)]
    (tmp_path / METRICS).write_text("\n".join(lines) + '\n{"step": 6, "lo')
    folder = RunFolder(str(tmp_path))
    assert [r["step"] for r in metric_records(folder.read_text(METRICS))] == [1, 2, 3, 4, 5]
    assert plot_losses(metric_records(folder.read_text(METRICS)))[:8] == b"\x89PNG\r\n\x1a\n"
    log = MetricsLog(folder)
    log.truncate(4)
    log.append({"step": 5, "loss": 2.5})
    assert [json.loads(l)["step"] for l in (tmp_path / METRICS).read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_tensorboard_takes_a_local_folder(tmp_path):
    from conftest import error_line, run_cli
    from training.config import TrainConfig

    with pytest.raises(TrainingError, match="--tensorboard takes a local folder, got 's3://b/tb'"):
        TrainConfig(tensorboard="s3://b/tb").validate()
    # On the command line too, before it could be made a local path ("s3:/b/tb") and training begin.
    line = error_line(run_cli("train", "--data", "x", "--out", "run", "--tensorboard", "s3://b/tb", cwd=tmp_path))
    assert "--tensorboard: takes a local folder, got 's3://b/tb'" in line and not list(tmp_path.iterdir())
