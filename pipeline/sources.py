"""Turn the user's INPUT arguments (files, folders, globs, local paths or pyarrow.fs URIs) into a
sorted list of source files. Nothing here reads file contents."""
from __future__ import annotations

import os
import re
import sysconfig
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.errors import CorpusError
from storage import GLOB_CHARS, public_location, resolve_filesystem


@dataclass(frozen=True)
class SourceFile:
    uri: str  # the user's local path or URI, query included: what reopens it
    path: str  # the path inside `filesystem`
    size: int
    filesystem: pafs.FileSystem

    @property
    def shown(self) -> str:
        """What messages and manifests show: the URI without its query or credentials."""
        return public_location(self.uri)


def default_corpus_root() -> str:
    """The running Python's standard library: real text every machine has."""
    return sysconfig.get_paths()["stdlib"]


def default_corpus() -> list[SourceFile]:
    root = default_corpus_root()
    files = _list_folder(pafs.LocalFileSystem(), root, root, suffix=".py")
    return [f for f in files if "site-packages" not in f.path.split(os.sep)]


def expand_inputs(inputs: list[str]) -> list[SourceFile]:
    """Every file named by `inputs`, in a stable order, each once."""
    found: dict[str, SourceFile] = {}
    for item in inputs:
        matches = _expand_one(item)
        for source in matches:
            found.setdefault(source.uri, source)
    return [found[k] for k in sorted(found)]


def _expand_one(item: str) -> list[SourceFile]:
    fs, path = resolve_filesystem(item)
    if GLOB_CHARS.search(path):
        return _expand_glob(fs, item, path)
    info = _get_info(fs, path, item)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"input not found: {item}")
    if info.type == pafs.FileType.Directory:
        files = _list_folder(fs, item, path)
        if not files:
            raise CorpusError(f"no files under folder {item}")
        return files
    return [SourceFile(item, path, info.size, fs)]


def _get_info(fs: pafs.FileSystem, path: str, item: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise CorpusError(f"cannot read {item}: {err}") from None


def _list_folder(fs, shown_root: str, root: str, suffix: str = "") -> list[SourceFile]:
    """All files below `root`, skipping hidden files and folders (.git, .cache, ...)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as err:
        raise CorpusError(f"cannot list {shown_root}: {err}") from None
    files = []
    for info in infos:
        rel = info.path[len(root):].lstrip("/")
        if info.type != pafs.FileType.File or not info.path.endswith(suffix):
            continue
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        files.append(SourceFile(_join_shown(shown_root, rel), info.path, info.size, fs))
    return sorted(files, key=lambda f: f.path)


def _join_shown(shown_root: str, rel: str) -> str:
    return shown_root.rstrip("/") + "/" + rel


def _expand_glob(fs, item: str, path: str) -> list[SourceFile]:
    """`*` and `?` stay inside one folder, `**` spans folders, as in the shell."""
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS.search(part))
    base = "/".join(parts[:fixed]) or "/"
    pattern = re.compile(_glob_to_regex("/".join(parts[fixed:])))
    shown_base = item[: len(item) - len("/".join(parts[fixed:]))]
    info = _get_info(fs, base, item)
    if info.type != pafs.FileType.Directory:
        raise CorpusError(f"input not found: {item} (no folder {base})")
    matches = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        rel = info.path[len(base):].lstrip("/")
        if info.type == pafs.FileType.File and pattern.fullmatch(rel):
            matches.append(SourceFile(shown_base + rel, info.path, info.size, fs))
    if not matches:
        raise CorpusError(f"input not found: no file matches {item}")
    return matches


def _glob_to_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)
