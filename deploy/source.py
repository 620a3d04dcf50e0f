"""Where a served model comes from: a run folder or a model folder (docs/contracts.md, section 2), as
a local path or any URI pyarrow.fs understands (file://, s3://, gs://, hdfs://)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from models import ModelFolderError, load_model
from models.folder import CONFIG, WEIGHTS
from pipeline.vocab import Vocabulary


def _is_uri(location: str) -> bool:
    return "://" in location


def resolve(location: str) -> str:
    """The model folder `location` names: itself, or RUN_DIR/model for a run folder. Local paths
    come back absolute (replicas may run in another working directory). Checks only that a
    config.json is there; loading checks the rest."""
    if not _is_uri(location):
        path = Path(location).expanduser().resolve()
        for folder in (path, path / "model"):
            if (folder / CONFIG).is_file():
                return str(folder)
        raise ModelFolderError(f"model folder {location} does not exist" if not path.exists() else
                               f"{location} is neither a model folder nor a run folder: no {CONFIG} in it or in "
                               f"{Path(location) / 'model'}")
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as err:
        raise ModelFolderError(f"cannot open {location}: {err}") from None
    path = path.rstrip("/")
    for folder in (path, f"{path}/model"):
        if fs.get_file_info(f"{folder}/{CONFIG}").type == pafs.FileType.File:
            return location.rstrip("/") + ("" if folder == path else "/model")
    raise ModelFolderError(f"{location} is neither a model folder nor a run folder: no {CONFIG} in it or in its model/")


def default_name(folder: str) -> str:
    """The name clients use for the model: the run folder's name (or the model folder's, outside one)."""
    parts = folder.rstrip("/").split("/")
    return parts[-2] if parts[-1] == "model" and len(parts) > 1 and parts[-2] else parts[-1]


def load(folder: str, device: str = "cpu"):
    """(model in eval mode, Vocabulary, info) from a folder `resolve` returned. A URI's two files are
    copied to a temporary folder first."""
    if not _is_uri(folder):
        return _load_local(folder, device)
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(folder)
    with tempfile.TemporaryDirectory(prefix="charrnn-model-") as tmp:
        for name in (CONFIG, WEIGHTS):
            try:
                with fs.open_input_stream(f"{path}/{name}") as src, open(os.path.join(tmp, name), "wb") as dst:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
            except OSError as err:
                raise ModelFolderError(f"{folder}: cannot read {name}: {err}") from None
        return _load_local(tmp, device, shown=folder)


def _load_local(path: str, device: str, shown: str | None = None):
    model, config, vocab, info = load_model(path, device=device)
    try:
        return model, Vocabulary.from_json(vocab), info
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFolderError(f"{shown or path}: invalid vocabulary: {err}") from None
