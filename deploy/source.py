"""Where a served model comes from: a run folder or a model folder (docs/contracts.md, sections 2
and 4.2), text or time series, as a local path or any URI pyarrow.fs understands (file://, s3://,
gs://, hdfs://)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from models import ModelFolderError, load_model, load_series_model, model_task
from models.folder import CONFIG, WEIGHTS
from storage import join_location, public_location
from pipeline.text.vocab import Vocabulary


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
        raise ModelFolderError(f"cannot open {public_location(location)}: {err}") from None
    path = path.rstrip("/")
    for folder in (path, f"{path}/model"):
        if fs.get_file_info(f"{folder}/{CONFIG}").type == pafs.FileType.File:
            return location if folder == path else join_location(location, "model")
    raise ModelFolderError(f"{public_location(location)} is neither a model folder nor a run folder: no {CONFIG} in "
                           f"it or in its model/")


def default_name(folder: str) -> str:
    """The name clients use for the model: the run folder's name (or the model folder's, outside one)."""
    parts = public_location(folder).rstrip("/").split("/")
    return parts[-2] if parts[-1] == "model" and len(parts) > 1 and parts[-2] else parts[-1]


def load(folder: str, device: str = "cpu"):
    """(text model in eval mode, Vocabulary, info) from a folder `resolve` returned."""
    with _local(folder) as path:
        model, config, vocab, info = load_model(path, device=device)
        try:
            return model, Vocabulary.from_json(vocab), info
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFolderError(f"{public_location(folder)}: invalid vocabulary: {err}") from None


def load_series(folder: str, device: str = "cpu"):
    """(series model in eval mode, series {columns, mean, std}, info) from a folder `resolve` returned."""
    with _local(folder) as path:
        model, _, series, info = load_series_model(path, device=device)
        return model, series, info


def task(folder: str) -> str:
    """"text" or "series": which application serves the folder `resolve` returned."""
    with _local(folder) as path:
        return model_task(path)


@contextlib.contextmanager
def _local(folder: str):
    """A local path holding `folder`: itself, or for a URI a temporary copy of its two files."""
    if not _is_uri(folder):
        yield folder
        return
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(folder)
    with tempfile.TemporaryDirectory(prefix="charrnn-model-") as tmp:
        for name in (CONFIG, WEIGHTS):
            try:
                with fs.open_input_stream(f"{path}/{name}") as src, open(os.path.join(tmp, name), "wb") as dst:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
            except OSError as err:
                raise ModelFolderError(f"{public_location(folder)}: cannot read {name}: {err}") from None
        yield tmp
