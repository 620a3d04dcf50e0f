"""The run folder (layout in driver.py) at a local path or at any URI pyarrow.fs understands
(s3://, gs://, file://): what the driver and rank 0 read and write there, whatever the storage.

A run on several nodes needs storage that every node reaches: rank 0, which writes the model and
the metrics, may run on any node, and the driver reads them back. Ray Train keeps its checkpoints
under RUN_DIR/ray on the same storage."""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
from typing import Callable

import pyarrow.fs as pafs

from models.folder import CONFIG, FORMAT, WEIGHTS
from storage import Kind, absolute_location, join_location, make_way, resolve_filesystem, staged

CHECKPOINTS = "ray"  # Ray Train's experiment folder under the run folder
METRICS = "metrics.jsonl"
# RUN_DIR/model may be replaced by a newer model, or what a save cut short left of one.
MODEL_FOLDER = Kind("charrnn model folder", CONFIG, (FORMAT,), leftover=lambda relative_path: relative_path == WEIGHTS)


class RunFolder:
    """A run folder by its location; `path` is the location inside `fs`."""

    def __init__(self, location: str):
        self.fs, self.path = resolve_filesystem(location)
        self.location = absolute_location(location)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def uri(self, name: str) -> str:
        """`name` inside the folder, as a location (a URI keeps its query, e.g. endpoint_override)."""
        return join_location(self.location, name)

    def path_of(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def read_text(self, name: str) -> str | None:
        """The file's text, or None if there is no such file."""
        try:
            with self.fs.open_input_stream(self.path_of(name)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, payload: bytes) -> None:
        """Whole or not at all: a local file is written aside and renamed over the old one; an
        object store publishes an object only when its upload completes."""
        self.fs.create_dir(posixpath.dirname(self.path_of(name)), recursive=True)
        target = self.path_of(name) + ".tmp" if self.is_local else self.path_of(name)
        with self.fs.open_output_stream(target) as f:
            f.write(payload)
        if self.is_local:
            os.replace(target, self.path_of(name))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def save_folder(self, name: str, write: Callable[[str], None]) -> None:
        """`write(path)` fills an empty local folder with a model folder; it lands at `name` whole
        (storage.staged): on a file system by renames, on an object store config.json last."""
        path = self.path_of(name)
        make_way(self.fs, path, self.uri(name), MODEL_FOLDER, flag="the model folder")
        with staged(self.fs, path, CONFIG) as staging:
            if self.is_local:
                write(staging)
                return
            with tempfile.TemporaryDirectory() as local:
                write(local)
                pafs.copy_files(local, staging, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.fs)

    def is_empty(self) -> bool:
        """Absent or holding nothing."""
        return not self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))

    def latest_checkpoint_step(self, state_file: str) -> int | None:
        """The highest step among Ray Train's checkpoints that finished writing `state_file`."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path_of(CHECKPOINTS), allow_not_found=True))
        steps = [json.loads(self.read_text(posixpath.join(CHECKPOINTS, info.base_name, state_file)) or "{}").get("step")
                 for info in found if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint-")]
        return max((s for s in steps if s is not None), default=None)


def metric_records(text: str) -> list[dict]:
    """metrics.jsonl's records. A line that is not a JSON object (the torn last line of a run
    killed while writing it) is left out, so neither --resume nor the plot trips on it."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON record a line. On a local disk each record is appended as it
    comes, for `tail -f`; object stores cannot append, so there the file is rewritten whole at
    each flush (the worker flushes at evaluations and checkpoints)."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.text = "" if folder.is_local else folder.read_text(METRICS) or ""

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self.folder.is_local:
            with open(self.folder.path_of(METRICS), "a") as f:
                f.write(line)
        else:
            self.text += line

    def flush(self) -> None:
        if not self.folder.is_local:
            self.folder.write_text(METRICS, self.text)

    def truncate(self, step: int) -> None:
        """Drop the records of steps after `step`, the checkpoint a restart resumes from: they
        will be run again."""
        text = (self.folder.read_text(METRICS) or "") if self.folder.is_local else self.text
        kept = "".join(json.dumps(r) + "\n" for r in metric_records(text) if r.get("step", 0) <= step)
        self.folder.write_text(METRICS, kept)
        if not self.folder.is_local:
            self.text = kept
