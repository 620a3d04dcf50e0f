"""A dataset folder appears whole or not at all (docs/contracts.md, section 1).

Everything is written to a hidden staging folder beside DIR, manifest.json last. A file system
then swaps it in for DIR by two renames, so DIR is always the old dataset, the new one, or absent.
Object stores (s3://, gs://) cannot rename a folder: there the old manifest is deleted first, the
new shards copied in, and the new manifest copied last, so DIR is the old dataset, the new one, or
no dataset (shards without a manifest, which the next run may replace)."""
from __future__ import annotations

import contextlib
import re
import uuid
from typing import Iterator

import pyarrow.fs as pafs

from pipeline.errors import CorpusError

MANIFEST = "manifest.json"
SHARD = re.compile(r"(train|validation)/part-[0-9-]+\.parquet")
RENAMES_FOLDERS = ("local", "hdfs")  # pyarrow.fs type names


def make_way(fs: pafs.FileSystem, path: str, shown: str) -> None:
    """Check that `path` may become a dataset (absent, a dataset, or an unfinished one) and remove
    what killed runs left beside it. Cheap: runs before Ray starts."""
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.NotFound:
        if info.type != pafs.FileType.Directory:
            raise CorpusError(f"--out {shown} exists and is not a folder")
        if fs.get_file_info(f"{path}/{MANIFEST}").type != pafs.FileType.File and not _only_shards(fs, path):
            raise CorpusError(f"--out {shown} is a non-empty folder without {MANIFEST}; refusing to replace it")
    parent, _, name = path.rstrip("/").rpartition("/")
    for info in fs.get_file_info(pafs.FileSelector(parent or "/", allow_not_found=True)):
        if info.base_name.startswith((f".{name}.partial-", f".{name}.old-")):
            delete_quietly(fs, info.path)


@contextlib.contextmanager
def staged(fs: pafs.FileSystem, path: str, splits: tuple[str, ...]) -> Iterator[str]:
    """A staging folder to write the dataset into, the manifest last; published at `path` when the
    block ends, deleted if it raises."""
    staging = _hidden(f"{path.rstrip('/')}.partial-{uuid.uuid4().hex[:12]}")
    # The split folders are made here, once: a worker's late write after an interruption then
    # fails instead of recreating a staging folder the driver has just deleted.
    for split in splits:
        fs.create_dir(f"{staging}/{split}", recursive=True)
    try:
        yield staging
        if fs.type_name in RENAMES_FOLDERS:
            _swap_by_rename(fs, staging, path)
        else:
            _copy_in(fs, staging, path)
    finally:
        delete_quietly(fs, staging)


def write_bytes(fs: pafs.FileSystem, path: str, payload: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(payload)


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except OSError:
        pass


def _hidden(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}"


def _only_shards(fs: pafs.FileSystem, path: str) -> bool:
    """Whether every file under `path` is a shard: a dataset whose copy-in was interrupted."""
    files = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    return all(SHARD.fullmatch(i.path[len(path.rstrip("/")) + 1:]) for i in files)


def _swap_by_rename(fs: pafs.FileSystem, staging: str, path: str) -> None:
    """Only the old dataset is ever deleted, and only once the new one is in place."""
    old = None
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        old = _hidden(f"{path.rstrip('/')}.old-{uuid.uuid4().hex[:12]}")
        fs.move(path, old)
    fs.move(staging, path)
    if old:
        delete_quietly(fs, old)


def _copy_in(fs: pafs.FileSystem, staging: str, path: str) -> None:
    """Server-side copies; the manifest leaves first and arrives last."""
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        if fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File:
            fs.delete_file(f"{path}/{MANIFEST}")
        fs.delete_dir_contents(path)
    staged_files = [i.path for i in fs.get_file_info(pafs.FileSelector(staging, recursive=True))
                    if i.type == pafs.FileType.File and i.base_name != MANIFEST]
    for source in staged_files:
        fs.copy_file(source, path + source[len(staging):])
    fs.copy_file(f"{staging}/{MANIFEST}", f"{path}/{MANIFEST}")
