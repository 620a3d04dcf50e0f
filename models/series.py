"""The time-series regressor of the classic lesson's first part: values x_t -> stacked RNN/GRU/LSTM ->
dropout -> linear head -> x_{t+1}, for one or more features at once, and forecasting with it.

The network works on normalized values ((x - mean) / std, with the training split's statistics,
stored in the model folder); `forecast` takes and returns values in the data's own units."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .charrnn import CELLS, State, _is_int


@dataclass(frozen=True)
class SeriesConfig:
    features: int
    cell: str = "rnn"
    layers: int = 1
    hidden: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("features", "layers", "hidden"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if self.cell not in CELLS:
            raise ValueError(f"model cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model dropout must be a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "SeriesConfig":
        if not isinstance(obj, dict):
            raise ValueError(f"model config must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"model config has unknown keys: {', '.join(unknown)}")
        if "features" not in obj:
            raise ValueError("model config lacks features")
        return cls(**obj)


class SeriesRNN(nn.Module):
    def __init__(self, config: SeriesConfig):
        super().__init__()
        self.config = config
        between = config.dropout if config.layers > 1 else 0.0
        self.rnn = CELLS[config.cell](config.features, config.hidden, num_layers=config.layers,
                                      dropout=between, batch_first=True)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.features)

    def forward(self, values: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """values [batch, time, features] (normalized) -> (the next value after each step
        [batch, time, features], state after the last step). `state` None starts from zeros."""
        out, state = self.rnn(values, state)
        return self.head(self.dropout(out)), state

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        weight = self.head.weight
        h = torch.zeros(self.config.layers, batch, self.config.hidden, dtype=weight.dtype,
                        device=weight.device if device is None else device)
        return (h, torch.zeros_like(h)) if self.config.cell == "lstm" else h


class Normalization:
    """Per-feature (x - mean) / std, from the model folder's `series` entry."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, np.float64)
        self.std = np.asarray(std, np.float64)

    def apply(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.std).astype(np.float32)

    def invert(self, values: np.ndarray) -> np.ndarray:
        return values.astype(np.float64) * self.std + self.mean


@torch.no_grad()
def forecast(model: SeriesRNN, normalization: Normalization, histories: list[np.ndarray],
             steps: list[int]) -> list[np.ndarray]:
    """For each history [time, features] (data units, at least one point), the next steps[i] values
    [steps[i], features]: the first predicted from the history, each later one from the values
    predicted before it (fed back as input).

    Every history goes through the network in one packed forward pass, then every sequence still
    forecasting takes one batched step at a time, so concurrent requests cost one batch."""
    if len(histories) != len(steps):
        raise ValueError("give one step count per history")
    if not histories:
        return []
    model.eval()
    device = model.head.weight.device
    lengths = torch.tensor([len(h) for h in histories])
    padded = torch.zeros(len(histories), int(lengths.max()), model.config.features)
    for i, history in enumerate(histories):
        padded[i, : len(history)] = torch.from_numpy(normalization.apply(history))
    _, state = model.rnn(pack_padded_sequence(padded.to(device), lengths, batch_first=True,
                                                    enforce_sorted=False))
    last_hidden = state[0][-1] if isinstance(state, tuple) else state[-1]  # top layer at each sequence's end
    prediction = model.head(last_hidden)  # [batch, features]
    predicted = [prediction]
    for _ in range(max(steps) - 1):
        out, state = model.rnn(prediction.unsqueeze(1), state)
        prediction = model.head(out[:, -1])
        predicted.append(prediction)
    stacked = torch.stack(predicted, dim=1).float().cpu().numpy()  # [batch, max(steps), features]
    return [normalization.invert(stacked[i, : steps[i]]) for i in range(len(histories))]
