"""charrnn prepare: the corpus pipeline end to end, on generated corpora."""
import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import CorpusError
from pipeline.sources import expand_inputs
from pipeline.text.dataset import PreparedDataset, token_runs
from pipeline.text.prepare import PrepareOptions, prepare
from pipeline.text.ranges import TextRangeDatasource, snap_cut
from pipeline.text.vocab import count_codepoints, count_range, decode_range, normalize_newlines
from storage import StorageError

QUIET = dict(log=lambda msg: None)


def normalized(path) -> str:
    return normalize_newlines(path.read_bytes().decode("utf-8"))


def texts_by_source(dataset: PreparedDataset) -> dict[str, str]:
    """Reassemble every source's text from the runs of both splits."""
    runs = []
    for split in ("train", "validation"):
        for path in dataset.shard_paths(split):
            table = pq.read_table(path)
            for source, offset, tokens in zip(table["source"].to_pylist(), table["char_offset"].to_pylist(),
                                              token_runs(table["tokens"], dataset.vocab.dtype)):
                runs.append((source, offset, dataset.decode(tokens)))
    out: dict[str, list[str]] = {}
    for source, offset, text in sorted(runs):
        uri = dataset.manifest["sources"][source]["uri"]
        assert sum(map(len, out.get(uri, []))) == offset, "runs must tile their source without gaps"
        out.setdefault(uri, []).append(text)
    return {uri: "".join(parts) for uri, parts in out.items()}


def write_corpus(root, files: dict[str, bytes]):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# --- round trip and layout ---------------------------------------------------------------------

unicode_text = st.lists(
    st.one_of(st.characters(codec="utf-8", exclude_characters="\x00"),
              st.sampled_from(["\r\n", "\r", "\n", "é", "😀"])),
    min_size=1, max_size=300,
).map("".join)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(unicode_text, min_size=1, max_size=3))
def test_round_trip_random_unicode_over_many_ranges(ray_local, tmp_path_factory, texts):
    root = tmp_path_factory.mktemp("corpus")
    files = {f"f{i}.txt": t.encode("utf-8") for i, t in enumerate(texts)}
    write_corpus(root, files)
    out = tmp_path_factory.mktemp("ds") / "ds"
    prepare([str(root)], str(out), PrepareOptions(range_mb=24 / 2**20, run_length=7, val_fraction=0), **QUIET)
    dataset = PreparedDataset(str(out))
    rebuilt = texts_by_source(dataset)
    for name in files:
        expected = normalized(root / name)
        assert rebuilt.get(f"{root}/{name}", "") == expected
        assert dataset.decode(dataset.encode(expected)) == expected


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64).map(lambda b: bytes(x % 128 for x in b))
       | st.text(alphabet="ab\r\n\u00e9").map(str.encode))
def test_fast_ascii_count_equals_counting_the_decoded_text(data):
    """Pass 1 counts ASCII ranges on the raw bytes; it must count what pass 2 encodes."""
    counted, decoded = count_range(data, "strict"), decode_range(data, "strict")
    values, counts = count_codepoints(decoded.codepoints)
    assert counted.codepoints.tolist() == values.tolist() and counted.counts.tolist() == counts.tolist()
    assert (counted.chars, counted.has_nul) == (decoded.codepoints.size, decoded.has_nul)


def test_multi_file_multi_folder_corpus_with_globs(ray_local, tmp_path):
    write_corpus(tmp_path, {
        "a/one.txt": b"first file\n" * 50,
        "a/b/two.txt": b"second file\r\n" * 40,
        "a/b/c/three.md": "third \u00e9t\u00e9\n".encode() * 30,
        "a/.hidden/skip.txt": b"hidden folders are skipped",
        "d/four.txt": b"fourth\n" * 20,
        "d/five.log": b"not matched by the glob",
    })
    out = tmp_path / "ds"
    manifest = prepare([str(tmp_path / "a"), str(tmp_path / "d" / "*.txt")], str(out),
                       PrepareOptions(run_length=64), **QUIET)
    uris = [s["uri"] for s in manifest["sources"]]
    assert uris == sorted(f"{tmp_path}/{p}" for p in ("a/one.txt", "a/b/two.txt", "a/b/c/three.md", "d/four.txt"))
    rebuilt = texts_by_source(PreparedDataset(str(out)))
    for uri in uris:
        assert rebuilt[uri] == normalized(__import__("pathlib").Path(uri))


