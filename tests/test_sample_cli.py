"""charrnn sample / eval: local use of a model folder, and their one-line errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import BF16_RUNS, REPO, error_line, run_cli
from models import CharRNN, ModelConfig, save_model
from pipeline.text.vocab import Vocabulary


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small model folder, laid out like a run folder (RUN_DIR/model)."""
    run_dir = tmp_path_factory.mktemp("run")
    vocab = Vocabulary(list("abcdefgh \n"))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab.size, layers=1, hidden=16, dropout=0.0)
    save_model(CharRNN(config), config, vocab.to_json(), run_dir / "model", info={"step": 1})
    return run_dir


def test_same_seed_same_text(model_dir):
    runs = [run_cli("sample", "--model", model_dir, "--prime", "abc", "--length", "60", "--seed", seed)
            for seed in (7, 7, 8)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout
    assert runs[0].stdout.startswith("abc") and len(runs[0].stdout.rstrip("\n")) >= 60


def test_model_folder_itself_and_top_k_top_p(model_dir):
    result = run_cli("sample", "--model", model_dir / "model", "--prime", "a", "--length", "20", "--top-k", "1",
                     "--top-p", "0.5", "--temperature", "0.7", "--seed", "1")
    assert result.returncode == 0, result.stderr
    greedy = run_cli("sample", "--model", model_dir, "--prime", "a", "--length", "20", "--top-k", "1", "--seed", "2")
    assert greedy.stdout == run_cli("sample", "--model", model_dir, "--prime", "a", "--length", "20", "--top-k", "1",
                                    "--seed", "3").stdout  # top-k 1 is greedy: no randomness left


def test_prime_outside_the_vocabulary_is_said_once(model_dir):
    result = run_cli("sample", "--model", model_dir, "--prime", "aΩbΩz", "--length", "5", "--seed", "1")
    assert result.returncode == 0
    notes = [l for l in result.stderr.splitlines() if "not in the vocabulary" in l]
    assert len(notes) == 1 and "Ωz" in notes[0]


def test_eval_reports_loss_and_bits_per_char(model_dir, tmp_path):
    (tmp_path / "t.txt").write_text("abc abc\nhead\n")
    result = run_cli("eval", "--model", model_dir, tmp_path / "t.txt")
    assert result.returncode == 0, result.stderr
    loss = float(result.stdout.split("loss ")[1].split()[0])
    bpc = float(result.stdout.split("nats/char, ")[1].split()[0])
    assert 0 < loss < 2 * math.log(11) and bpc == pytest.approx(loss / math.log(2), abs=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
])
def test_bad_sampling_options(model_dir, args, message):
    assert message in error_line(run_cli("sample", "--model", model_dir, *args))


def test_bad_model_folders(model_dir, tmp_path):
    assert "does not exist" in error_line(run_cli("sample", "--model", tmp_path / "nope")) or \
        "nope" in error_line(run_cli("sample", "--model", tmp_path / "nope"))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text((model_dir / "model" / "config.json").read_text())
    assert "model.safetensors" in error_line(run_cli("sample", "--model", incomplete))
    future = tmp_path / "future"
    future.mkdir()
    config = json.loads((model_dir / "model" / "config.json").read_text())
    (future / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    (future / "model.safetensors").write_bytes((model_dir / "model" / "model.safetensors").read_bytes())
    assert "format version 99" in error_line(run_cli("eval", "--model", future, __file__))


@pytest.mark.slow  # scores 70,000 characters three times
def test_eval_of_a_long_file_runs_in_lanes_with_one_streams_loss(model_dir, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    (tmp_path / "long.txt").write_text("".join(rng.choice(list("abcdefgh \n"), size=70_000)))
    lanes = run_cli("eval", "--model", model_dir, tmp_path / "long.txt")
    one = run_cli("eval", "--model", model_dir, "--lanes", "1", tmp_path / "long.txt")
    assert lanes.returncode == one.returncode == 0, lanes.stderr + one.stderr
    assert "(4 lanes, 1,024 characters of burn-in each)" in lanes.stdout and "(one stream)" in one.stdout
    loss = lambda r: float(r.stdout.split("loss ")[1].split()[0])
    assert loss(lanes) == pytest.approx(loss(one), abs=0.01)
    bf16 = run_cli("eval", "--model", model_dir, "--precision", "bf16", tmp_path / "long.txt")
    if not BF16_RUNS:  # this CPU cannot (no AVX-512): the command says so in one line
        assert bf16.returncode == 2 and "--precision bf16 cannot run on this CPU" in error_line(bf16)
        return
    assert bf16.returncode == 0, bf16.stderr
    assert "(4 lanes, 1,024 characters of burn-in each, bf16)" in bf16.stdout
    assert loss(bf16) == pytest.approx(loss(one), abs=0.02)


# oneDNN's own switch: its kernels stop at AVX2, as on a CPU without AVX-512.
NO_AVX512 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_bf16_where_it_cannot_run_is_a_one_line_error_before_any_work(model_dir, tmp_path):
    probe = "import torch; from models.precision import bf16_runs; print(bf16_runs(torch.device('cpu')))"
    runs = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, **NO_AVX512))
    if runs.stdout.strip() != "False":
        pytest.skip(f"bf16 still runs with oneDNN held to AVX2 here: {runs.stdout.strip()} {runs.stderr[-200:]}")
    (tmp_path / "text.txt").write_text("some text to score\n" * 50)
    for command in (["eval", "--model", model_dir, "--precision", "bf16", tmp_path / "text.txt"],
                    ["train", "--data", tmp_path / "absent", "--out", tmp_path / "run", "--precision", "bf16"],
                    ["serve", "--model", model_dir, "--precision", "bf16"]):
        done = run_cli(*command, env=NO_AVX512)
        line = error_line(done)
        assert done.returncode == 2 and f"charrnn {command[0]}: error: --precision bf16 cannot run on this CPU" in line
    assert not (tmp_path / "run").exists()
