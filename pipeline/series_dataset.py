"""Open a prepared series dataset folder (docs/contracts.md section 4.1): its manifest, shards as Ray
Datasets or a local iterator of runs, and a checksum verification."""
from __future__ import annotations

import hashlib
import json
from typing import Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset import PreparedDataset
from pipeline.errors import CorpusError
from pipeline.prepare import MANIFEST, SPLITS
from pipeline.sources import resolve_filesystem

FORMAT = "charrnn-series-dataset"
FORMAT_VERSION = 1
SHARD_SCHEMA = pa.schema([("series", pa.string()), ("start", pa.int64()), ("run", pa.int64()),
                          ("values", pa.binary())])


def _read_manifest(location: str):
    fs, root = resolve_filesystem(location)
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/{MANIFEST}") as f:
            return fs, root, json.loads(f.read())
    except FileNotFoundError:
        raise CorpusError(f"{location} is not a prepared dataset: no {MANIFEST}") from None
    except (OSError, ValueError) as err:
        raise CorpusError(f"cannot read {location}/{MANIFEST}: {err}") from None


def open_prepared(location: str) -> Union[PreparedDataset, "PreparedSeries"]:
    """A text or a series dataset, whichever the manifest says."""
    _, _, manifest = _read_manifest(location)
    return PreparedSeries(location) if manifest.get("format") == FORMAT else PreparedDataset(location)


class PreparedSeries:
    def __init__(self, location: str):
        self.location = location
        self.fs, self.root, self.manifest = _read_manifest(location)
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise CorpusError(f"{location}/{MANIFEST} is format {self.manifest.get('format')!r} version "
                              f"{self.manifest.get('format_version')}; a series dataset is {FORMAT} version "
                              f"{FORMAT_VERSION} (charrnn prepare-series)")
        self.columns: list[str] = self.manifest["columns"]
        self.normalization: dict = self.manifest["normalization"]  # {"mean": [...], "std": [...]} per feature

    @property
    def features(self) -> int:
        return len(self.columns)

    def points(self, split: str) -> int:
        return self._split(split)["points"]

    def runs(self, split: str) -> int:
        return self._split(split)["runs"]

    def shard_paths(self, split: str) -> list[str]:
        """Paths inside `self.fs`, in manifest order (which is run order)."""
        return [f"{self.root.rstrip('/')}/{s['path']}" for s in self._split(split)["shards"]]

    def ray_dataset(self, split: str):
        """The split as a Ray Dataset with one row per run: series, start, run, values."""
        import ray.data

        paths = self.shard_paths(split)
        if not paths:
            raise CorpusError(f"{self.location} has no {split} shards")
        # partitioning=None: a `key=value` folder in DIR's path must not turn into a column.
        return ray.data.read_parquet(paths, filesystem=self.fs, partitioning=None)

    def iter_runs(self, split: str) -> Iterator[np.ndarray]:
        """Each run's points as float32 [points, features] (read-only), in run order, without Ray."""
        for path in self.shard_paths(split):
            with self.fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=["values"])
            yield from value_runs(table["values"], self.features)

    def verify(self) -> list[str]:
        """Problems found by re-reading every shard: size, sha256, rows and points."""
        problems = []
        for split in SPLITS:
            for shard in self._split(split)["shards"]:
                try:
                    with self.fs.open_input_stream(f"{self.root.rstrip('/')}/{shard['path']}") as f:
                        payload = f.read()
                except OSError:
                    problems.append(f"{shard['path']}: missing")
                    continue
                if len(payload) != shard["bytes"] or hashlib.sha256(payload).hexdigest() != shard["sha256"]:
                    problems.append(f"{shard['path']}: checksum mismatch")
                    continue
                table = pq.read_table(pa.BufferReader(payload), columns=["values"])
                points = sum(len(run) for run in value_runs(table["values"], self.features))
                if table.num_rows != shard["rows"] or points != shard["points"]:
                    problems.append(f"{shard['path']}: {table.num_rows} rows / {points} points, manifest says "
                                    f"{shard['rows']} / {shard['points']}")
        return problems

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.manifest["splits"][split]


def value_runs(column: Union[pa.ChunkedArray, pa.Array], features: int) -> Iterator[np.ndarray]:
    """The runs of a shard's `values` column (binary, float32 little-endian, row-major) as float32
    arrays [points, features], zero-copy from Arrow (so read-only)."""
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, np.int64 if pa.types.is_large_binary(chunk.type) else np.int32)
        offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield data[start:end].view("<f4").reshape(-1, features)
