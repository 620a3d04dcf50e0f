"""`SeriesFileDatasource`: read.read_file_chunks in Ray Data read tasks, files packed into tasks in
order. A read task never raises: it yields its error as a row (see read.py)."""
from __future__ import annotations

from typing import Iterator, Optional

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.errors import CorpusError
from pipeline.series.read import CHUNK_SCHEMA, TASK_BYTES, read_file_chunks
from pipeline.sources import SourceFile


class SeriesFileDatasource(Datasource):
    """Rows of CHUNK_SCHEMA: each file's chunks in order, files packed into read tasks in order."""

    def __init__(self, files: list[SourceFile], columns: list[str], series_id: Optional[str], with_values: bool):
        super().__init__()
        self._files, self._columns, self._series_id, self._with_values = files, columns, series_id, with_values
        self._tasks: list[list[int]] = []
        size = 0
        for index, source in enumerate(files):
            if not self._tasks or size + source.size > TASK_BYTES:
                self._tasks.append([])
                size = 0
            self._tasks[-1].append(index)
            size += source.size

    @property
    def num_tasks(self) -> int:
        return len(self._tasks)

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(s.size for s in self._files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        # One task per group of files whatever `parallelism` says: the layout must not depend on the cluster.
        tasks = []
        for indices in self._tasks:
            meta = BlockMetadata(num_rows=None, size_bytes=sum(self._files[i].size for i in indices),
                                 exec_stats=None, input_files=tuple(self._files[i].shown for i in indices))
            tasks.append(ReadTask(self._reader(indices), meta, schema=CHUNK_SCHEMA))
        return tasks

    def _reader(self, indices: list[int]):
        files, columns, series_id, with_values = self._files, self._columns, self._series_id, self._with_values

        def read() -> Iterator[pa.Table]:
            for index in indices:
                try:
                    for first_row, values, ids in read_file_chunks(files[index], columns, series_id):
                        yield _chunk_table(index, first_row, len(values), values.tobytes() if with_values else b"", ids)
                except CorpusError as err:
                    yield _chunk_table(index, 0, 0, b"", None, error=str(err))
                    return

        return read


def _chunk_table(file: int, first_row: int, rows: int, values: bytes, ids: Optional[pa.Array],
                 error: Optional[str] = None) -> pa.Table:
    ids_column = pa.array([None], CHUNK_SCHEMA.field("ids").type) if ids is None else \
        pa.ListArray.from_arrays(pa.array([0, len(ids)], pa.int32()), ids)
    return pa.Table.from_arrays(
        [pa.array([file], pa.int32()), pa.array([first_row], pa.int64()), pa.array([rows], pa.int64()),
         pa.array([values], pa.large_binary()), ids_column, pa.array([error], pa.string())],
        schema=CHUNK_SCHEMA,
    )