def test_recursive_glob(tmp_path):
    write_corpus(tmp_path, {"x/1.txt": b"a", "x/y/2.txt": b"b", "x/y/3.csv": b"c"})
    found = [s.uri for s in expand_inputs([str(tmp_path / "x" / "**" / "*.txt")])]
    assert found == [f"{tmp_path}/x/1.txt", f"{tmp_path}/x/y/2.txt"]
    assert [s.uri for s in expand_inputs([str(tmp_path / "x" / "*.txt")])] == [f"{tmp_path}/x/1.txt"]


def test_manifest_figures_match_the_source(ray_local, tmp_path):
    rng = np.random.default_rng(1)
    words = ["the", "cat", "naïve", "café", "Ωmega", "line\r\n", "end\n", "x\ry"]
    files = {f"doc{i}.txt": " ".join(rng.choice(words, 3000)).encode() for i in range(3)}
    write_corpus(tmp_path, files)
    out = tmp_path / "ds"
    manifest = prepare([str(tmp_path / "doc*.txt")], str(out), PrepareOptions(run_length=500, range_mb=0.004), **QUIET)
    texts = {f"{tmp_path}/{name}": normalized(tmp_path / name) for name in files}
    assert [(s["uri"], s["size"], s["chars"]) for s in manifest["sources"]] == [
        (uri, len(files[uri.rsplit("/", 1)[1]]), len(text)) for uri, text in sorted(texts.items())]
    counts = Counter("".join(texts.values()))
    vocab = manifest["vocab"]
    assert vocab["chars"] == "".join(sorted(counts))
    assert vocab["counts"] == [counts[c] for c in vocab["chars"]]
    assert vocab["unknown_id"] == len(counts) and vocab["size"] == len(counts) + 1 and vocab["dtype"] == "uint8"
    splits = manifest["splits"]
    assert splits["train"]["tokens"] + splits["validation"]["tokens"] == sum(counts.values()) == \
        manifest["totals"]["chars"]
    assert manifest["totals"]["bytes"] == sum(len(b) for b in files.values())
    total_runs = manifest["totals"]["runs"]
    assert splits["train"]["runs"] + splits["validation"]["runs"] == total_runs
    assert splits["validation"]["runs"] == round(total_runs * 0.1)
    for split in ("train", "validation"):
        for shard in splits[split]["shards"]:
            payload = (out / shard["path"]).read_bytes()
            assert hashlib.sha256(payload).hexdigest() == shard["sha256"] and len(payload) == shard["bytes"]
    dataset = PreparedDataset(str(out))
    train_runs = list(dataset.iter_runs("train"))
    assert sum(len(r) for r in train_runs) == splits["train"]["tokens"] and len(train_runs) == splits["train"]["runs"]
    assert dataset.ray_dataset("validation").count() == splits["validation"]["runs"]
    assert dataset.verify() == []


def test_validation_never_shares_a_run_with_train(ray_local, tmp_path):
    write_corpus(tmp_path, {"t.txt": b"abcdefghij" * 500})
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "ds"), PrepareOptions(run_length=50, range_mb=0.001), **QUIET)

    dataset = PreparedDataset(str(tmp_path / "ds"))
    runs = {split: {r for p in dataset.shard_paths(split) for r in pq.read_table(p)["run"].to_pylist()}
            for split in ("train", "validation")}
    assert runs["train"].isdisjoint(runs["validation"])
    assert runs["train"] | runs["validation"] == set(range(dataset.manifest["totals"]["runs"]))
    assert len(runs["validation"]) == round(0.1 * dataset.manifest["totals"]["runs"])


def test_same_inputs_give_byte_identical_shards(ray_local, tmp_path):
    write_corpus(tmp_path / "c", {f"{i}.txt": f"text number {i} ünïcode\r\n".encode() * 200 for i in range(5)})
    options = PrepareOptions(run_length=100, range_mb=0.002)
    first = prepare([str(tmp_path / "c")], str(tmp_path / "one"), options, **QUIET)
    second = prepare([str(tmp_path / "c")], str(tmp_path / "two"), options, **QUIET)
    shards = lambda m: [(s["path"], s["sha256"]) for split in m["splits"].values() for s in split["shards"]]
    assert shards(first) == shards(second) and len(shards(first)) > 2
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()


