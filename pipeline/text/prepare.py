"""`charrnn prepare`: raw text -> vocabulary -> Parquet shards of token runs + manifest.json.

Two passes of Ray Data over byte ranges of the corpus (see text_ranges.py):
  1. count characters per range (also finds binary files and invalid UTF-8); merged on the driver;
  2. encode each range with the vocabulary, cut it into runs and write one shard per read task.
Everything is written to a staging folder, the manifest last, and published whole (storage.py).
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from pipeline.errors import CorpusError
from pipeline.shards import DATASET, MANIFEST, SPLITS, TEXT_FORMAT, check_split_options, split_summaries, write_shard
from pipeline.sources import SourceFile, default_corpus, default_corpus_root, expand_inputs
from pipeline.text.dataset import FORMAT_VERSION
from pipeline.text.ranges import TextRangeDatasource
from pipeline.text.vocab import Vocabulary, count_range, decode_range
from storage import claimed, resolve_filesystem, staged, write_bytes


@dataclass(frozen=True)
class PrepareOptions:
    min_count: int = 1
    max_vocab: Optional[int] = None
    val_fraction: float = 0.1
    run_length: int = 16384  # tokens per row: the longest stretch a trainer can carry state over
    # MiB one read task holds: bounded, whatever the file's size. Ray Data's cost per task is fixed, so
    # fewer, larger tasks go faster (BENCHMARKS.md, ingest).
    range_mb: float = 32.0
    errors: str = "strict"  # or "replace": invalid UTF-8 becomes U+FFFD

    def validate(self) -> None:
        if self.min_count < 1:
            raise CorpusError(f"--min-count must be >= 1, got {self.min_count}")
        if self.max_vocab is not None and not 1 <= self.max_vocab <= 65535:
            raise CorpusError(f"--max-vocab must be in [1, 65535], got {self.max_vocab}")
        check_split_options(self.val_fraction, self.run_length)
        if self.range_mb <= 0:
            raise CorpusError(f"--range-mb must be > 0, got {self.range_mb}")
        if self.errors not in ("strict", "replace"):
            raise CorpusError(f"--errors must be strict or replace, got {self.errors}")

    @property
    def range_bytes(self) -> int:
        return max(int(self.range_mb * 2**20), 16)


def prepare(inputs: list[str], out: str, options: PrepareOptions = PrepareOptions(),
            log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
            before_ray: Callable[[], None] = lambda: None) -> dict:
    """Prepare `inputs` (the default corpus when empty) into the dataset folder `out`; returns its manifest.

    `before_ray` runs once the inputs and `out` are checked, before any Ray work: the CLI starts or
    joins Ray there, so bad arguments fail in milliseconds rather than after Ray's start-up."""
    options.validate()
    started = time.perf_counter()
    sources = expand_inputs(inputs) if inputs else default_corpus()
    out_fs, out_path = resolve_filesystem(out)
    with claimed(out_fs, out_path, out, inputs or [default_corpus_root()], DATASET):
        before_ray()
        manifest = _write_dataset(sources, options, out_fs, out_path, log)
    manifest["elapsed_s"] = time.perf_counter() - started  # for the summary; not in the file
    return manifest


