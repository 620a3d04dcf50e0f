"""A dataset folder appears whole or not at all (docs/contracts.md, section 1).

Everything is written to a hidden staging folder beside DIR, manifest.json last. A file system
then swaps it in for DIR by two renames, so DIR is always the old dataset, the new one, or absent.
Object stores (s3://, gs://) cannot rename a folder: there the old manifest is deleted first, the
new shards copied in, and the new manifest copied last, so DIR is the old dataset, the new one, or
no dataset (shards without a manifest, which the next run may replace).

Only what this project wrote is ever replaced or deleted: a folder whose manifest names one of
DATASET_FORMATS, the staging and stepped-aside folders named after it, nothing else. A local --out
is locked while a command writes it (out_lock), so two commands never publish over each other."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import uuid
from typing import Iterator

import pyarrow.fs as pafs

from pipeline.errors import CorpusError
from pipeline.sources import GLOB_CHARS, resolve_filesystem

MANIFEST = "manifest.json"
DATASET_FORMATS = ("charrnn-text-dataset", "charrnn-series-dataset")
SHARD = re.compile(r"(train|validation)/part-[0-9-]+\.parquet")
RENAMES_FOLDERS = ("local", "hdfs")  # pyarrow.fs type names


def check_out_location(fs: pafs.FileSystem, path: str, shown: str, inputs: list[str], flag: str = "--out") -> None:
    """Refuse an output folder that is /, the home folder, or overlaps an input (equal to it, inside
    it, or holding it): writing there would read its own output or replace the user's files. Reads
    no file, so it fails in milliseconds."""
    path = _canonical(fs, path)
    if path in ("/", "") or (isinstance(fs, pafs.LocalFileSystem) and path == _canonical(fs, os.path.expanduser("~"))):
        raise CorpusError(f"{flag} {shown} is {'the root' if path in ('/', '') else 'the home'} folder; choose a folder of its own")
    for item in inputs:
        item_fs, item_path = resolve_filesystem(item)
        if item_fs.type_name != fs.type_name:
            continue
        item_path = _canonical(item_fs, GLOB_CHARS.split(item_path, maxsplit=1)[0].rstrip("/") or "/")
        if _within(path, item_path) or _within(item_path, path):
            raise CorpusError(f"{flag} {shown} overlaps the input {item}; write the output outside the inputs")


@contextlib.contextmanager
def claimed(fs: pafs.FileSystem, path: str, shown: str, inputs: list[str]) -> Iterator[None]:
    """The output folder checked, locked and cleared for a dataset while the block runs."""
    check_out_location(fs, path, shown, inputs)
    with out_lock(fs, path, shown):
        make_way(fs, path, shown)
        yield


def make_way(fs: pafs.FileSystem, path: str, shown: str) -> None:
    """Check that `path` may become a dataset (absent, empty, a dataset, or an unfinished one), bring
    back a dataset a killed publish left stepped aside, and remove what killed runs left beside it.
    Cheap: runs before Ray starts. Call it holding out_lock."""
    parent, _, name = path.rstrip("/").rpartition("/")
    leftovers = [i for i in fs.get_file_info(pafs.FileSelector(parent or "/", allow_not_found=True))
                 if i.base_name.startswith((f".{name}.partial-", f".{name}.old-"))]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        _restore_stepped_aside(fs, path, leftovers)
        info = fs.get_file_info(path)
    if info.type != pafs.FileType.NotFound:
        if info.type != pafs.FileType.Directory:
            raise CorpusError(f"--out {shown} exists and is not a folder")
        if not is_dataset(fs, path) and not _only_shards(fs, path):
            raise CorpusError(f"--out {shown} is a non-empty folder that is not a charrnn dataset "
                              f"(no {MANIFEST} of format {' or '.join(DATASET_FORMATS)}); refusing to replace it")
    for leftover in leftovers:
        if fs.get_file_info(leftover.path).type != pafs.FileType.NotFound:
            delete_quietly(fs, leftover.path)


def is_dataset(fs: pafs.FileSystem, path: str) -> bool:
    """Whether `path` holds a manifest this project wrote (any version)."""
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            return json.loads(f.read(1 << 20)).get("format") in DATASET_FORMATS
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def out_lock(fs: pafs.FileSystem, path: str, shown: str) -> Iterator[None]:
    """Hold .NAME.lock beside a local `path` while the block runs; a second command writing the same
    folder fails at once. The kernel drops the lock when its process dies, so a killed run never
    leaves it held. Object stores have no such lock: there one writer at a time is the user's care."""
    if not isinstance(fs, pafs.LocalFileSystem):
        yield
        return
    parent, _, name = path.rstrip("/").rpartition("/")
    os.makedirs(parent or "/", exist_ok=True)
    lock = f"{parent}/.{name}.lock"
    fd = _locked(lock, shown)
    try:
        yield
    finally:
        os.unlink(lock)  # still holding it: whoever opened this file before finds it gone and retries
        os.close(fd)


def _locked(lock: str, shown: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise CorpusError(f"{shown} is being written by another command; wait for it to end or choose "
                              f"another folder") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its holder had just removed on release: take the current one


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


def _canonical(fs: pafs.FileSystem, path: str) -> str:
    return os.path.realpath(path) if isinstance(fs, pafs.LocalFileSystem) else path.rstrip("/")


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _restore_stepped_aside(fs: pafs.FileSystem, path: str, leftovers: list[pafs.FileInfo]) -> None:
    """A publish killed between its two renames left the old dataset as .NAME.old-*: it comes back."""
    old = [i for i in leftovers if i.base_name.startswith(f".{path.rstrip('/').rpartition('/')[2]}.old-")
           and is_dataset(fs, i.path)]
    if old:
        fs.move(max(old, key=lambda i: i.mtime_ns or 0).path, path)


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
