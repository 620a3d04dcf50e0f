"""What both kinds of prepared dataset share (docs/contracts.md, sections 1 and 4.1): the splits, the
manifest, shard files (written whole, named `SPLIT/part-*.parquet`, checked by size and sha256),
runs stored as binary values, reading it all back (`ShardedDataset`), and `open_prepared`, which
opens either kind. The kinds themselves live in pipeline/text and pipeline/series."""
from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
# Imported on purpose: a process that reads Parquet through pyarrow without Ray loaded aborts now
# and then at exit ("terminate called without an active exception", arrow#34314: an Arrow I/O
# thread outlives the interpreter); with Ray loaded it does not. `charrnn verify` reads shards
# here without Ray otherwise.
import ray  # noqa: F401

from pipeline.errors import CorpusError
from storage import Kind, resolve_filesystem, write_bytes

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
SHARD = re.compile(r"(train|validation)/part-[0-9-]+\.parquet")
TEXT_FORMAT, SERIES_FORMAT = "charrnn-text-dataset", "charrnn-series-dataset"
# What `prepare` and `prepare-series` may replace: a dataset of either kind, or the shards of one
# whose copy-in to an object store was interrupted before its manifest arrived.
DATASET = Kind("charrnn dataset", MANIFEST, (TEXT_FORMAT, SERIES_FORMAT),
               leftover=lambda relative_path: bool(SHARD.fullmatch(relative_path)))
VERIFY_BLOCK = 1 << 22


def check_split_options(val_fraction: float, run_length: int) -> None:
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if run_length < 2:
        raise CorpusError(f"--run-length must be >= 2, got {run_length}")


