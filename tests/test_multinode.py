"""Training across nodes of a real (simulated) multi-node Ray cluster: several raylets on this machine
(ray.cluster_utils.Cluster), `charrnn train --address` joining it, a worker node removed mid-run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import descendants, write_story_corpus

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier

# Steps slow enough (tens of ms) that the node goes while most of the run is still ahead.
STEPS = 200
TRAIN = ["--cell", "lstm", "--layers", "1", "--hidden", "128", "--dropout", "0", "--batch", "16", "--seq", "64",
         "--lr", "0.01", "--val-every", "250", "--checkpoint-every", "20", "--log-every", "50",
         "--max-steps", str(STEPS)]


def node_processes(node) -> dict[int, bytes]:
    """Every process of this simulated node (its Ray daemons and the workers under its raylet), by pid,
    with its command line."""
    roots = [p.process.pid for infos in node.all_processes.values() for p in infos]
    found = {}
    for pid in set(roots).union(*({p for p, _ in descendants(r)} for r in roots)):
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            pass
    return found


def lose_node(cluster, node, processes: dict[int, bytes]) -> None:
    """What a machine's loss does: every process on it ends at once. remove_node alone stops the Ray
    daemons, and a worker process can outlive its raylet for a while."""
    cluster.remove_node(node, allow_graceful=False)
    for pid in processes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def registered_checkpoint_step(run: Path) -> int | None:
    """The step of the latest checkpoint Train's controller has registered, if any."""
    try:
        snapshot = json.loads((run / "ray" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or caught mid-write
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest["metrics"]["step"] if latest else None


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    # One CPU per node: the two training workers (one CPU each) cannot share a node, and one CPU is
    # always left for Ray Data's read tasks.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_host": "127.0.0.1"})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_training_survives_losing_a_worker_node(cluster, tmp_path):
    corpus, data, run = tmp_path / "story.txt", tmp_path / "data", tmp_path / "run"
    write_story_corpus(corpus, 200_000)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Short runs, so that each worker's lanes fill from its share of one pass; the 200 steps cross
    # an epoch's end, where the ranks must agree to validate together.
    subprocess.run([sys.executable, "-m", "charrnn", "prepare", str(corpus), "--out", str(data), "--run-length", "1024",
                    "--address", cluster.address], check=True, capture_output=True, env=env, timeout=300)
    trainer = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "train", "--address", cluster.address, "--data", str(data),
         "--out", str(run), "--workers", "2", *TRAIN],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        # Train's controller registers a checkpoint when it next polls the workers (every 2 s) and
        # records it in this snapshot; a node lost before then takes the checkpoint with it.
        while (registered := registered_checkpoint_step(run)) is None:
            assert trainer.poll() is None and time.time() < deadline, trainer.communicate()[0][-3000:]
            time.sleep(0.1)
        # A node with a training worker but not Train's controller, which lives beside the driver:
        # losing the driver's node ends the run, as on any cluster.
        candidates = [(node, procs) for node in cluster.worker_nodes for procs in [node_processes(node)]
                      if any(b"RayTrainWorker" in c for c in procs.values())
                      and not any(b"TrainController" in c for c in procs.values())]
        assert candidates, "a training worker should run on a node of its own"
        lose_node(cluster, *candidates[0])
        lost_at = max(r.get("step", 0) for r in metrics(run))
        cluster.add_node(num_cpus=1)  # the autoscaler's replacement
        output, _ = trainer.communicate(timeout=600)
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
    assert trainer.returncode == 0, output[-3000:]
    resumed = [r for r in metrics(run) if r.get("event") == "resumed"]
    assert lost_at < STEPS, "the node went after the run had ended"
    assert resumed and resumed[0]["step"] >= registered, output[-3000:]  # from its checkpoint, not from step 0
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, STEPS + 1))
    assert metrics(run)[-1]["epoch"] > 1  # past an epoch's end, with both ranks still in step
    assert (run / "model" / "model.safetensors").exists()
