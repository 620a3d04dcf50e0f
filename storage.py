"""Where charrnn reads and writes: local paths and every URI pyarrow.fs understands (s3://, gs://,
hdfs://, file://), for every command alike.

- locations: resolve_filesystem, is_uri, join_location, and what may be shown or stored of one
  (public_location, redact_uris, with_access_of: no query, no credentials);
- output folders: check_out_location refuses /, the home folder and folders overlapping the inputs;
  out_lock keeps two commands from writing one local folder at once;
- publishing (docs/contracts.md, sections 1 and 2): a folder appears whole or not at all. It is
  written to a hidden staging folder beside it, then swapped in by two renames (a file system) or
  copied in with its marker file (manifest.json, config.json) leaving first and arriving last (an
  object store, which cannot rename a folder). Only what this project wrote is ever replaced or
  deleted: a folder whose marker names one of the caller's formats, an empty folder, or the staging
  and stepped-aside folders named after it.

Imports only the standard library and pyarrow."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import posixpath
import re
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

GLOB_CHARS = re.compile(r"[*?\[]")
RENAMES_FOLDERS = ("local", "hdfs")  # pyarrow.fs type names
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


class StorageError(ValueError):
    """A location that cannot be used as asked: the message is one line that names it."""


# --- locations -------------------------------------------------------------------------------------

def is_uri(location: str) -> bool:
    return "://" in location


def resolve_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """A local path (relative or absolute, ~ expanded) or any URI pyarrow.fs understands."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as err:  # unknown scheme (pyarrow's ArrowInvalid is a ValueError), bad bucket, ...
        raise StorageError(f"cannot open {public_location(location)}: {redact_uris(str(err))}") from None


def absolute_location(location: str) -> str:
    """`location` as every process reads it alike: a local path made absolute (Ray's workers do not
    run in this process's folder), a URI unchanged."""
    return location if is_uri(location) else resolve_filesystem(location)[1]


def join_location(location: str, name: str) -> str:
    """`name` inside the folder `location`: a local path, or a URI whose query (endpoint_override=...)
    stays at the end."""
    if not is_uri(location):
        return os.path.join(location, name)
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=posixpath.join(parts.path, name)))


def public_location(location: str) -> str:
    """`location` as it may be shown or stored: a URI without its query (endpoint_override, access
    keys, ...) and without user:password@; a local path unchanged."""
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_uris(text: str) -> str:
    """`text` with every URI in it shown as public_location shows it (for messages and logs)."""
    return _URI.sub(lambda m: public_location(m.group(0)), text)


def with_access_of(location: str, like: str) -> str:
    """A stored (public) `location` made openable again with the query and credentials of `like`,
    the URI the user gave this time, when both name the same scheme (the query says how to reach
    that kind of store: endpoint, keys)."""
    if not is_uri(location) or not is_uri(like):
        return location
    stored, given = urlsplit(location), urlsplit(like)
    if stored.scheme != given.scheme or stored.query:
        return location
    user = given.netloc.rpartition("@")[0]
    netloc = f"{user}@{stored.netloc}" if user else stored.netloc
    return urlunsplit((stored.scheme, netloc, stored.path, given.query, ""))


def read_file(location: str) -> bytes:
    """The whole file at `location`, a local path or a URI."""
    fs, path = resolve_filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"file not found: {public_location(location)}") from None
    except OSError as err:
        raise StorageError(f"cannot read {public_location(location)}: {redact_uris(str(err))}") from None