def _write_dataset(sources: list[SourceFile], options: PrepareOptions, out_fs: pafs.FileSystem, out_path: str,
                   log: Callable[[str], None]) -> dict:
    """Both passes over the corpus, published at `out_path`; returns the manifest."""
    total_mb = sum(s.size for s in sources) / 1e6
    log(f"pass 1/2: counting characters in {len(sources)} files ({total_mb:.1f} MB)")
    ranges = _count_pass(sources, options)
    sources, ranges, skipped = _drop_binary_files(sources, ranges, log)
    _raise_on_invalid_utf8(sources, ranges)
    counts = Counter()
    for r in ranges:
        counts.update(dict(zip(list(r["codepoints"]), list(r["counts"]))))
    total_chars = sum(r["chars"] for r in ranges)
    if total_chars == 0:
        raise CorpusError(f"the corpus is empty: {len(sources)} text files, 0 characters")
    vocab = Vocabulary.from_counts(counts, options.min_count, options.max_vocab)
    run_plan = _plan_runs(ranges, options)

    with staged(out_fs, out_path, MANIFEST, SPLITS) as staging:
        log(f"pass 2/2: encoding {total_chars:,} characters with {vocab.size} ids into shards")
        shards = _encode_pass(sources, vocab, run_plan, options, out_fs, staging)
        manifest = _manifest(sources, ranges, skipped, vocab, shards, run_plan, options)
        write_bytes(out_fs, f"{staging}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return manifest


def _count_pass(sources: list[SourceFile], options: PrepareOptions) -> list[dict]:
    counted = _read_ranges(sources, options).map_batches(
        _count_batch, fn_kwargs={"errors": options.errors}, batch_format="pyarrow", batch_size=None
    )
    rows = counted.take_all()
    return sorted(rows, key=lambda r: (r["source"], r["byte_start"]))


def _read_ranges(sources: list[SourceFile], options: PrepareOptions) -> ray.data.Dataset:
    # One block per planned read task, never split further: shard layout must not depend on the cluster.
    datasource = TextRangeDatasource(sources, options.range_bytes)
    return ray.data.read_datasource(datasource, override_num_blocks=datasource.num_tasks)


def _count_batch(batch: pa.Table, errors: str) -> pa.Table:
    rows = {k: [] for k in ("source", "byte_start", "byte_end", "chars", "replaced", "bad_offset",
                            "has_nul", "codepoints", "counts")}
    for source, start, end, data in zip(*(batch[c].to_pylist() for c in ("source", "byte_start", "byte_end", "data"))):
        counted = count_range(data, errors)
        for key, value in (("source", source), ("byte_start", start), ("byte_end", end),
                           ("chars", counted.chars), ("replaced", counted.replaced),
                           ("bad_offset", counted.bad_offset), ("has_nul", counted.has_nul),
                           ("codepoints", counted.codepoints), ("counts", counted.counts)):
            rows[key].append(value)
    return pa.table(rows)


def _drop_binary_files(sources, ranges, log):
    binary = sorted({r["source"] for r in ranges if r["has_nul"]})
    for index in binary:
        log(f"warning: skipping binary file {sources[index].shown} (contains NUL bytes)")
    if not binary:
        return sources, ranges, []
    kept = [i for i in range(len(sources)) if i not in set(binary)]
    if not kept:
        raise CorpusError("no text in the corpus: every file is binary (contains NUL bytes)")
    new_index = {old: new for new, old in enumerate(kept)}
    ranges = [dict(r, source=new_index[r["source"]]) for r in ranges if r["source"] in new_index]
    skipped = [{"uri": sources[i].shown, "size": sources[i].size, "reason": "binary (NUL bytes)"} for i in binary]
    return [sources[i] for i in kept], ranges, skipped


def _raise_on_invalid_utf8(sources, ranges) -> None:
    for r in ranges:
        if r["bad_offset"] >= 0:
            offset = r["byte_start"] + r["bad_offset"]
            raise CorpusError(f"invalid UTF-8 in {sources[r['source']].shown} at byte {offset} "
                              "(--errors replace substitutes U+FFFD)")


@dataclass(frozen=True)
class RunPlan:
    first_run: dict  # (source, byte_start) -> (index of the range's first run, its char offset in the file)
    validation: frozenset  # global indices of the runs that go to the validation split
    total: int


def _plan_runs(ranges: list[dict], options: PrepareOptions) -> RunPlan:
    """Runs are `run_length` tokens cut from each range; a deterministic, evenly spread
    `val_fraction` of them (never part of one) form the validation split."""
    first_run, index, char_offset, source = {}, 0, 0, -1
    for r in ranges:
        if r["source"] != source:
            source, char_offset = r["source"], 0
        first_run[(r["source"], r["byte_start"])] = (index, char_offset)
        index += math.ceil(r["chars"] / options.run_length)
        char_offset += r["chars"]
    total = index
    n_val = 0
    if options.val_fraction > 0:
        if total < 2:
            raise CorpusError(f"the corpus makes {total} run of up to {options.run_length} characters, too few "
                              "to split; lower --run-length or use --val-fraction 0")
        n_val = min(max(1, round(total * options.val_fraction)), total - 1)
    validation = frozenset(int((i + 0.5) * total / n_val) for i in range(n_val))
    return RunPlan(first_run, validation, total)


def _encode_pass(sources, vocab, run_plan, options, fs, staging) -> list[dict]:
    written = _read_ranges(sources, options).map_batches(
        _encode_and_write_batch,
        fn_kwargs={"vocab": vocab.to_json(), "errors": options.errors, "run_length": options.run_length,
                   "run_plan": run_plan, "fs": fs, "staging": staging},
        batch_format="pyarrow",
        batch_size=None,
    )
    return sorted(written.take_all(), key=lambda s: s["path"])


def _encode_and_write_batch(batch: pa.Table, vocab: dict, errors: str, run_length: int,
                            run_plan: RunPlan, fs: pafs.FileSystem, staging: str) -> pa.Table:
    """Encode one read task's ranges and write its runs as one shard per split."""
    vocabulary = Vocabulary.from_json(vocab)
    runs = {split: {"source": [], "char_offset": [], "run": [], "tokens": []} for split in SPLITS}
    columns = (batch[c].to_pylist() for c in ("source", "byte_start", "data"))
    first_key = None
    for source, start, data in zip(*columns):
        first_key = first_key or (source, start)
        ids = vocabulary.ids_from_codepoints(decode_range(data, errors).codepoints)
        run0, offset0 = run_plan.first_run[(source, start)]
        for k, pos in enumerate(range(0, len(ids), run_length)):
            split = "validation" if run0 + k in run_plan.validation else "train"
            for key, value in (("source", source), ("char_offset", offset0 + pos), ("run", run0 + k),
                               ("tokens", ids[pos : pos + run_length].tobytes())):
                runs[split][key].append(value)
    shards = []
    for split, rows in runs.items():
        if rows["run"]:
            name = f"{split}/part-{first_key[0]:06d}-{first_key[1]:013d}.parquet"
            shards.append(_write_shard(fs, staging, name, rows, vocabulary.dtype))
    return pa.Table.from_pylist(shards, schema=SHARD_RECORD)


SHARD_RECORD = pa.schema([("path", pa.string()), ("split", pa.string()), ("rows", pa.int64()),
                          ("tokens", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])


def shard_schema() -> pa.Schema:
    # A run's tokens are one binary value (its ids as little-endian uint8 or uint16, the manifest's
    # vocab dtype): Parquet writes and reads one value per run instead of one per token, faster than
    # list<uint8> and smaller (BENCHMARKS.md, "Figures from code comments").
    return pa.schema([("source", pa.int32()), ("char_offset", pa.int64()), ("run", pa.int64()),
                      ("tokens", pa.binary())])


def _write_shard(fs, staging: str, name: str, rows: dict, dtype: np.dtype) -> dict:
    table = pa.Table.from_arrays(
        [pa.array(rows["source"], pa.int32()), pa.array(rows["char_offset"], pa.int64()),
         pa.array(rows["run"], pa.int64()), pa.array(rows["tokens"], pa.binary())],
        schema=shard_schema(),
    )
    return write_shard(fs, staging, name, table, "source", {"tokens": sum(map(len, rows["tokens"])) // dtype.itemsize})


def _manifest(sources, ranges, skipped, vocab, shards, run_plan, options) -> dict:
    chars_per_source = Counter()
    replaced = 0
    for r in ranges:
        chars_per_source[r["source"]] += r["chars"]
        replaced += r["replaced"]
    return {
        "format": TEXT_FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab": vocab.to_json(),
        "splits": split_summaries(shards, "tokens"),
        "totals": {"files": len(sources), "bytes": sum(s.size for s in sources),
                   "chars": sum(chars_per_source.values()), "runs": run_plan.total, "replaced_chars": replaced},
        "sources": [{"uri": s.shown, "size": s.size, "chars": chars_per_source[i]} for i, s in enumerate(sources)],
        "skipped": skipped,
        "options": asdict(options),
    }
