"""A Ray Data datasource that reads text files in byte ranges, so no task ever holds a whole file.

Each range is cut at a nominal offset (a multiple of `range_bytes`) and the cut is moved forward to
the next place that splits neither a UTF-8 character nor a CRLF pair. The move depends only on the
bytes around the cut, so the two tasks that share a cut agree on it without talking to each other.
Small files are packed together so that one task reads about `range_bytes` in all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.sources import SourceFile

RANGE_SCHEMA = pa.schema(
    [
        ("source", pa.int32()),  # index into the sorted source list
        ("byte_start", pa.int64()),  # snapped offsets of this range in the file
        ("byte_end", pa.int64()),
        ("data", pa.large_binary()),  # the raw bytes [byte_start, byte_end)
    ]
)

# Reading one byte before and four after a cut is enough to snap it: a UTF-8 character has at most
# three continuation bytes, then one more byte tells whether a CR is followed by LF.
_BEFORE, _AFTER = 1, 4


@dataclass(frozen=True)
class ByteRange:
    source: int
    start: int  # nominal, not yet snapped
    end: int


def snap_cut(window: bytes, window_start: int, pos: int, size: int) -> int:
    """The first offset >= pos that starts a character and is not between CR and LF."""
    if pos <= 0 or pos >= size:
        return min(max(pos, 0), size)
    i = pos - window_start
    for _ in range(3):
        if i < len(window) and (window[i] & 0xC0) == 0x80:
            i += 1
    if 0 < i < len(window) and window[i] == 0x0A and window[i - 1] == 0x0D:
        i += 1
    return window_start + i


def plan_ranges(sources: list[SourceFile], range_bytes: int) -> list[list[ByteRange]]:
    """Cut files into ranges and pack the ranges into read tasks of about `range_bytes` each."""
    tasks: list[list[ByteRange]] = []
    current: list[ByteRange] = []
    current_bytes = 0
    for index, source in enumerate(sources):
        starts = range(0, max(source.size, 1), range_bytes)
        for start in starts:
            piece = ByteRange(index, start, min(start + range_bytes, source.size))
            length = piece.end - piece.start
            if current and current_bytes + length > range_bytes:
                tasks.append(current)
                current, current_bytes = [], 0
            current.append(piece)
            current_bytes += length
    if current:
        tasks.append(current)
    return tasks


def read_range(source: SourceFile, piece: ByteRange) -> tuple[int, int, bytes]:
    """The snapped range and its bytes, read with one ranged request."""
    if source.size == 0:
        return 0, 0, b""
    window_start = max(piece.start - _BEFORE, 0)
    window_end = min(piece.end + _AFTER, source.size)
    with source.filesystem.open_input_file(source.path) as f:
        window = f.read_at(window_end - window_start, window_start)
    start = snap_cut(window, window_start, piece.start, source.size)
    end = snap_cut(window, window_start, piece.end, source.size)
    return start, end, window[start - window_start : end - window_start]


class TextRangeDatasource(Datasource):
    """Rows of (source, byte_start, byte_end, data), one per range; see RANGE_SCHEMA."""

    def __init__(self, sources: list[SourceFile], range_bytes: int):
        super().__init__()
        self._sources = sources
        self._tasks = plan_ranges(sources, range_bytes)

    @property
    def num_tasks(self) -> int:
        return len(self._tasks)

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(s.size for s in self._sources)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        # The task count follows from the byte budget per task, not from `parallelism`: memory per
        # task stays bounded whatever the corpus size.
        read_tasks = []
        for pieces in self._tasks:
            sources = {p.source: self._sources[p.source] for p in pieces}
            meta = BlockMetadata(
                num_rows=len(pieces),
                size_bytes=sum(p.end - p.start for p in pieces),
                exec_stats=None,
                input_files=tuple(sorted({s.shown for s in sources.values()})),
            )
            read_tasks.append(ReadTask(_make_reader(pieces, sources), meta, schema=RANGE_SCHEMA))
        return read_tasks


def _make_reader(pieces: list[ByteRange], sources: dict[int, SourceFile]):
    def read() -> Iterator[pa.Table]:
        columns = {name: [] for name in RANGE_SCHEMA.names}
        for piece in pieces:
            start, end, data = read_range(sources[piece.source], piece)
            for name, value in zip(RANGE_SCHEMA.names, (piece.source, start, end, data)):
                columns[name].append(value)
        yield pa.Table.from_pydict(columns, schema=RANGE_SCHEMA)

    return read
