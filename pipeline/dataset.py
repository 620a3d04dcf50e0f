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
from pipeline.prepare import FORMAT, FORMAT_VERSION, SPLITS
from pipeline.publish import MANIFEST, SHARD
from pipeline.sources import resolve_filesystem
from pipeline.vocab import Vocabulary

VERIFY_BLOCK = 1 << 22


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
        # Ray Data's first Parquet reader, not the DataSourceV2 one Ray 2.60 defaults to: V2 takes
        # 3-4 s to start reading a one-shard split, and 9-15 s when two trainers read at once
        # (V1: 0.3-0.4 s), and every epoch of every worker starts with such a read.
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


class PreparedDataset(ShardedDataset):
    format, format_version, command = FORMAT, FORMAT_VERSION, "charrnn prepare"
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
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield data[start:end].view(dtype)
