"""Open a prepared dataset folder: its manifest, vocabulary, shards as Ray Datasets or a local
iterator, and a checksum verification."""
from __future__ import annotations

import hashlib
import json
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import CorpusError
from pipeline.prepare import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS
from pipeline.sources import resolve_filesystem
from pipeline.vocab import Vocabulary


class PreparedDataset:
    def __init__(self, location: str):
        self.location = location
        self.fs, self.root = resolve_filesystem(location)
        manifest_path = f"{self.root.rstrip('/')}/{MANIFEST}"
        try:
            with self.fs.open_input_stream(manifest_path) as f:
                self.manifest = json.loads(f.read())
        except FileNotFoundError:
            raise CorpusError(f"{location} is not a prepared dataset: no {MANIFEST} (run charrnn prepare)") from None
        except (OSError, ValueError) as err:
            raise CorpusError(f"cannot read {location}/{MANIFEST}: {err}") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise CorpusError(f"{location}/{MANIFEST} is format {self.manifest.get('format')!r} version "
                              f"{self.manifest.get('format_version')}; this charrnn reads {FORMAT} version {FORMAT_VERSION}")
        self.vocab = Vocabulary.from_json(self.manifest["vocab"])

    def encode(self, text: str) -> np.ndarray:
        return self.vocab.encode(text)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def shard_paths(self, split: str) -> list[str]:
        """Paths inside `self.fs`, in manifest order."""
        return [f"{self.root.rstrip('/')}/{s['path']}" for s in self._split(split)["shards"]]

    def ray_dataset(self, split: str):
        """The split as a Ray Dataset with one row per run: source, char_offset, run, tokens."""
        import ray.data

        paths = self.shard_paths(split)
        if not paths:
            raise CorpusError(f"{self.location} has no {split} shards")
        return ray.data.read_parquet(paths, filesystem=self.fs)

    def iter_runs(self, split: str) -> Iterator[np.ndarray]:
        """Each run's token ids, shard by shard in manifest order, without Ray."""
        for path in self.shard_paths(split):
            with self.fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=["tokens"])
            yield from token_runs(table["tokens"], self.vocab.dtype)

    def verify(self) -> list[str]:
        """Problems found by re-reading every shard: size, sha256, rows and tokens."""
        problems = []
        for split in SPLITS:
            for shard in self._split(split)["shards"]:
                path = f"{self.root.rstrip('/')}/{shard['path']}"
                try:
                    with self.fs.open_input_stream(path) as f:
                        payload = f.read()
                except (FileNotFoundError, OSError):
                    problems.append(f"{shard['path']}: missing")
                    continue
                if len(payload) != shard["bytes"] or hashlib.sha256(payload).hexdigest() != shard["sha256"]:
                    problems.append(f"{shard['path']}: checksum mismatch")
                    continue
                table = pq.read_table(pa.BufferReader(payload), columns=["tokens"])
                tokens = sum(len(run) for run in token_runs(table["tokens"], self.vocab.dtype))
                if table.num_rows != shard["rows"] or tokens != shard["tokens"]:
                    problems.append(f"{shard['path']}: {table.num_rows} rows / {tokens} tokens, manifest says "
                                    f"{shard['rows']} / {shard['tokens']}")
        return problems

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.manifest["splits"][split]



def token_runs(column: pa.ChunkedArray, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The runs of a shard's `tokens` column (binary values) as arrays of ids, zero-copy from Arrow."""
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield data[start:end].view(dtype)