def write_shard(fs: pafs.FileSystem, staging: str, name: str, table: pa.Table, dictionary: str, count: dict) -> dict:
    """Write `table` as the shard `name` (SPLIT/part-*.parquet) of a staging folder, zstd, its
    `dictionary` column dictionary-encoded; returns the shard's record, with `count` ({unit: n})."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", use_dictionary=[dictionary])
    payload = buffer.getvalue()
    write_bytes(fs, f"{staging}/{name}", payload)
    return {"path": name, "split": name.split("/", 1)[0], "rows": table.num_rows, **count, "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest()}


def split_summaries(shards: list[dict], unit: str) -> dict:
    """The manifest's `splits`: per split, its `unit` total, its runs and its shards' records."""
    splits = {}
    for split in SPLITS:
        mine = [{k: s[k] for k in ("path", "rows", unit, "bytes", "sha256")} for s in shards if s["split"] == split]
        splits[split] = {unit: sum(s[unit] for s in mine), "runs": sum(s["rows"] for s in mine), "shards": mine}
    return splits


def binary_runs(column: Union[pa.ChunkedArray, pa.Array], dtype, shape: tuple = (-1,)) -> Iterator[np.ndarray]:
    """The runs of a binary shard column as arrays of `dtype` shaped `shape`, zero-copy from Arrow
    (so read-only)."""
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, np.int64 if pa.types.is_large_binary(chunk.type) else np.int32)
        offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield data[start:end].view(dtype).reshape(shape)


def open_prepared(location: str) -> "ShardedDataset":
    """A text or a series dataset, whichever the manifest says."""
    # Imported here: both kinds build on this module.
    from pipeline.series.dataset import PreparedSeries
    from pipeline.text.dataset import PreparedDataset

    _, _, manifest = read_manifest(location)
    return PreparedSeries(location) if manifest.get("format") == SERIES_FORMAT else PreparedDataset(location)


def read_manifest(location: str):
    """(filesystem, root path, manifest) of the dataset folder `location`."""
    fs, root = resolve_filesystem(location)
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/{MANIFEST}") as f:
            return fs, root, json.loads(f.read())
    except FileNotFoundError:
        raise CorpusError(f"{location} is not a prepared dataset: no {MANIFEST} (run charrnn prepare "
                          f"or prepare-series)") from None
    except (OSError, ValueError) as err:
        raise CorpusError(f"cannot read {location}/{MANIFEST}: {err}") from None


class ShardedDataset:
    """What every prepared dataset shares: its manifest, each split's shards in manifest order, and
    reading them back. A subclass names its format, the shard column holding a run (`column`), the
    manifest's per-shard count (`count`) and how a column becomes runs (`_runs`)."""
    format, format_version, command = "", 0, ""
    column, count = "", ""

    def __init__(self, location: str):
        self.location = location
        self.fs, self.root, self.manifest = read_manifest(location)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != self.format \
                or self.manifest.get("format_version") != self.format_version:
            found = self.manifest if isinstance(self.manifest, dict) else {}
            raise CorpusError(f"{location}/{MANIFEST} is format {found.get('format')!r} version "
                              f"{found.get('format_version')}; this reads {self.format} version "
                              f"{self.format_version} (written by {self.command})")
        try:
            self._check_manifest()
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorpusError(f"{location}/{MANIFEST} is malformed: {_what(err)}") from None

    def _check_manifest(self) -> None:
        """Raise on a manifest this code could trip on later: every split's shards listed with
        their checks, and each shard path one this project writes, inside the folder (a manifest
        is data: `../` or an absolute path must never be followed)."""
        for split in SPLITS:
            for shard in self.manifest["splits"][split]["shards"]:
                if not isinstance(shard["path"], str) or not SHARD.fullmatch(shard["path"]) \
                        or not shard["path"].startswith(f"{split}/"):
                    raise ValueError(f"shard path {shard['path']!r} is not a {split}/part-*.parquet of this folder")
                for key in ("bytes", "rows", self.count):
                    if not isinstance(shard[key], int) or isinstance(shard[key], bool) or shard[key] < 0:
                        raise ValueError(f"shard {shard['path']}: {key} must be a count, got {shard[key]!r}")
                if not isinstance(shard["sha256"], str):
                    raise ValueError(f"shard {shard['path']}: sha256 must be a string")

    def _runs(self, column: pa.ChunkedArray) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def shard_paths(self, split: str) -> list[str]:
        """Paths inside `self.fs`, in manifest order (which is run order)."""
        return [f"{self.root.rstrip('/')}/{s['path']}" for s in self._split(split)["shards"]]

    def ray_dataset(self, split: str, order: list[int] | None = None):
        """The split as a Ray Dataset with one row per run; `order` lists the shards to read by
        their index in the manifest (default: all, in manifest order)."""
        import ray.data

        paths = self.shard_paths(split)
        if not paths:
            raise CorpusError(f"{self.location} has no {split} shards")
        if order is not None:
            paths = [paths[i] for i in order]
        # Ray Data's first Parquet reader, not the DataSourceV2 one Ray 2.60 defaults to: V2 is ten
        # times slower to start reading a split (BENCHMARKS.md, "Figures from code comments"), and
        # every epoch of every worker starts with such a read.
        context = ray.data.DataContext.get_current()
        default, context.use_datasource_v2 = context.use_datasource_v2, False
        try:
            # partitioning=None: a `key=value` folder in DIR's path must not turn into a column.
            return ray.data.read_parquet(paths, filesystem=self.fs, partitioning=None)
        finally:
            context.use_datasource_v2 = default

    def iter_runs(self, split: str) -> Iterator[np.ndarray]:
        """Each run as an array, shard by shard in manifest order, without Ray."""
        for path in self.shard_paths(split):
            with self.fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=[self.column])
            yield from self._runs(table[self.column])

    def verify(self) -> list[str]:
        """Problems found by re-reading every shard: size, sha256, rows and the manifest's count.
        The checksum streams through each shard (memory: one block, whatever the shard's size)."""
        problems = []
        for split in SPLITS:
            for shard in self._split(split)["shards"]:
                path = f"{self.root.rstrip('/')}/{shard['path']}"
                digest, size = hashlib.sha256(), 0
                try:
                    with self.fs.open_input_stream(path) as f:
                        while block := f.read(VERIFY_BLOCK):
                            digest.update(block)
                            size += len(block)
                except OSError:  # FileNotFoundError included
                    problems.append(f"{shard['path']}: missing")
                    continue
                if size != shard["bytes"] or digest.hexdigest() != shard["sha256"]:
                    problems.append(f"{shard['path']}: checksum mismatch")
                    continue
                with self.fs.open_input_file(path) as f:
                    table = pq.read_table(f, columns=[self.column])
                found = sum(len(run) for run in self._runs(table[self.column]))
                if table.num_rows != shard["rows"] or found != shard[self.count]:
                    problems.append(f"{shard['path']}: {table.num_rows} rows / {found} {self.count}, manifest says "
                                    f"{shard['rows']} / {shard[self.count]}")
        return problems

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.manifest["splits"][split]


def _what(err: Exception) -> str:
    return f"no {err.args[0]!r} field" if isinstance(err, KeyError) else str(err)
