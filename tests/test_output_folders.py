"""Output folders: nothing of the user's is replaced, a killed publish loses nothing, and two
commands never write one folder at once. Every refusal comes before Ray starts, in real processes."""
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from conftest import REPO, error_line, run_cli
from models import CharRNN, ModelConfig, load_model, save_model
from pipeline.text.dataset import PreparedDataset
from pipeline.shards import DATASET
from storage import make_way, out_lock
from training.run_folder import RunFolder


def _exit_2(result) -> str:
    line = error_line(result)
    assert result.returncode == 2, result.stderr
    return line


def test_a_folder_with_someone_elses_manifest_is_not_replaced(tmp_path):
    (tmp_path / "c.txt").write_text("some text\n" * 20)
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "ext"}')
    (webapp / "index.js").write_text("keep")
    for command in (["prepare", tmp_path / "c.txt"], ["prepare-series", "--synthetic", "sine"]):
        line = _exit_2(run_cli(*command, "--out", webapp, "--num-cpus", "1"))
        assert "not a charrnn dataset" in line and str(webapp) in line
    assert sorted(p.name for p in webapp.iterdir()) == ["index.js", "manifest.json"]
    assert (webapp / "index.js").read_text() == "keep"


def test_train_writes_only_into_a_new_empty_or_own_run_folder(tmp_path):
    (tmp_path / "c.txt").write_text("some text\n" * 20)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    line = _exit_2(run_cli("train", "--data", tmp_path / "c.txt", "--out", mine, "--num-cpus", "1"))
    assert "not a charrnn run" in line
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("out", ["corpus", "corpus/ds", ".", "/", "~"])
def test_an_output_overlapping_the_inputs_or_a_root_is_refused_at_once(tmp_path, out):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "c.txt").write_text("some text\n" * 20)
    out = out if out in ("/", "~") else tmp_path / out
    for command in (["prepare", corpus], ["train", "--data", corpus]):
        line = _exit_2(run_cli(*command, "--out", out, "--num-cpus", "1", cwd=tmp_path))
        assert ("overlaps the input" in line) or ("root" in line) or ("home" in line), line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.txt", "corpus"]


def _prepared(tmp_path, text: str, out: str = "ds"):
    (tmp_path / "c.txt").write_text(text)
    result = run_cli("prepare", tmp_path / "c.txt", "--out", tmp_path / out, "--run-length", "20", "--num-cpus", "1")
    assert result.returncode == 0, result.stderr
    return PreparedDataset(str(tmp_path / out))


@pytest.mark.slow  # prepares a dataset with Ray first
def test_a_publish_killed_between_its_renames_gets_the_old_dataset_back(tmp_path):
    old = _prepared(tmp_path, "the old text\n" * 30)
    # What _swap_by_rename leaves when killed after its first rename: the dataset stepped aside.
    stepped_aside = tmp_path / ".ds.old-0123456789ab"
    (tmp_path / "ds").rename(stepped_aside)
    (tmp_path / ".ds.partial-ba9876543210").mkdir()
    make_way(pafs.LocalFileSystem(), str(tmp_path / "ds"), "ds", DATASET)
    assert PreparedDataset(str(tmp_path / "ds")).vocab.chars == old.vocab.chars
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "ds"]


@pytest.mark.slow  # prepares a dataset with Ray first
def test_a_second_command_on_a_locked_output_fails_and_touches_nothing(tmp_path):
    _prepared(tmp_path, "the first text\n" * 30)
    before = {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    (tmp_path / "run").mkdir()
    # The lock is held by another process, as a running `charrnn prepare` or `train` holds it.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, pyarrow.fs as f; from storage import out_lock\n"
         "with out_lock(f.LocalFileSystem(), sys.argv[1], 'ds'), out_lock(f.LocalFileSystem(), sys.argv[2], 'run'):\n"
         "    print('held', flush=True); sys.stdin.read()", str(tmp_path / "ds"), str(tmp_path / "run")],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        line = _exit_2(run_cli("prepare", tmp_path / "c.txt", "--out", tmp_path / "ds", "--num-cpus", "1"))
        assert "being written by another command" in line
        line = _exit_2(run_cli("train", "--data", tmp_path / "ds", "--out", tmp_path / "run", "--num-cpus", "1"))
        assert "being written by another command" in line
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()} == before
    assert list((tmp_path / "run").iterdir()) == []
    with out_lock(pafs.LocalFileSystem(), str(tmp_path / "ds"), "ds"):  # released when its holder ended
        pass


def test_a_model_save_killed_between_its_renames_loses_nothing(tmp_path):
    config = ModelConfig(vocab_size=3, hidden=8, layers=1)
    vocab = {"chars": "ab", "unknown_id": 2}
    run = RunFolder(str(tmp_path))
    run.save_folder("model", lambda path: save_model(CharRNN(config), config, vocab, path, info={"step": 1}))
    # What storage.staged leaves when killed after its first rename, and a killed save's staging folder.
    (tmp_path / "model").rename(tmp_path / ".model.old-0123456789ab")
    (tmp_path / ".model.partial-ba9876543210").mkdir()
    with pytest.raises(ValueError):  # a save refused while writing loses nothing
        run.save_folder("model", lambda path: save_model(CharRNN(config), config,
                                                          {"chars": "abcd", "unknown_id": 4}, path))
    assert load_model(tmp_path / "model")[3] == {"step": 1}  # the next save brought the old model back first
    run.save_folder("model", lambda path: save_model(CharRNN(config), config,
                                                      {"chars": "abcd", "unknown_id": 4} | vocab, path,
                                                      info={"step": 2}))
    assert load_model(tmp_path / "model")[3] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_model_saved_in_place_and_cut_short_is_no_model(tmp_path):
    """models.save_model without storage: config.json leaves first and comes last."""
    config = ModelConfig(vocab_size=3, hidden=8, layers=1)
    vocab = {"chars": "ab", "unknown_id": 2}
    save_model(CharRNN(config), config, vocab, tmp_path / "model", info={"step": 1})
    (tmp_path / "model" / "config.json").unlink()  # what a save killed after writing its weights leaves
    with pytest.raises(ValueError, match="config.json is missing"):
        load_model(tmp_path / "model")
    save_model(CharRNN(config), config, vocab, tmp_path / "model", info={"step": 2})  # ours: replaced
    assert load_model(tmp_path / "model")[3] == {"step": 2}


def test_an_interrupt_lost_in_a_finalizer_still_stops_the_publish(tmp_path):
    """Python drops an exception raised in `__del__`; a Ctrl-C landing in one (Ray Data shuts its
    executors down from `__del__`) must still keep the command from publishing what it staged."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import pyarrow.fs as pafs
from charrnn.ray_session import stop_on_signals
from storage import staged

stop_on_signals()

class ShutsDownLate:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside the finalizer

ShutsDownLate()  # collected at once: its KeyboardInterrupt is printed and dropped
try:
    with staged(pafs.LocalFileSystem(), {str(tmp_path / "out")!r}, "manifest.json") as staging:
        open(staging + "/manifest.json", "w").write("{{}}")
except KeyboardInterrupt:
    sys.exit(130)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in done.stderr and "KeyboardInterrupt" in done.stderr, done.stderr
    assert done.returncode == 130, done.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
