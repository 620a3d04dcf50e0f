"""`charrnn quickstart`: prepare, train, serve and query in one command, as a user runs it."""
import json

from conftest import free_port, run_cli, write_story_corpus
from models import load_model


def test_quickstart_trains_serves_and_prints_samples(tmp_path):
    corpus = tmp_path / "story.txt"
    write_story_corpus(corpus, 1_000_000)
    out, run = tmp_path / "quickstart", tmp_path / "quickstart" / "run-1"
    result = run_cli("quickstart", "--out", out, "--corpus", corpus, "--minutes", 0.25, "--hidden", 32,
                     "--port", free_port(), "--samples", 2, "--sample-chars", 60, "--num-cpus", 2, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout
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
