"""The time-series regressor of the classic lesson's first part: values x_t -> stacked RNN/GRU/LSTM ->
dropout -> linear head -> x_{t+1}, for one or more features at once, and forecasting with it.

The network works on normalized values ((x - mean) / std, with the training split's statistics,
stored in the model folder); `forecast` takes and returns values in the data's own units."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .charrnn import RecurrentConfig, State, recurrent_stack, zero_state


@dataclass(frozen=True)
class SeriesConfig(RecurrentConfig):
    features: int
    cell: str = "rnn"
    layers: int = 1
    hidden: int = 32
    dropout: float = 0.0
    required = "features"

    def __post_init__(self):
        self._check()


class SeriesRNN(nn.Module):
    def __init__(self, config: SeriesConfig):
        super().__init__()
        self.config = config
        self.rnn = recurrent_stack(config, config.features)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.features)

    def forward(self, values: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """values [batch, time, features] (normalized) -> (the next value after each step
        [batch, time, features], state after the last step). `state` None starts from zeros."""
        out, state = self.rnn(values, state)
        return self.head(self.dropout(out)), state

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        return zero_state(self.config, batch, self.head.weight, device)


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