def test_one_file_is_read_by_at_least_four_tasks_without_a_newline(ray_local, tmp_path):
    """A single 200 KB line, read in 16 KiB ranges: many tasks, each holding only its range."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdéfgh€"), 60_000))
    assert "\n" not in text
    write_corpus(tmp_path, {"line.txt": text.encode()})
    options = PrepareOptions(range_mb=1 / 64, run_length=1000)
    sources = expand_inputs([str(tmp_path / "line.txt")])
    tasks = TextRangeDatasource(sources, options.range_bytes).get_read_tasks(parallelism=1)
    assert len(tasks) >= 4
    assert max(t.metadata.size_bytes for t in tasks) <= options.range_bytes
    manifest = prepare([str(tmp_path / "line.txt")], str(tmp_path / "ds"), options, **QUIET)
    assert sum(len(s["shards"]) for s in manifest["splits"].values()) >= 4
    assert texts_by_source(PreparedDataset(str(tmp_path / "ds")))[f"{tmp_path}/line.txt"] == text


def test_range_edges_never_split_a_character_or_a_crlf_pair(ray_local, tmp_path):
    euro = "€".encode()  # 3 bytes
    # Cuts every 16 bytes: put a multi-byte character across each cut, and a CRLF exactly on one.
    data = b"a" * 15 + euro + b"b" * 13 + b"\r\n" + b"c" * 14 + "😀".encode() + b"d" * 40
    assert snap_cut(data, 0, 16, len(data)) == 18  # inside the euro sign -> after it
    assert snap_cut(data, 0, 32, len(data)) == 33  # between CR and LF -> after the LF
    assert snap_cut(data, 0, 15, len(data)) == 15  # already a boundary
    write_corpus(tmp_path, {"edge.txt": data})
    prepare([str(tmp_path / "edge.txt")], str(tmp_path / "ds"),
            PrepareOptions(range_mb=16 / 2**20, run_length=5), **QUIET)
    rebuilt = texts_by_source(PreparedDataset(str(tmp_path / "ds")))
    assert rebuilt[f"{tmp_path}/edge.txt"] == normalize_newlines(data.decode())


# --- bad input ---------------------------------------------------------------------------------

def test_invalid_utf8_strict_names_file_and_byte_offset(ray_local, tmp_path):
    data = b"x" * 5000 + b"\xff" + b"y" * 100
    write_corpus(tmp_path / "c", {"ok.txt": b"fine\n", "bad.txt": data})
    with pytest.raises(CorpusError, match=rf"invalid UTF-8 in {tmp_path}/c/bad.txt at byte 5000"):
        prepare([str(tmp_path / "c")], str(tmp_path / "ds"), PrepareOptions(range_mb=0.001), **QUIET)
    assert not (tmp_path / "ds").exists()


def test_invalid_utf8_replace_substitutes_and_counts(ray_local, tmp_path):
    write_corpus(tmp_path / "c", {"bad.txt": b"ab\xffcd\xfe\xfeef \xef\xbf\xbd"})  # the last is a genuine U+FFFD
    manifest = prepare([str(tmp_path / "c" / "bad.txt")], str(tmp_path / "ds"),
                       PrepareOptions(errors="replace", val_fraction=0), **QUIET)
    assert manifest["totals"]["replaced_chars"] == 3
    rebuilt = texts_by_source(PreparedDataset(str(tmp_path / "ds")))
    assert rebuilt[f"{tmp_path}/c/bad.txt"] == "ab\ufffdcd\ufffd\ufffdef \ufffd"


def test_binary_file_is_skipped_with_a_warning(ray_local, tmp_path):
    write_corpus(tmp_path / "c", {"text.txt": b"hello world\n" * 20, "image.bin": b"\x89PNG\x00\x00\xff\xfe" * 100})
    messages = []
    manifest = prepare([str(tmp_path / "c")], str(tmp_path / "ds"), PrepareOptions(run_length=20), log=messages.append)
    assert any("skipping binary file" in m and "image.bin" in m for m in messages)
    assert [s["uri"] for s in manifest["sources"]] == [f"{tmp_path}/c/text.txt"]
    assert manifest["skipped"][0]["uri"] == f"{tmp_path}/c/image.bin"


def test_only_binary_files_is_an_error(ray_local, tmp_path):
    write_corpus(tmp_path / "c", {"a.bin": b"\x00\x01"})
    with pytest.raises(CorpusError, match="every file is binary"):
        prepare([str(tmp_path / "c")], str(tmp_path / "ds"), **QUIET)


def test_empty_corpus_is_an_error(ray_local, tmp_path):
    write_corpus(tmp_path / "c", {"empty1.txt": b"", "sub/empty2.txt": b""})
    with pytest.raises(CorpusError, match="the corpus is empty"):
        prepare([str(tmp_path / "c")], str(tmp_path / "ds"), **QUIET)


def test_missing_path_and_empty_folder_are_named(tmp_path):
    with pytest.raises(CorpusError, match=f"input not found: {tmp_path}/nope.txt"):
        expand_inputs([str(tmp_path / "nope.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=f"no files under folder {tmp_path}/empty"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(CorpusError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.zzz")])


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path):
    write_corpus(tmp_path, {"c.txt": b"text", "precious/notes.txt": b"mine"})
    with pytest.raises(StorageError, match="refusing to replace"):  # a location's error (storage.py), any command
        prepare([str(tmp_path / "c.txt")], str(tmp_path / "precious"), **QUIET)
    assert (tmp_path / "precious" / "notes.txt").read_bytes() == b"mine"


def test_replacing_a_dataset_keeps_no_leftovers(ray_local, tmp_path):
    write_corpus(tmp_path, {"c.txt": b"version one\n" * 30})
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "ds"), PrepareOptions(run_length=20), **QUIET)
    write_corpus(tmp_path, {"c.txt": b"version two!\n" * 30})
    manifest = prepare([str(tmp_path / "c.txt")], str(tmp_path / "ds"), PrepareOptions(run_length=20), **QUIET)
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text()) == \
        {k: v for k, v in manifest.items() if k != "elapsed_s"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "ds"]
    assert "!" in PreparedDataset(str(tmp_path / "ds")).vocab.chars


def test_a_manifest_is_data_never_a_path_to_follow(ray_local, tmp_path):
    """Shard paths are confined to the dataset folder, and a malformed manifest is one line."""
    import shutil

    from conftest import error_line, run_cli

    write_corpus(tmp_path / "c", {"c.txt": b"some text to prepare\n" * 50})
    prepare([str(tmp_path / "c")], str(tmp_path / "ds"), PrepareOptions(run_length=50), **QUIET)
    (tmp_path / "secret.parquet").write_bytes((tmp_path / "ds" / "train").glob("*.parquet").__next__().read_bytes())
    good = json.loads((tmp_path / "ds" / "manifest.json").read_text())

    def first_shard(m):
        return m["splits"]["train"]["shards"][0]

    damages = {
        "../secret.parquet": (lambda m: first_shard(m).update(path="../secret.parquet"), "is not a train/part-"),
        "absolute": (lambda m: first_shard(m).update(path=str(tmp_path / "secret.parquet")), "is not a train/part-"),
        "no splits": (lambda m: m.pop("splits"), "malformed: no 'splits' field"),
        "bad count": (lambda m: first_shard(m).update(rows="12"), "rows must be a count"),
        "bad vocab": (lambda m: m["vocab"].update(counts=[1]), "counts must be a list"),
    }
    for name, (damage, words) in damages.items():
        folder = tmp_path / f"bad-{len(name)}-{abs(hash(name)) % 1000}"
        shutil.copytree(tmp_path / "ds", folder)
        manifest = json.loads(json.dumps(good))
        damage(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CorpusError, match=words):
            PreparedDataset(str(folder))
        if name == "../secret.parquet":
            line = error_line(run_cli("verify", folder))
            assert "is not a train/part-" in line


def test_verify_streams_each_shard(ray_local, tmp_path, monkeypatch):
    """The checksum is taken block by block: a block smaller than a shard gives the same verdicts."""
    import pipeline.shards

    write_corpus(tmp_path / "c", {"c.txt": b"some text to prepare\n" * 500})
    prepare([str(tmp_path / "c")], str(tmp_path / "ds"), PrepareOptions(run_length=50), **QUIET)
    monkeypatch.setattr(pipeline.shards, "VERIFY_BLOCK", 100)
    assert PreparedDataset(str(tmp_path / "ds")).verify() == []
    shard = next((tmp_path / "ds" / "train").glob("*.parquet"))
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 2] ^= 1
    shard.write_bytes(bytes(payload))
    assert PreparedDataset(str(tmp_path / "ds")).verify() == [f"train/{shard.name}: checksum mismatch"]
