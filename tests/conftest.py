import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, as on CI), shut down at the end."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def run_cli(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """`charrnn ARGS` in a real process, as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "charrnn", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=kwargs.pop("cwd", REPO), **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's error: one line, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1, result.stderr
    return lines[0]
