"""The model folder (docs/contracts.md, section 2): config.json next to model.safetensors.

JSON and safetensors rather than a pickled checkpoint: loading runs no code from the file, and the
tensors are saved on the CPU, so a model trained on a GPU loads on any machine with PyTorch."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .charrnn import CharRNN, ModelConfig
from .series import SeriesConfig, SeriesRNN

FORMAT = "charrnn-model"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# What each task's folder is read with, for the message when the wrong one is given.
TASKS = {"text": "charrnn sample, eval and serve read it", "series": "charrnn forecast and serve read it"}


class ModelFolderError(ValueError):
    """A model folder that is missing, or that this version cannot read."""


def save_model(model: torch.nn.Module, config: ModelConfig, vocab: dict, path: str | os.PathLike,
               info: dict | None = None) -> None:
    """Write a text model: `model`'s weights, `config`, the dataset's `vocab` JSON and free-form
    `info` (step, val_loss, ...) to the folder `path`, replacing a model folder already there."""
    path = Path(path)
    _check_vocab(vocab, config, path)
    _write(model, CharRNN, config, {"task": "text", "vocab": vocab}, path, info)


def save_series_model(model: torch.nn.Module, config: SeriesConfig, feature_scaling: dict, path: str | os.PathLike,
                      info: dict | None = None) -> None:
    """Write a time-series model: weights, `config`, `feature_scaling` (the JSON key `series`: {columns,
    mean, std}, the normalization of the prepared series dataset) and `info`, as save_model does."""
    path = Path(path)
    _check_series(feature_scaling, config, path)
    _write(model, SeriesRNN, config, {"task": "series", "series": feature_scaling}, path, info)


def _write(model, network, config, task_keys: dict, path: Path, info: dict | None) -> None:
    """Written in place, config.json removed first and written last: a save cut short leaves a folder
    no loader accepts, never one model's weights under another's config. Training saves into a
    staging folder that storage.staged then swaps in whole (training/run_folder.py)."""
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    _check_weights({name: t.shape for name, t in state.items()}, network, config, path)
    # Serialized before anything touches the disk, so a value JSON cannot hold fails early.
    text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **task_keys, "model": config.to_json(),
                       "info": info or {}}, indent=1)
    if path.exists() and not _replaceable(path):
        raise ModelFolderError(f"{path} exists and is not a {FORMAT} folder; refusing to replace it")
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).unlink(missing_ok=True)
    save_file(state, path / WEIGHTS, metadata={"format": FORMAT})
    (path / CONFIG).write_text(text, encoding="utf-8")


def _replaceable(path: Path) -> bool:
    """An empty folder, a model folder of any version, or what a save cut short left of one (our
    weights without their config): never someone's other files."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    try:
        if CONFIG in names:
            return json.loads((path / CONFIG).read_text(encoding="utf-8")).get("format") == FORMAT
        if names != {WEIGHTS}:
            return False
        with safe_open(path / WEIGHTS, "pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, SafetensorError):
        return False


def model_task(path: str | os.PathLike) -> str:
    """"text" or "series": which loader reads the model folder `path`."""
    return _read_config(Path(path)).get("task", "text")


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"
               ) -> tuple[CharRNN, ModelConfig, dict, dict]:
    """Read the text model folder `path` -> (model on `device` in eval mode, config, vocab, info)."""
    path = Path(path)
    meta = _read_config(path, "text")
    config = _parse_config(ModelConfig, meta, path)
    vocab, info = meta.get("vocab"), meta.get("info", {})
    _check_vocab(vocab, config, path)
    return _load_weights(CharRNN, config, path, device), config, vocab, info


def load_series_model(path: str | os.PathLike, device: torch.device | str = "cpu"
                      ) -> tuple[SeriesRNN, SeriesConfig, dict, dict]:
    """Read the time-series model folder `path` -> (model on `device` in eval mode, config,
    feature_scaling {columns, mean, std}, info)."""
    path = Path(path)
    meta = _read_config(path, "series")
    config = _parse_config(SeriesConfig, meta, path)
    feature_scaling, info = meta.get("series"), meta.get("info", {})
    _check_series(feature_scaling, config, path)
    return _load_weights(SeriesRNN, config, path, device), config, feature_scaling, info


