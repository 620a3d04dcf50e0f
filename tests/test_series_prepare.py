"""charrnn prepare-series: the generated sine, CSV and Parquet files -> series dataset, and bad inputs."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import error_line, run_cli
from pipeline.errors import CorpusError
from pipeline.series.dataset import PreparedSeries
from pipeline.series.prepare import SeriesOptions, prepare_series
from pipeline.series.dataset import value_runs

QUIET = dict(log=lambda msg: None)
SINE = SeriesOptions(synthetic="sine", series=3, points=2000, run_length=300, shard_points=1000)


def run_table(dataset: PreparedSeries, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(path) for path in dataset.shard_paths(split))


def all_runs(dataset: PreparedSeries) -> list[tuple[int, str, int, np.ndarray]]:
    """(run, series, start, values) of both splits, in run order."""
    runs = []
    for split in ("train", "validation"):
        table = run_table(dataset, split)
        runs += zip(table["run"].to_pylist(), table["series"].to_pylist(), table["start"].to_pylist(),
                    value_runs(table["values"], dataset.features))
    return sorted(runs, key=lambda r: r[0])


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# --- the generated sine ------------------------------------------------------------------------

def test_sine_layout_splits_runs_and_normalization(tmp_path):
    manifest = prepare_series([], str(tmp_path / "ds"), SINE, **QUIET)
    dataset = PreparedSeries(str(tmp_path / "ds"))
    assert manifest["format"] == "charrnn-series-dataset" and manifest["format_version"] == 1
    assert dataset.columns == ["value"] and manifest["series_id"] is None and manifest["sources"] == []
    assert manifest["totals"] == {"files": 0, "rows": 6000, "series": 3}
    assert manifest["synthetic"]["kind"] == "sine" and len(manifest["synthetic"]["phases"]) == 3
    assert manifest["options"]["run_length"] == 300 and manifest["options"]["columns"] == ["value"]

    # Each series: its first 90% (1800 points, six runs of 300) train, its last 200 points validation.
    assert (dataset.points("train"), dataset.runs("train")) == (5400, 18)
    assert (dataset.points("validation"), dataset.runs("validation")) == (600, 3)
    runs = all_runs(dataset)
    assert [r[0] for r in runs] == list(range(21))  # numbered in (series, position) order
    for series in range(3):
        mine = runs[7 * series : 7 * series + 7]
        assert {r[1] for r in mine} == {f"sine-{series}"}
        assert [r[2] for r in mine] == [0, 300, 600, 900, 1200, 1500, 1800]
        phase = manifest["synthetic"]["phases"][series]
        for _, _, start, values in mine:
            assert values.dtype == np.float32 and values.shape == (300 if start < 1800 else 200, 1)
            np.testing.assert_allclose(values[:, 0], np.sin(0.1 * np.arange(start, start + len(values)) + phase),
                                       atol=1e-6)
    for split in ("train", "validation"):
        shards = manifest["splits"][split]["shards"]
        assert all(s["points"] <= 1000 for s in shards) and sum(s["rows"] for s in shards) == dataset.runs(split)
        table = run_table(dataset, split)
        assert table["run"].to_pylist() == sorted(table["run"].to_pylist())  # rows in run order

    train = np.concatenate(list(dataset.iter_runs("train"))).astype(np.float64)
    assert len(train) == 5400
    np.testing.assert_allclose(dataset.normalization["mean"], train.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dataset.normalization["std"], train.std(axis=0), rtol=1e-12)


def test_rerun_is_byte_identical_and_verify_finds_a_corrupted_shard(tmp_path):
    for name in ("a", "b"):
        prepare_series([], str(tmp_path / name), SINE, **QUIET)
    files = {name: {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()}
             for name in ("a", "b")}
    assert files["a"] == files["b"] and len(files["a"]) == 1 + 6 + 1
    dataset = PreparedSeries(str(tmp_path / "a"))
    assert dataset.verify() == []
    shard = tmp_path / "a" / dataset.manifest["splits"]["train"]["shards"][2]["path"]
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    shard.write_bytes(bytes(payload))
    assert dataset.verify() == ["train/part-000002.parquet: checksum mismatch"]


def test_val_fraction_zero_and_a_constant_series(tmp_path):
    prepare_series([], str(tmp_path / "ds"), SeriesOptions(synthetic="sine", series=1, points=10, val_fraction=0,
                                                           run_length=4), **QUIET)
    dataset = PreparedSeries(str(tmp_path / "ds"))
    assert [len(r) for r in dataset.iter_runs("train")] == [4, 4, 2] and dataset.runs("validation") == 0


# --- files -------------------------------------------------------------------------------------

def test_csv_series_id_keeps_each_series_order_across_files_in_input_order(ray_local, tmp_path):
    # b.csv is given first though it sorts last; three series' rows interleave, x's continue into a.csv.
    (tmp_path / "b.csv").write_text("id,value,note\n" + "".join(f"x,{1000 + i},n\ny,{2000 + i},n\n" for i in range(40)))
    (tmp_path / "a.csv").write_text("id,value,note\n" + "".join(f"z,{3000 + i},n\nx,{1040 + i},n\n" for i in range(40)))
    options = SeriesOptions(columns=("value",), series_id="id", run_length=9, val_fraction=0.25)
    manifest = prepare_series([str(tmp_path / "b.csv"), str(tmp_path / "a.csv")], str(tmp_path / "ds"), options,
                              **QUIET)
    expected = {"x": np.arange(1000, 1080), "y": np.arange(2000, 2040), "z": np.arange(3000, 3040)}
    assert [s["uri"] for s in manifest["sources"]] == [str(tmp_path / "b.csv"), str(tmp_path / "a.csv")]
    assert [s["rows"] for s in manifest["sources"]] == [80, 80]
    assert manifest["totals"] == {"files": 2, "rows": 160, "series": 3} and manifest["series_id"] == "id"

    runs = all_runs(PreparedSeries(str(tmp_path / "ds")))
    assert [r[1] for r in runs] == ["x"] * 10 + ["y"] * 5 + ["z"] * 5  # series in order of first appearance
    for _, series, start, values in runs:
        np.testing.assert_array_equal(values[:, 0], expected[series][start : start + len(values)])
    # x: 60 train points, 20 validation (9 + 9 + 2). y and z: 30 train, 10 validation: 9 and a single point,
    # which is dropped (nothing to predict from it).
    assert [r[2] for r in runs if r[1] == "x"] == [0, 9, 18, 27, 36, 45, 54, 60, 69, 78]
    assert [r[2] for r in runs if r[1] == "y"] == [0, 9, 18, 27, 30]
    assert manifest["splits"]["validation"]["points"] == 20 + 9 + 9
    train = np.concatenate([expected["x"][:60], expected["y"][:30], expected["z"][:30]])
    assert manifest["normalization"]["mean"] == pytest.approx([train.mean()], rel=1e-12)
    assert manifest["normalization"]["std"] == pytest.approx([train.std()], rel=1e-12)


def test_parquet_folder_with_two_features(ray_local, tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for k in range(2):
        pq.write_table(pa.table({"a": np.arange(100, dtype=np.float32) / 4 + k, "b": np.arange(100) * 10 + k,
                                 "label": ["?"] * 100}), folder / f"s{k}.parquet")
    (folder / "notes.txt").write_text("a folder gives only its .csv and .parquet files")
    manifest = prepare_series([str(folder)], str(tmp_path / "ds"), SeriesOptions(columns=("b", "a"), run_length=50),
                              **QUIET)
    dataset = PreparedSeries(str(tmp_path / "ds"))
    assert dataset.columns == ["b", "a"] and manifest["totals"]["series"] == 2
    runs = all_runs(dataset)
    assert [r[1] for r in runs] == [f"{folder}/s0.parquet"] * 3 + [f"{folder}/s1.parquet"] * 3
    for _, series, start, values in runs:
        k = int(series[-9])
        t = np.arange(start, start + len(values))
        np.testing.assert_array_equal(values, np.stack([t * 10 + k, t / 4 + k], axis=1).astype(np.float32))
    train = np.concatenate(list(dataset.iter_runs("train"))).astype(np.float64)
    np.testing.assert_allclose(dataset.normalization["mean"], train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dataset.normalization["std"], train.std(axis=0), rtol=1e-12)
    # The same runs through Ray Data.
    ray_runs = [run for batch in dataset.ray_dataset("train").iter_batches(batch_format="pyarrow")
                for run in value_runs(batch["values"], 2)]
    assert sum(map(len, ray_runs)) == dataset.points("train") == 180


def _late_nan(path):
    # Over 1 MiB, so the NaN is in a later chunk than the first: its row is counted across chunks.
    path.write_text("value\n" + "0.125\n" * 180_000 + "nan\n" + "0.5\n" * 10)


def _parquet(table):
    def write(path):
        pq.write_table(table, path)
    return write


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", "t,x\n1,2\n", "missing.csv has no column 'value' (its columns: t, x)"),
    ("text.csv", "value\n1.5\n2.5\nabc\n", "text.csv: column 'value' is not numeric: 'abc' at row 3"),
    ("nan.csv", "value\n1\n2\n3\nNaN\n", "nan.csv: column 'value' has a NaN value at row 4"),
    ("null.csv", "value,t\n1,0\n,1\n2,2\n", "null.csv: column 'value' has a missing (null) value at row 2"),
    ("inf.csv", "value\n1\n-inf\n", "inf.csv: column 'value' has an infinite value at row 2"),
    ("late.csv", _late_nan, "late.csv: column 'value' has a NaN value at row 180001"),
    ("empty.csv", "", "empty.csv is empty"),
    ("header.csv", "value\n", "header.csv has no rows"),
    ("ragged.csv", "value,t\n1,2\n3,4,5\n", "ragged.csv is not a readable CSV file: CSV parse error"),
    ("data.txt", "value\n1\n", "data.txt is not a CSV or Parquet file"),
    ("text.parquet", _parquet(pa.table({"value": ["1", "2"]})),
     "text.parquet: column 'value' is not numeric (type string)"),
    ("null.parquet", _parquet(pa.table({"value": [1.0, 2.0, None]})),
     "null.parquet: column 'value' has a missing (null) value at row 3"),
    ("bad.parquet", "not parquet at all", "bad.parquet is not a readable Parquet file"),
])
def test_bad_inputs_are_one_line_errors_naming_file_column_and_row(ray_local, tmp_path, name, content, message):
    good = tmp_path / "good.csv"  # read first, so the bad file is not the one checked before Ray starts
    good.write_text("value\n" + "1\n" * 50)
    path = tmp_path / name
    content(path) if callable(content) else path.write_text(content)
    with pytest.raises(CorpusError) as raised:
        prepare_series([str(good), str(path)], str(tmp_path / "ds"), SeriesOptions(columns=("value",)), **QUIET)
    assert "\n" not in str(raised.value) and message in str(raised.value)
    assert str(path) in str(raised.value)
    assert not (tmp_path / "ds").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("options, message", [
    (SeriesOptions(columns=("value",), val_fraction=1.0), "--val-fraction must be in [0, 1), got 1.0"),
    (SeriesOptions(columns=("value",), run_length=1), "--run-length must be >= 2, got 1"),
    (SeriesOptions(), "--column is required"),
    (SeriesOptions(columns=("value",), series_id="value"), "--series-id value is also a --column"),
    (SeriesOptions(columns=("x",), synthetic="sine"), "--synthetic sine makes one column, value"),
])
def test_bad_options(tmp_path, options, message):
    (tmp_path / "s.csv").write_text("value\n1\n2\n")
    with pytest.raises(CorpusError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        prepare_series([str(tmp_path / "s.csv")], str(tmp_path / "ds"), options, **QUIET)
    assert not (tmp_path / "ds").exists()


def test_too_short_series_are_refused(ray_local, tmp_path):
    (tmp_path / "s.csv").write_text("value\n1\n2\n3\n4\n5\n")
    with pytest.raises(CorpusError, match="no validation run"):
        prepare_series([str(tmp_path / "s.csv")], str(tmp_path / "ds"), SeriesOptions(columns=("value",)), **QUIET)


# --- the command line --------------------------------------------------------------------------

def test_cli_synthetic_summary_and_verify(tmp_path):
    result = run_cli("prepare-series", "--synthetic", "sine", "--series", 2, "--points", 500, "--run-length", 100,
                     "--out", tmp_path / "ds")
    assert result.returncode == 0, result.stderr
    for words in ("series      2", "train       900 points in 10 runs", "validation  100 points in 2 runs",
                  "shards      2", str(tmp_path / "ds")):
        assert words in result.stdout
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["splits"]["train"]["points"] == 900
    shard = tmp_path / "ds" / "validation" / "part-000000.parquet"
    shard.write_bytes(shard.read_bytes()[:-9] + b"corrupted")
    bad = run_cli("verify", tmp_path / "ds")
    assert bad.returncode == 1 and "validation/part-000000.parquet: checksum mismatch" in bad.stderr


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    (tmp_path / "s.csv").write_text("t,value\n" + "".join(f"{i},{i / 10}\n" for i in range(50)) + "50,nan\n")
    for args, message in [
        (["--column", "valu"], "s.csv has no column 'valu' (its columns: t, value)"),  # found before Ray starts
        (["--column", "value", "--num-cpus", "1"], "s.csv: column 'value' has a NaN value at row 51"),  # found by Ray
    ]:
        result = run_cli("prepare-series", tmp_path / "s.csv", "--out", tmp_path / "ds", *args)
        line = error_line(result)
        assert result.returncode == 2 and line.startswith("charrnn prepare-series: error: ") and message in line
        assert not (tmp_path / "ds").exists()
