import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _bf16_runs_on_cpu() -> bool:
    import torch

    from models.precision import bf16_runs

    return bf16_runs(torch.device("cpu"))


BF16_RUNS = _bf16_runs_on_cpu()
# bf16 on a CPU needs AVX-512 (oneDNN's LSTM kernels); machines differ from run to run.
needs_bf16 = pytest.mark.skipif(not BF16_RUNS, reason="bf16 cannot run on this CPU (no AVX-512)")


def pytest_collection_modifyitems(items):
    """A test on the session's Ray is in the slow tier, as are the modules marked slow (pyproject.toml)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, as on CI), shut down at the end."""
    import ray

    # Workers import test helpers (Ray Train loops defined in tests) from this folder.
    ray.init(address="local", num_cpus=2, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "tests")}})
    yield ray
    ray.shutdown()


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now, all different (other Rays run on this machine: no defaults)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def run_cli(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """`charrnn ARGS` in a real process, as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kwargs.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "charrnn", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=kwargs.pop("cwd", REPO), **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's error: one line, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_story_corpus(path, chars: int, seed: int = 0) -> str:
    """Text with real structure a tiny model can learn quickly: sentences from a small grammar."""
    import numpy as np

    rng = np.random.default_rng(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "anna", "the train"]
    verbs = ["sees", "likes", "finds", "waits for", "talks to", "follows"]
    objects = ["the house", "a bird", "the river", "her sister", "the station", "a letter"]
    parts, size = [], 0
    while size < chars:
        sentence = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
        sentence = sentence[0].upper() + sentence[1:] + ("\n" if rng.random() < 0.2 else " ")
        parts.append(sentence)
        size += len(sentence)
    text = "".join(parts)[:chars]
    path.write_text(text)
    return text


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, from /proc; None once it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def descendants(root: int) -> list[tuple[int, str]]:
    """Every live process below `root`, as (pid, start time): the start time tells a reused pid apart."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))):
            parents[int(entry.name)] = stat
    found, frontier = [], {root}
    while frontier:
        children = {pid for pid, (ppid, _) in parents.items() if ppid in frontier}
        found += [(pid, parents[pid][1]) for pid in children]
        frontier = children
    return found


def alive(pid: int, started: str) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == started
