"""Datasets and run folders on an S3-compatible object store: moto's S3 server on loopback, reached
through pyarrow.fs URIs (endpoint_override), as a cluster's nodes reach a bucket."""
import json

import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from conftest import error_line, free_port, run_cli, write_story_corpus

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
TINY = ["--cell", "lstm", "--layers", "1", "--hidden", "32", "--dropout", "0", "--batch", "8", "--seq", "32",
        "--lr", "0.01", "--val-every", "15", "--checkpoint-every", "10", "--log-every", "10", "--num-cpus", "2"]


@pytest.fixture(scope="module")
def bucket():
    """A URI maker for one bucket on a fresh S3 server, and the pyarrow filesystem to inspect it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"?endpoint_override={host}:{port}&scheme=http"
    with pytest.MonkeyPatch.context() as env:  # for this process; the CLI's processes inherit them
        for name, value in CREDENTIALS.items():
            env.setenv(name, value)
        fs, _ = pafs.FileSystem.from_uri(f"s3://charrnn{query}&allow_bucket_creation=true")
        fs.create_dir("charrnn")
        yield (lambda key: f"s3://charrnn/{key}{query}"), fs
    server.stop()


def _read(fs, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def test_train_resume_and_load_from_s3(bucket, tmp_path):
    uri, fs = bucket
    write_story_corpus(tmp_path / "story.txt", 40_000)

    # Raw text: train prepares it into RUN_DIR/data, on the store too.
    first = run_cli("train", "--data", tmp_path / "story.txt", "--out", uri("run"), "--max-steps", "30", *TINY)
    assert first.returncode == 0, first.stderr
    # Shown and stored without the query (endpoint, keys): --resume takes it from --out again.
    assert "model in s3://charrnn/run/model\n" in first.stdout and \
        "endpoint_override" not in first.stdout + first.stderr
    assert run_cli("verify", uri("run/data")).returncode == 0
    records = [json.loads(l) for l in _read(fs, "charrnn/run/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert json.loads(_read(fs, "charrnn/run/run.json"))["data"] == ["s3://charrnn/run/data"]
    assert _read(fs, "charrnn/run/model/config.json")
    with fs.open_input_stream("charrnn/run/loss.png") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    checkpoints = {i.base_name for i in fs.get_file_info(pafs.FileSelector("charrnn/run/ray"))}
    assert "checkpoint-000000030" in checkpoints

    again = run_cli("train", "--out", uri("run"), "--resume", "--max-steps", "45", "--num-cpus", "2")
    assert again.returncode == 0, again.stderr
    records = [json.loads(l) for l in _read(fs, "charrnn/run/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 46))
    assert {"event": "resumed", "step": 30} in records

    from deploy import source

    model_folder = source.resolve(uri("run"))
    assert model_folder == uri("run/model")
    model, vocab, info = source.load(model_folder)
    assert info["step"] == 45 and vocab.size > 20
    assert source.default_name(model_folder) == "run"
    # sample and eval read a run folder on the store as serve does.
    sampled = run_cli("sample", "--model", uri("run"), "--prime", "The", "--length", "20", "--seed", "3")
    assert sampled.returncode == 0 and sampled.stdout.startswith("The") and len(sampled.stdout) >= 23, sampled.stderr
    with fs.open_output_stream("charrnn/story.txt") as f:
        f.write((tmp_path / "story.txt").read_bytes())
    evaluated = run_cli("eval", "--model", uri("run"), uri("story.txt"))
    assert evaluated.returncode == 0 and "nats/char" in evaluated.stdout, evaluated.stderr
    files = [i.path for i in fs.get_file_info(pafs.FileSelector("charrnn/run", recursive=True))
             if i.type == pafs.FileType.File and i.size < 1 << 20]
    assert not [f for f in files if b"endpoint_override" in fs.open_input_stream(f).read()]

    # A fresh run never takes over a run folder on the store either.
    taken = run_cli("train", "--data", tmp_path / "story.txt", "--out", uri("run"), "--max-steps", "1", *TINY)
    assert "already holds a run" in error_line(taken)


def test_credentials_and_queries_are_never_shown_or_stored(bucket, tmp_path):
    uri, fs = bucket
    secret = uri("src/story.txt").replace("s3://", "s3://testing:testing@")
    with fs.open_output_stream("charrnn/src/story.txt") as f:
        f.write(b"a short story about a dog and a cat.\n" * 500)
    result = run_cli("prepare", secret, "--out", uri("from-s3"), "--num-cpus", "1")
    assert result.returncode == 0, result.stderr
    manifest = _read(fs, "charrnn/from-s3/manifest.json")
    assert json.loads(manifest)["sources"][0]["uri"] == "s3://charrnn/src/story.txt"
    for text in (manifest, result.stdout, result.stderr):
        assert "endpoint_override" not in text and "testing:testing" not in text
    missing = run_cli("prepare", secret.replace("story", "nope"), "--out", uri("x"), "--num-cpus", "1")
    assert "input not found: s3://charrnn/src/nope.txt" in error_line(missing)
    assert "endpoint_override" not in missing.stderr and "testing:testing" not in missing.stderr


def test_prepare_replaces_a_dataset_on_s3_whole(bucket, tmp_path):
    """Object stores cannot rename folders: the new dataset is copied in, manifest last, and no shard
    of the old one is left behind."""
    uri, fs = bucket
    write_story_corpus(tmp_path / "story.txt", 30_000)
    for run_length in ("1000", "7000"):
        result = run_cli("prepare", tmp_path / "story.txt", "--out", uri("replaced"), "--run-length", run_length,
                         "--num-cpus", "2")
        assert result.returncode == 0, result.stderr
    manifest = json.loads(_read(fs, "charrnn/replaced/manifest.json"))
    assert manifest["options"]["run_length"] == 7000
    listed = {i.path[len("charrnn/replaced/"):]
              for i in fs.get_file_info(pafs.FileSelector("charrnn/replaced", recursive=True))
              if i.type == pafs.FileType.File}
    shards = {s["path"] for split in manifest["splits"].values() for s in split["shards"]}
    assert listed == shards | {"manifest.json"}
    assert not [i for i in fs.get_file_info(pafs.FileSelector("charrnn")) if i.base_name.startswith(".replaced")]


def test_an_interrupted_copy_in_may_be_replaced_but_a_foreign_folder_may_not(bucket):
    from pipeline.shards import DATASET
    from storage import StorageError, make_way

    _, fs = bucket
    with fs.open_output_stream("charrnn/half/train/part-000000-0000000000000.parquet") as f:
        f.write(b"PAR1")
    make_way(fs, "charrnn/half", "s3://charrnn/half", DATASET)  # shards without a manifest: a copy-in cut short
    with fs.open_output_stream("charrnn/mine/notes.txt") as f:
        f.write(b"keep me")
    with pytest.raises(StorageError, match="not a charrnn dataset"):
        make_way(fs, "charrnn/mine", "s3://charrnn/mine", DATASET)
    with fs.open_output_stream("charrnn/web/manifest.json") as f:  # someone else's manifest
        f.write(b'{"name": "ext"}')
    with pytest.raises(StorageError, match="not a charrnn dataset"):
        make_way(fs, "charrnn/web", "s3://charrnn/web", DATASET)
    assert _read(fs, "charrnn/web/manifest.json") == '{"name": "ext"}'
