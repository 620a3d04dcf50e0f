"""Open a prepared text dataset (docs/contracts.md, section 1): its vocabulary and token runs."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.shards import TEXT_FORMAT, ShardedDataset, binary_runs
from pipeline.text.vocab import Vocabulary

FORMAT_VERSION = 2


class PreparedDataset(ShardedDataset):
    format, format_version, command = TEXT_FORMAT, FORMAT_VERSION, "charrnn prepare"
    column, count = "tokens", "tokens"

    def _check_manifest(self) -> None:
        super()._check_manifest()
        self.vocab = Vocabulary.from_json(self.manifest["vocab"])

    def encode(self, text: str) -> np.ndarray:
        return self.vocab.encode(text)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def _runs(self, column: pa.ChunkedArray) -> Iterator[np.ndarray]:
        return token_runs(column, self.vocab.dtype)


def token_runs(column: pa.ChunkedArray, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The runs of a shard's `tokens` column (binary values) as arrays of ids, zero-copy from Arrow."""
    return binary_runs(column, dtype)
