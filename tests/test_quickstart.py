"""`charrnn quickstart`: prepare, train, serve and query in one command, as a user runs it."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, alive, descendants, error_line, free_port, run_cli, write_story_corpus
from models import load_model

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier


def test_quickstart_trains_serves_prints_samples_and_stops_whole_on_sigterm(tmp_path):
    corpus = tmp_path / "story.txt"
    write_story_corpus(corpus, 1_000_000)
    out, run = tmp_path / "quickstart", tmp_path / "quickstart" / "run-1"
    cmd = [sys.executable, "-m", "charrnn", "quickstart", "--out", str(out), "--corpus", str(corpus), "--minutes",
           "0.25", "--hidden", "32", "--port", str(free_port()), "--samples", "2", "--sample-chars", "60",
           "--num-cpus", "2", "--keep-serving"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines, family = [], []
    try:
        for line in proc.stdout:  # until it says it keeps serving
            lines.append(line)
            if "until Ctrl-C" in line:
                break
        family = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # as a service manager stops it
        lines.append(proc.stdout.read())
        assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
        assert len(family) > 5 and not [p for p in family if alive(*p)], "processes of quickstart outlived it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    printed = "".join(lines)
    for step in ("1/4 preparing", "2/4 training", "3/4 serving", "4/4 asking"):
        assert step in printed
    assert "--- sample 1 (prime 'def ') ---" in printed and "--- sample 2 (prime 'import ') ---" in printed
    assert f"model in {run / 'model'}" in printed and "validation loss" in printed
    _, config, _, _ = load_model(run / "model")
    assert config.hidden == 32
    # The time budget (15 s), not the 20 epochs, ended training, with an evaluation at its last step.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert "val_loss" in steps[-1] and steps[-1]["epoch"] < 10
    assert json.loads((out / "data" / "manifest.json").read_text())["vocab"]["size"] <= 129


def test_a_port_out_of_range_is_a_one_line_error(tmp_path):
    line = error_line(run_cli("quickstart", "--out", tmp_path / "qs", "--port", "70000"))
    assert "--port must be in 1..65535, got 70000" in line and not (tmp_path / "qs").exists()
