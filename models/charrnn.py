"""The character-level recurrent language model: token ids -> embedding -> stacked LSTM/GRU/RNN ->
dropout -> linear head over the vocabulary.

The classic recipe feeds one-hot vectors into nn.LSTM(n_chars, ...). An embedding of width
vocab_size is the same function (one-hot @ W_ih is a row of W_ih, and an identity embedding makes
them equal exactly) without building the one-hot tensor, so it is the default width."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# The one-step kernels of the same cells (nn.RNN's default nonlinearity is tanh).
CELL_STEPS = {"lstm": torch.lstm_cell, "gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell}

# LSTM: (h, c), each [layers, batch, hidden]; GRU and RNN: h alone.
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true must not pass as 1


class RecurrentConfig:
    """What the frozen dataclass configs of every network here share: checks of the recurrent stack
    (`cell`, `layers`, `hidden`, `dropout`, and the positive sizes in `sizes`) and the JSON round
    trip, in which an unknown key or a missing `required` one is an error."""
    required = ""
    sizes: tuple[str, ...] = ("layers", "hidden")
    # Far beyond any model this stack trains, and small enough that a config from an untrusted
    # folder cannot ask for an absurd allocation before its weights are compared with it.
    MAX_SIZE = {"layers": 64, "hidden": 1 << 16, "vocab_size": 1 << 21, "features": 1 << 16, "embedding_dim": 1 << 16}

    def _check(self) -> None:
        for name in (self.required, *self.sizes):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
            if value > self.MAX_SIZE.get(name, value):
                raise ValueError(f"model {name} of {value:,} is beyond this charrnn's limit of {self.MAX_SIZE[name]:,}")
        if self.cell not in CELLS:
            raise ValueError(f"model cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model dropout must be a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))  # JSON may hand us 0 for 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict):
        if not isinstance(obj, dict):
            raise ValueError(f"model config must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"model config has unknown keys: {', '.join(unknown)}")
        if cls.required not in obj:
            raise ValueError(f"model config lacks {cls.required}")
        return cls(**obj)


def recurrent_stack(config, input_dim: int) -> nn.Module:
    # torch applies `dropout` only between layers, and warns when there is no "between".
    between = config.dropout if config.layers > 1 else 0.0
    return CELLS[config.cell](input_dim, config.hidden, num_layers=config.layers, dropout=between, batch_first=True)


def zero_state(config, batch: int, like: torch.Tensor, device: torch.device | str | None = None) -> State:
    """The zero state of `config`'s stack, in `like`'s dtype, on its device unless `device` says otherwise."""
    device = like.device if device is None else device
    h = torch.zeros(config.layers, batch, config.hidden, dtype=like.dtype, device=device)
    return (h, torch.zeros_like(h)) if config.cell == "lstm" else h


@dataclass(frozen=True)
class ModelConfig(RecurrentConfig):
    vocab_size: int
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 512
    dropout: float = 0.5
    embedding_dim: int | None = None  # None: vocab_size, the capacity of the one-hot input
    required = "vocab_size"

    def __post_init__(self):
        self._check()
        if self.embedding_dim is not None and (not _is_int(self.embedding_dim) or self.embedding_dim < 1):
            raise ValueError(f"model embedding_dim must be a positive integer or null, got {self.embedding_dim!r}")
        if self.embedding_dim is not None and self.embedding_dim > self.MAX_SIZE["embedding_dim"]:
            raise ValueError(f"model embedding_dim of {self.embedding_dim:,} is beyond this charrnn's limit of "
                             f"{self.MAX_SIZE['embedding_dim']:,}")

    @property
    def input_dim(self) -> int:
        return self.vocab_size if self.embedding_dim is None else self.embedding_dim


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.input_dim)
        self.rnn = recurrent_stack(config, config.input_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.vocab_size)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids [batch, time] -> (logits [batch, time, vocab], state after the last step).
        `state` None starts from zeros."""
        out, state = self.rnn(self.embedding(ids), state)
        return self.head(self.dropout(out)), state

    def step(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """One time step: ids [batch] -> (logits [batch, vocab], state after it); the same function
        as `forward(ids[:, None], state)`. Sampling runs this once per character: layer by layer
        with the fused cell kernels, it skips the sequence machinery of nn.LSTM's CPU (oneDNN) path,
        which costs more than the step itself at decoding sizes (bench/serve.py times both as
        `network_step`; figures in BENCHMARKS.md)."""
        if state is None:
            state = self.init_state(ids.shape[0])
        rnn, cell, lstm = self.rnn, CELL_STEPS[self.config.cell], self.config.cell == "lstm"
        x, hs, cs = self.embedding(ids), [], []
        for layer, weights in enumerate(rnn.all_weights):  # per layer: w_ih, w_hh, b_ih, b_hh
            if layer:
                x = F.dropout(x, rnn.dropout, self.training)
            if lstm:
                x, c = cell(x, (state[0][layer], state[1][layer]), *weights)
                cs.append(c)
            else:
                x = cell(x, state[layer], *weights)
            hs.append(x)
        state = (torch.stack(hs), torch.stack(cs)) if lstm else torch.stack(hs)
        return self.head(self.dropout(x)), state

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """The zero state, on the model's device and in its dtype unless `device` says otherwise."""
        return zero_state(self.config, batch, self.head.weight, device)


def detach_state(state: State) -> State:
    """Cut the graph behind `state`, for truncated backpropagation through time."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def reset_state_rows(state: State, mask: torch.Tensor) -> State:
    """Zero the state of the batch rows where `mask` [batch] is true (their streams start a new
    text run), keeping the others. Returns new tensors: the old ones may still be in the graph."""
    if isinstance(state, tuple):
        return tuple(reset_state_rows(s, mask) for s in state)
    return state.masked_fill(mask.to(state.device, torch.bool).view(1, -1, 1), 0.0)
