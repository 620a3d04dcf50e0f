"""Where a model comes from, for every command that reads one (serve, sample, eval, forecast): a run
folder or a model folder (docs/contracts.md, sections 2 and 4.2), text or time series, at a local
path or any URI pyarrow.fs understands (file://, s3://, gs://, hdfs://)."""
from __future__ import annotations

import pyarrow.fs as pafs

from models import ModelFolderError, load_model, load_series_model, model_task
from models.folder import CONFIG, WEIGHTS
from pipeline.text.vocab import Vocabulary
from storage import is_uri, join_location, local_copy, public_location, resolve_filesystem


def resolve(location: str) -> str:
    """The model folder `location` names: itself, or RUN_DIR/model for a run folder. Local paths
    come back absolute (replicas may run in another working directory). Checks only that a
    config.json is there; loading checks the rest."""
    fs, path = resolve_filesystem(location)
    path = path.rstrip("/") or "/"
    for folder, name in ((path, location), (f"{path}/model", join_location(location, "model"))):
        if fs.get_file_info(f"{folder}/{CONFIG}").type == pafs.FileType.File:
            return name if is_uri(location) else folder
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise ModelFolderError(f"model folder {public_location(location)} does not exist")
    raise ModelFolderError(f"{public_location(location)} is neither a model folder nor a run folder: no {CONFIG} "
                           f"in it or in its model/")


def default_name(folder: str) -> str:
    """The name clients use for the model: the run folder's name (or the model folder's, outside one)."""
    parts = public_location(folder).rstrip("/").split("/")
    return parts[-2] if parts[-1] == "model" and len(parts) > 1 and parts[-2] else parts[-1]


def load(folder: str, device: str = "cpu"):
    """(text model in eval mode, Vocabulary, info) from a folder `resolve` returned."""
    with local_copy(folder, (CONFIG, WEIGHTS)) as path:
        model, config, vocab, info = load_model(path, device=device)
        try:
            return model, Vocabulary.from_json(vocab), info
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFolderError(f"{public_location(folder)}: invalid vocabulary: {err}") from None


def load_series(folder: str, device: str = "cpu"):
    """(series model in eval mode, feature_scaling {columns, mean, std}, info) from a folder `resolve` returned."""
    with local_copy(folder, (CONFIG, WEIGHTS)) as path:
        model, _, feature_scaling, info = load_series_model(path, device=device)
        return model, feature_scaling, info


def task(folder: str) -> str:
    """"text" or "series": which application serves the folder `resolve` returned."""
    with local_copy(folder, (CONFIG, WEIGHTS)) as path:
        return model_task(path)
