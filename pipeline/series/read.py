"""Read numeric columns of CSV and Parquet files for time series, checking every value on the way.

`read_file_chunks` streams one file in chunks of rows (never the whole file at once) and turns every
problem into a one-line CorpusError naming the file, the column and the row. `SeriesFileDatasource`
(source.py) runs it in Ray Data read tasks; `read_points` runs it here, without Ray, for one
small file.

A read task never raises: it yields its error as a row. The driver, which takes the rows in file
order, raises the first one; so the message is the same whatever the cluster, and no Ray traceback
reaches the user.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray  # noqa: F401  (keeps Arrow from aborting at exit after reading Parquet: see pipeline/shards.py)

from pipeline.errors import CorpusError
from pipeline.sources import SourceFile
from storage import resolve_filesystem

SUFFIXES = (".csv", ".parquet")
CHUNK_ROWS = 65536  # Parquet rows per chunk; CSV chunks are pyarrow's 1 MiB blocks
TASK_BYTES = 64 * 2**20  # small files are read together, up to this many bytes per read task
FLOAT32_MAX = float(np.finfo(np.float32).max)  # values are stored as float32

CHUNK_SCHEMA = pa.schema([
    ("file", pa.int32()),  # index into the datasource's file list
    ("first_row", pa.int64()),  # the chunk's first row in its file, from 0
    ("rows", pa.int64()),
    ("values", pa.large_binary()),  # float64 [rows, features], row-major; empty when not asked for
    ("ids", pa.list_(pa.string())),  # the series id of each row, or null without --series-id
    ("error", pa.string()),  # set on the last row of a task that found bad input; nothing else is
])


def is_series_file(path: str) -> bool:
    return path.lower().endswith(SUFFIXES)


def check_readable(source: SourceFile) -> None:
    """What can be said without reading the file: its kind and that it is not empty."""
    if not is_series_file(source.path):
        raise CorpusError(f"{source.shown} is not a CSV or Parquet file (expected .csv or .parquet)")
    if source.size == 0:
        raise CorpusError(f"{source.shown} is empty")


def file_columns(source: SourceFile) -> list[str]:
    """The column names of a CSV header or a Parquet schema."""
    check_readable(source)
    try:
        if source.path.lower().endswith(".csv"):
            with source.filesystem.open_input_stream(source.path) as f:
                return pacsv.open_csv(f).schema.names
        with source.filesystem.open_input_file(source.path) as f:
            return pq.ParquetFile(f).schema_arrow.names
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(source, err) from None


def require_columns(source: SourceFile, needed: list[str]) -> None:
    present = file_columns(source)
    for name in needed:
        if name not in present:
            raise CorpusError(f"{source.shown} has no column {name!r} (its columns: {', '.join(present)})")


def read_file_chunks(source: SourceFile, columns: list[str], series_id: Optional[str] = None
                     ) -> Iterator[tuple[int, np.ndarray, Optional[pa.Array]]]:
    """(first row, values float64 [rows, features], series ids as strings or None) per chunk, in
    file order. Raises CorpusError at the first missing column, non-numeric, null, NaN or infinite
    value, or if the file has no rows."""
    needed = columns + ([series_id] if series_id else [])
    require_columns(source, needed)
    csv = source.path.lower().endswith(".csv")
    row = 0
    try:
        for batch in _batches(source, needed):
            values = np.empty((batch.num_rows, len(columns)), np.float64)
            for j, name in enumerate(columns):
                values[:, j] = _numbers(source.uri, name, batch.column(name), row, csv)
            ids = _ids(source.uri, series_id, batch.column(series_id), row) if series_id else None
            yield row, values, ids
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as err:  # a ragged CSV line, a damaged Parquet page, a lost connection
        raise _unreadable(source, err) from None
    if row == 0:
        raise CorpusError(f"{source.shown} has no rows")


def read_points(uri: str, columns: list[str]) -> np.ndarray:
    """The columns of one CSV or Parquet file as float64 [rows, features], checked as
    `prepare-series` checks them. No Ray."""
    fs, path = resolve_filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise CorpusError(f"cannot read {uri}: {err}") from None
    if info.type != pafs.FileType.File:
        raise CorpusError(f"file not found: {uri}")
    chunks = [values for _, values, _ in read_file_chunks(SourceFile(uri, path, info.size, fs), list(columns))]
    return np.concatenate(chunks)


def _unreadable(source: SourceFile, err: Exception) -> CorpusError:
    kind = "CSV" if source.path.lower().endswith(".csv") else "Parquet"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CorpusError(f"{source.shown} is not a readable {kind} file: {reason}")


def _batches(source: SourceFile, needed: list[str]) -> Iterator[pa.RecordBatch]:
    if source.path.lower().endswith(".csv"):
        # Read as text and parse here: then the message can name the row and quote the value, and
        # an empty cell is a missing value while "NaN" stays a (rejected) number.
        options = pacsv.ConvertOptions(column_types={name: pa.string() for name in needed}, include_columns=needed,
                                       strings_can_be_null=True, null_values=[""])
        with source.filesystem.open_input_stream(source.path) as f:
            yield from pacsv.open_csv(f, convert_options=options)
    else:
        with source.filesystem.open_input_file(source.path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS, columns=needed)


def _numbers(uri: str, name: str, column: pa.Array, first_row: int, text: bool) -> np.ndarray:
    """`text`: a CSV column, read as strings; a Parquet column must have a numeric type."""
    if not (text or pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            or pa.types.is_decimal(column.type)):
        raise CorpusError(f"{uri}: column {name!r} is not numeric (type {column.type})")
    try:
        # safe=False: integers beyond 2**53 become the nearest float instead of an error.
        numbers = pc.cast(pc.utf8_trim_whitespace(column) if text else column, pa.float64(), safe=False)
    except pa.ArrowInvalid:  # some text is not a number; find the first such row below
        numbers = None
    if numbers is None or numbers.null_count:
        _raise_first_unparsable(uri, name, column, first_row)
    values = numbers.to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(values) | (np.abs(values) > FLOAT32_MAX)
    if bad.any():
        i = int(np.argmax(bad))
        what = ("a NaN value" if np.isnan(values[i]) else "an infinite value" if np.isinf(values[i])
                else f"{values[i]!r}, beyond float32's range,")
        raise CorpusError(f"{uri}: column {name!r} has {what} at row {first_row + i + 1}")
    return values


def _raise_first_unparsable(uri: str, name: str, column: pa.Array, first_row: int) -> None:
    """Rows are counted from 1, after the CSV header."""
    for i, value in enumerate(column.to_pylist()):
        if value is None:
            raise CorpusError(f"{uri}: column {name!r} has a missing (null) value at row {first_row + i + 1}")
        if isinstance(value, str):
            try:
                pc.cast(pa.array([value.strip()]), pa.float64())
            except pa.ArrowInvalid:
                raise CorpusError(f"{uri}: column {name!r} is not numeric: {value!r} at row {first_row + i + 1}") \
                    from None
    raise CorpusError(f"{uri}: column {name!r} is not numeric")


def _ids(uri: str, name: str, column: pa.Array, first_row: int) -> pa.Array:
    try:
        ids = pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise CorpusError(f"{uri}: column {name!r} cannot be a series id (type {column.type})") from None
    if ids.null_count:
        i = ids.is_null().to_numpy(zero_copy_only=False).argmax()
        raise CorpusError(f"{uri}: column {name!r} has a missing (null) value at row {first_row + i + 1}")
    return ids