def _read_config(path: Path, task: str | None = None) -> dict:
    """config.json of the model folder `path`, checked for format, version and (if given) task."""
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist" if not path.exists()
                               else f"{path} is not a folder, so not a model folder")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise ModelFolderError(f"{path} is not a model folder: {name} is missing")
    try:
        meta = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{path / CONFIG} is not readable JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelFolderError(f"{path / CONFIG} is not a {FORMAT} config (format {found!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{path} was written by format version {meta.get('format_version')}; "
                               f"this charrnn reads version {FORMAT_VERSION}")
    found = meta.get("task", "text")
    if found not in TASKS:
        raise ModelFolderError(f"{path / CONFIG}: unknown task {found!r} (this charrnn knows {', '.join(TASKS)})")
    if task is not None and found != task:
        raise ModelFolderError(f"{path} holds a {found} model, not a {task} model ({TASKS[found]})")
    if not isinstance(meta.get("info", {}), dict):
        raise ModelFolderError(f"{path / CONFIG}: info must be a JSON object")
    return meta


def _parse_config(config_class, meta: dict, path: Path):
    try:
        return config_class.from_json(meta.get("model"))
    except (TypeError, ValueError) as err:
        raise ModelFolderError(f"{path / CONFIG}: {err}") from None


def _load_weights(network, config, path: Path, device):
    try:
        state = load_file(path / WEIGHTS)
    except (OSError, SafetensorError) as err:
        raise ModelFolderError(f"{path / WEIGHTS} is not a readable safetensors file: {err}") from None
    _check_weights({name: t.shape for name, t in state.items()}, network, config, path)
    broken = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise ModelFolderError(f"{path / WEIGHTS}: {', '.join(sorted(broken))} hold NaN or infinite values")
    model = network(config)
    model.load_state_dict(state)
    return model.to(device).eval()


def _check_series(feature_scaling, config: SeriesConfig, path: Path) -> None:
    """The config.json key `series`: the features' names and normalization."""
    keys = ("columns", "mean", "std")
    if not isinstance(feature_scaling, dict) or not all(isinstance(feature_scaling.get(k), list) for k in keys):
        raise ModelFolderError(f"{path}: series must be a JSON object with columns, mean and std (lists)")
    if not len({len(feature_scaling[k]) for k in keys} | {config.features}) == 1:
        raise ModelFolderError(f"{path}: series columns, mean and std must each have the model's "
                               f"{config.features} feature(s)")
    numbers = feature_scaling["mean"] + feature_scaling["std"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers) \
            or not all(v > 0 for v in feature_scaling["std"]):
        raise ModelFolderError(f"{path}: series mean must be finite numbers and std positive ones")


def _check_vocab(vocab, config: ModelConfig, path: Path) -> None:
    """The vocabulary is the dataset's business; here it only has to fit the model's ids."""
    if not isinstance(vocab, dict) or not isinstance(vocab.get("chars"), str) \
            or not isinstance(vocab.get("unknown_id"), int):
        raise ModelFolderError(f"{path}: vocab must be a JSON object with chars (a string) and unknown_id")
    if max(len(vocab["chars"]), vocab["unknown_id"]) >= config.vocab_size:
        raise ModelFolderError(f"{path}: vocab has ids up to {max(len(vocab['chars']), vocab['unknown_id'])} "
                               f"but the model's vocab_size is {config.vocab_size}")


def _check_weights(shapes: dict[str, torch.Size], network, config, path: Path) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialization
        expected = {name: t.shape for name, t in network(config).state_dict().items()}
    problems = []
    if missing := sorted(expected.keys() - shapes.keys()):
        problems.append(f"missing {', '.join(missing)}")
    if unexpected := sorted(shapes.keys() - expected.keys()):
        problems.append(f"unexpected {', '.join(unexpected)}")
    problems += [f"{name} is {list(shapes[name])}, the config needs {list(shape)}"
                 for name, shape in expected.items() if name in shapes and shapes[name] != shape]
    if problems:
        raise ModelFolderError(f"{path}: weights do not match the model config: {'; '.join(problems)}")
