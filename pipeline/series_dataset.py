"""Open a prepared series dataset folder (docs/contracts.md section 4.1): its manifest, shards as Ray
Datasets or a local iterator of runs, and a checksum verification."""
from __future__ import annotations

from typing import Iterator, Union

import numpy as np
import pyarrow as pa

from pipeline.dataset import PreparedDataset, ShardedDataset, read_manifest

FORMAT = "charrnn-series-dataset"
FORMAT_VERSION = 1
SHARD_SCHEMA = pa.schema([("series", pa.string()), ("start", pa.int64()), ("run", pa.int64()),
                          ("values", pa.binary())])


def open_prepared(location: str) -> Union[PreparedDataset, "PreparedSeries"]:
    """A text or a series dataset, whichever the manifest says."""
    _, _, manifest = read_manifest(location)
    return PreparedSeries(location) if manifest.get("format") == FORMAT else PreparedDataset(location)


class PreparedSeries(ShardedDataset):
    format, format_version, command = FORMAT, FORMAT_VERSION, "charrnn prepare-series"
    column, count = "values", "points"

    def _check_manifest(self) -> None:
        super()._check_manifest()
        self.columns: list[str] = self.manifest["columns"]
        self.normalization: dict = self.manifest["normalization"]  # {"mean": [...], "std": [...]} per feature
        if not isinstance(self.columns, list) or not self.columns or \
                not all(len(self.normalization[k]) == len(self.columns) for k in ("mean", "std")):
            raise ValueError("columns must be a non-empty list, with a normalization mean and std for each")

    @property
    def features(self) -> int:
        return len(self.columns)

    def points(self, split: str) -> int:
        return self._split(split)["points"]

    def runs(self, split: str) -> int:
        return self._split(split)["runs"]

    def _runs(self, column: pa.ChunkedArray) -> Iterator[np.ndarray]:
        """Each run's points as float32 [points, features] (read-only)."""
        return value_runs(column, self.features)


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
