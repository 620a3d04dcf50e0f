"""Open a prepared series dataset (docs/contracts.md, section 4.1): its columns, normalization and
value runs."""
from __future__ import annotations

from typing import Iterator, Union

import numpy as np
import pyarrow as pa

from pipeline.shards import SERIES_FORMAT, ShardedDataset, binary_runs

FORMAT_VERSION = 1
SHARD_SCHEMA = pa.schema([("series", pa.string()), ("start", pa.int64()), ("run", pa.int64()),
                          ("values", pa.binary())])


class PreparedSeries(ShardedDataset):
    format, format_version, command = SERIES_FORMAT, FORMAT_VERSION, "charrnn prepare-series"
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
    return binary_runs(column, "<f4", (-1, features))