def write_bytes(fs: pafs.FileSystem, path: str, payload: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(payload)


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except OSError:
        pass


@contextlib.contextmanager
def local_copy(location: str, names: tuple[str, ...]) -> Iterator[str]:
    """A local path holding the folder `location`'s files `names`: the folder itself, or for a URI a
    temporary copy of those files, removed when the block ends."""
    if not is_uri(location):
        yield location
        return
    fs, path = resolve_filesystem(location)
    with tempfile.TemporaryDirectory(prefix="charrnn-") as tmp:
        for name in names:
            try:
                with fs.open_input_stream(f"{path.rstrip('/')}/{name}") as src, \
                        open(os.path.join(tmp, name), "wb") as dst:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
            except OSError as err:
                raise StorageError(f"{public_location(location)}: cannot read {name}: "
                                   f"{redact_uris(str(err))}") from None
        yield tmp


# --- output folders --------------------------------------------------------------------------------

def check_out_location(fs: pafs.FileSystem, path: str, shown: str, inputs: list[str], flag: str = "--out") -> None:
    """Refuse an output folder that is /, the home folder, or overlaps an input (equal to it, inside
    it, or holding it): writing there would read its own output or replace the user's files. Reads
    no file, so it fails in milliseconds."""
    path = _canonical(fs, path)
    if path in ("/", "") or (isinstance(fs, pafs.LocalFileSystem) and path == _canonical(fs, os.path.expanduser("~"))):
        raise StorageError(f"{flag} {shown} is {'the root' if path in ('/', '') else 'the home'} folder; "
                           "choose a folder of its own")
    for item in inputs:
        item_fs, item_path = resolve_filesystem(item)
        if item_fs.type_name != fs.type_name:
            continue
        item_path = _canonical(item_fs, GLOB_CHARS.split(item_path, maxsplit=1)[0].rstrip("/") or "/")
        if _within(path, item_path) or _within(item_path, path):
            raise StorageError(f"{flag} {shown} overlaps the input {item}; write the output outside the inputs")


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
            raise StorageError(f"{shown} is being written by another command; wait for it to end or choose "
                               f"another folder") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its holder had just removed on release: take the current one


@contextlib.contextmanager
def claimed(fs: pafs.FileSystem, path: str, shown: str, inputs: list[str], kind: "Kind") -> Iterator[None]:
    """The output folder checked against the inputs, locked, and cleared for a folder of `kind`
    while the block runs."""
    check_out_location(fs, path, shown, inputs)
    with out_lock(fs, path, shown):
        make_way(fs, path, shown, kind)
        yield


def _canonical(fs: pafs.FileSystem, path: str) -> str:
    return os.path.realpath(path) if isinstance(fs, pafs.LocalFileSystem) else path.rstrip("/")


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


# --- publishing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """What makes a folder one of ours: its `marker` file (JSON) names one of `formats`. `leftover`
    says which other files a folder without the marker may hold and still be ours: an interrupted
    copy-in, whose marker arrives last."""
    what: str  # for messages: "charrnn dataset"
    marker: str
    formats: tuple[str, ...]
    leftover: Callable[[str], bool] = lambda relative_path: False

    def owns(self, fs: pafs.FileSystem, path: str) -> bool:
        """Whether `path` holds this kind's marker naming one of its formats (any version)."""
        try:
            with fs.open_input_stream(f"{path.rstrip('/')}/{self.marker}") as f:
                return json.loads(f.read(1 << 20)).get("format") in self.formats
        except (OSError, ValueError, AttributeError):
            return False


def make_way(fs: pafs.FileSystem, path: str, shown: str, kind: Kind, flag: str = "--out") -> None:
    """Check that `path` may become a folder of `kind` (absent, empty, one of its formats, or an
    unfinished one), bring back such a folder a killed publish left stepped aside, and remove what
    killed publishes left beside it. Cheap: reads only names and the marker. For a local `path`,
    call it holding out_lock."""
    parent, _, name = path.rstrip("/").rpartition("/")
    leftovers = [i for i in fs.get_file_info(pafs.FileSelector(parent or "/", allow_not_found=True))
                 if i.base_name.startswith((f".{name}.partial-", f".{name}.old-"))]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        stepped_aside = [i for i in leftovers if i.base_name.startswith(f".{name}.old-") and kind.owns(fs, i.path)]
        if stepped_aside:
            fs.move(max(stepped_aside, key=lambda i: i.mtime_ns or 0).path, path)
            info = fs.get_file_info(path)
    if info.type != pafs.FileType.NotFound:
        if info.type != pafs.FileType.Directory:
            raise StorageError(f"{flag} {shown} exists and is not a folder")
        if not kind.owns(fs, path) and not _only_leftovers(fs, path, kind):
            raise StorageError(f"{flag} {shown} is a non-empty folder that is not a {kind.what} (no {kind.marker} "
                               f"of format {' or '.join(kind.formats)}); refusing to replace it")
    for leftover in leftovers:
        if fs.get_file_info(leftover.path).type != pafs.FileType.NotFound:
            delete_quietly(fs, leftover.path)


_interrupted = threading.Event()


def publish_nothing_more() -> None:
    """After Ctrl-C or SIGTERM: this process publishes no staged folder from now on. The
    KeyboardInterrupt the signal raises could otherwise be lost on its way: Python drops an
    exception raised inside a finalizer, and a signal can land in one (Ray Data shuts its
    executors down from `__del__`), letting the interrupted command finish and publish."""
    _interrupted.set()


@contextlib.contextmanager
def staged(fs: pafs.FileSystem, path: str, marker: str, folders: tuple[str, ...] = ()) -> Iterator[str]:
    """A staging folder (with `folders` made in it) to write into, `marker` last; published at `path`
    when the block ends, deleted if it raises. Call make_way first."""
    staging = _hidden(f"{path.rstrip('/')}.partial-{uuid.uuid4().hex[:12]}")
    # The subfolders are made here, once: a worker's late write after an interruption then fails
    # instead of recreating a staging folder the driver has just deleted.
    fs.create_dir(staging, recursive=True)
    for folder in folders:
        fs.create_dir(f"{staging}/{folder}", recursive=True)
    try:
        yield staging
        if _interrupted.is_set():
            raise KeyboardInterrupt
        if fs.type_name in RENAMES_FOLDERS:
            _swap_by_rename(fs, staging, path)
        else:
            _copy_in(fs, staging, path, marker)
    finally:
        delete_quietly(fs, staging)


def _hidden(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}"


def _only_leftovers(fs: pafs.FileSystem, path: str, kind: Kind) -> bool:
    """Whether every file under `path` is one `kind` allows without its marker (none: an empty folder)."""
    files = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    return all(kind.leftover(i.path[len(path.rstrip("/")) + 1:]) for i in files)


def _swap_by_rename(fs: pafs.FileSystem, staging: str, path: str) -> None:
    """The old folder steps aside, the new one takes its place, and the old one is deleted only then;
    if the second rename fails, the old one comes back. A process killed between the renames leaves
    .NAME.old-*, which the next make_way brings back."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        fs.move(staging, path)
        return
    old = _hidden(f"{path.rstrip('/')}.old-{uuid.uuid4().hex[:12]}")
    fs.move(path, old)
    try:
        fs.move(staging, path)
    except BaseException:
        fs.move(old, path)
        raise
    delete_quietly(fs, old)


def _copy_in(fs: pafs.FileSystem, staging: str, path: str, marker: str) -> None:
    """Server-side copies; the marker leaves first and arrives last."""
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        if fs.get_file_info(f"{path}/{marker}").type == pafs.FileType.File:
            fs.delete_file(f"{path}/{marker}")
        fs.delete_dir_contents(path)
    staged_files = [i.path for i in fs.get_file_info(pafs.FileSelector(staging, recursive=True))
                    if i.type == pafs.FileType.File and i.path != f"{staging}/{marker}"]
    for source in staged_files:
        fs.copy_file(source, path + source[len(staging):])
    fs.copy_file(f"{staging}/{marker}", f"{path}/{marker}")
