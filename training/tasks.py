"""What differs between training on text and on time series, behind one small interface, so the
driver and the per-worker loop are written once:

  driver side:  open the dataset, count its training points, write the spec the workers build it from
  worker side:  build the network, read a shard's runs as arrays, judge a loss, save the model

Text runs are token ids and the loss is cross-entropy in nats per character; series runs are
normalized float values [points, features] and the loss is the mean squared error."""
from __future__ import annotations

import math

import numpy as np

from models import (CharRNN, ModelConfig, SeriesConfig, SeriesRNN, load_model, load_series_model, save_model,
                    save_series_model)
from pipeline.series.dataset import PreparedSeries, value_runs
from pipeline.text.dataset import PreparedDataset, token_runs
from pipeline.text.vocab import Vocabulary
from training.config import TrainConfig

# The classic lesson's time-series recipe, where `--task series` leaves an option unset.
SERIES_DEFAULTS = {"cell": "rnn", "layers": 1, "hidden": 32, "dropout": 0.0, "lr": 0.01, "batch": 16, "seq": 20}


class TextTask:
    name, unit, loss_unit = "text", "chars", "nats per character"

    @staticmethod
    def open(location: str) -> PreparedDataset:
        return PreparedDataset(location)

    @staticmethod
    def train_points(dataset: PreparedDataset) -> int:
        return dataset.tokens("train")

    @staticmethod
    def spec(dataset: PreparedDataset, config: TrainConfig) -> dict:
        vocab = dataset.manifest["vocab"]
        model = ModelConfig(vocab_size=vocab["size"], cell=config.cell, layers=config.layers, hidden=config.hidden,
                            dropout=config.dropout, embedding_dim=config.embedding_dim)
        return {"model": model.to_json(), "vocab": vocab}

    def __init__(self, spec: dict):
        self.config = ModelConfig.from_json(spec["model"])
        self.vocab = spec["vocab"]
        self.dtype = Vocabulary.from_json(self.vocab).dtype

    def build(self) -> CharRNN:
        return CharRNN(self.config)

    def runs(self, table):
        return token_runs(table["tokens"], self.dtype)

    def diverged(self, loss: float) -> bool:
        """Three times the loss of a uniform guess: no healthy run gets there."""
        return loss > 3 * math.log(self.config.vocab_size)

    def val_metrics(self, val_loss: float) -> dict:
        return {"val_loss": val_loss, "val_bpc": val_loss / math.log(2)}

    def save(self, module, path, info: dict) -> None:
        save_model(module, self.config, self.vocab, path, info=info)

    @staticmethod
    def load_state(path) -> dict:
        return load_model(path)[0].state_dict()


class SeriesTask:
    name, unit, loss_unit = "series", "points", "mean squared error, normalized"

    @staticmethod
    def open(location: str) -> PreparedSeries:
        return PreparedSeries(location)

    @staticmethod
    def train_points(dataset: PreparedSeries) -> int:
        return dataset.points("train")

    @staticmethod
    def spec(dataset: PreparedSeries, config: TrainConfig) -> dict:
        model = SeriesConfig(features=len(dataset.columns), cell=config.cell, layers=config.layers,
                             hidden=config.hidden, dropout=config.dropout)
        return {"model": model.to_json(), "series": {"columns": dataset.columns, **dataset.normalization}}

    def __init__(self, spec: dict):
        self.config = SeriesConfig.from_json(spec["model"])
        self.feature_scaling = spec["series"]
        self.mean = np.asarray(self.feature_scaling["mean"], np.float32)
        self.std = np.asarray(self.feature_scaling["std"], np.float32)

    def build(self) -> SeriesRNN:
        return SeriesRNN(self.config)

    def runs(self, table):
        # The network learns on unit-variance data whatever the units of the columns.
        return ((run - self.mean) / self.std for run in value_runs(table["values"], self.config.features))

    def diverged(self, loss: float) -> bool:
        """A hundred times the variance of the normalized data: far past predicting the mean."""
        return loss > 100.0

    def val_metrics(self, val_loss: float) -> dict:
        return {"val_loss": val_loss}

    def save(self, module, path, info: dict) -> None:
        save_series_model(module, self.config, self.feature_scaling, path, info=info)

    @staticmethod
    def load_state(path) -> dict:
        return load_series_model(path)[0].state_dict()


TASKS = {"text": TextTask, "series": SeriesTask}
