"""charrnn forecast: a series model trained here on a sine continues it, as a user runs the command."""
import json

import numpy as np
import pytest
import torch

from conftest import error_line, run_cli
from models import CharRNN, ModelConfig, SeriesConfig, SeriesRNN, save_model, save_series_model

pytestmark = pytest.mark.slow  # trains a series model first (tens of seconds on a busy machine)

PHASE = 0.3  # the history's phase: not one the model was trained on


def sine(start: int, stop: int, phase: float = PHASE) -> np.ndarray:
    return np.sin(0.1 * np.arange(start, stop) + phase)


def write_csv(path, columns: dict) -> str:
    names = list(columns)
    rows = zip(*columns.values())
    path.write_text(",".join(names) + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return str(path)


def read_forecast(text: str) -> tuple[list[str], np.ndarray]:
    header, *rows = text.strip().splitlines()
    return header.split(","), np.array([[float(v) for v in row.split(",")] for row in rows])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The lesson's plain RNN, trained with plain PyTorch on windows of sin(0.1 t) for a few hundred
    Adam steps (a second or two), saved as a run folder's model."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = np.sin(0.1 * np.arange(3000))
    mean, std = x.mean(), x.std()
    z = torch.tensor((x - mean) / std, dtype=torch.float32)
    config = SeriesConfig(features=1, cell="rnn", layers=1, hidden=32)
    model = SeriesRNN(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    for _ in range(300):
        starts = rng.integers(0, len(z) - 51, 16)
        batch = torch.stack([z[s : s + 51] for s in starts]).unsqueeze(-1)
        predicted, _ = model(batch[:, :-1])
        loss = torch.nn.functional.mse_loss(predicted, batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("sine-run")
    save_series_model(model, config, {"columns": ["value"], "mean": [float(mean)], "std": [float(std)]},
                      path / "model", info={"step": 300})
    return path


def test_forecast_continues_the_sine(run_dir, tmp_path):
    history = write_csv(tmp_path / "history.csv", {"t": range(300), "value": sine(0, 300)})
    result = run_cli("forecast", "--model", run_dir, "--history", history, "--steps", 20)
    assert result.returncode == 0, result.stderr
    header, rows = read_forecast(result.stdout)
    assert header == ["step", "value"]
    assert rows[:, 0].tolist() == list(range(1, 21))
    # Twenty steps, each fed back as the next input, stay on the sine: far below its variance (0.5).
    mse = ((rows[:, 1] - sine(300, 320)) ** 2).mean()
    assert mse < 0.05 * 0.5, mse


def test_holdout_plot_and_out_file_from_a_model_folder(run_dir, tmp_path):
    history = tmp_path / "history.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"value": sine(0, 320).astype(np.float32)}), history)
    png, out = tmp_path / "forecast.png", tmp_path / "forecast.csv"
    result = run_cli("forecast", "--model", run_dir / "model", "--history", history, "--steps", 20, "--holdout",
                     "--plot", png, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    _, rows = read_forecast(out.read_text())
    assert len(rows) == 20
    reported = float(result.stderr.split("MSE ")[1].split()[0])
    assert reported == pytest.approx(((rows[:, 1] - sine(300, 320)) ** 2).mean(), rel=1e-4, abs=1e-9)
    assert reported < 0.05 * 0.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_are_one_line_errors(run_dir, tmp_path):
    model = ("--model", run_dir)
    wrong_column = write_csv(tmp_path / "wrong.csv", {"x": sine(0, 50)})
    line = error_line(run_cli("forecast", *model, "--history", wrong_column, "--steps", 5))
    assert "wrong.csv has no column 'value' (its columns: x)" in line and line.startswith("charrnn forecast: error:")

    (tmp_path / "nan.csv").write_text("value\n0.1\n0.2\nnan\n0.3\n")
    assert "nan.csv: column 'value' has a NaN value at row 3" in \
        error_line(run_cli("forecast", *model, "--history", tmp_path / "nan.csv", "--steps", 5))

    good = write_csv(tmp_path / "good.csv", {"value": sine(0, 10)})
    assert "--steps must be >= 1, got 0" in error_line(run_cli("forecast", *model, "--history", good, "--steps", 0))
    assert "--holdout needs more than --steps 10 rows" in \
        error_line(run_cli("forecast", *model, "--history", good, "--steps", 10, "--holdout"))

    text_model = tmp_path / "text-model"
    config = ModelConfig(vocab_size=5, layers=1, hidden=8, dropout=0.0)
    save_model(CharRNN(config), config, {"chars": "abcd", "unknown_id": 4}, text_model)
    line = error_line(run_cli("forecast", "--model", text_model, "--history", good, "--steps", 5))
    assert "holds a text model, not a series model" in line
    assert json.loads((text_model / "config.json").read_text())["task"] == "text"
