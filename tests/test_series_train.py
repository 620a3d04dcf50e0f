"""charrnn train --task series: the classic lesson's sine wave, on Ray Train, end to end."""
import json

import numpy as np
import pytest
import torch

from models import Normalization, forecast, load_series_model
from pipeline.errors import CorpusError
from pipeline.series.dataset import PreparedSeries
from pipeline.series.prepare import SeriesOptions, prepare_series
from training.config import TrainingError
from training.driver import train
from training.run_folder import RunFolder
from training.checkpoint import TRAINER_STATE
from training.tasks import SeriesTask

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier

QUIET = {"log_every": 100}


@pytest.fixture(scope="module")
def sine_dataset(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("sine")
    prepare_series([], str(root / "ds"), SeriesOptions(synthetic="sine", series=4, points=20_000, run_length=1000),
                   log=lambda m: None)
    return str(root / "ds")


def records(run_dir) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_step_mse(model, normalization: Normalization, runs: list[np.ndarray]) -> float:
    """Mean squared error, in the data's units, of predicting each validation point from those before it."""
    errors = []
    with torch.no_grad():
        for run in runs:
            predicted, _ = model(torch.from_numpy(normalization.apply(run[:-1]))[None])
            errors.append((normalization.invert(predicted[0].numpy()) - run[1:]) ** 2)
    return float(np.concatenate(errors).mean())


@pytest.fixture(scope="module")
def sine_run(sine_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sine-run") / "run"
    summary = train([sine_dataset], str(run_dir), {"task": "series", "max_steps": 800, "val_every": 200,
                                                    "checkpoint_every": 400, **QUIET}, log=lambda m: None)
    return run_dir, summary


def test_plain_rnn_learns_the_sine_to_a_thousandth_of_its_variance(sine_dataset, sine_run):
    run_dir, summary = sine_run
    model, config, series, info = load_series_model(run_dir / "model")
    assert (config.cell, config.layers, config.hidden) == ("rnn", 1, 32)  # the lesson's defaults
    assert summary["steps"] == 800
    dataset = PreparedSeries(sine_dataset)
    assert series["columns"] == dataset.columns == ["value"]
    validation = list(dataset.iter_runs("validation"))
    variance = float(np.concatenate(validation).var())
    normalization = Normalization(series["mean"], series["std"])
    assert one_step_mse(model, normalization, validation) < 1e-3 * variance
    # The run's own validation figure is the same error on normalized data.
    assert info["val_loss"] < 1e-3
    metrics = records(run_dir)
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 801))
    assert all(r["points_per_s"] > 0 for r in metrics if "loss" in r)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multi_step_forecast_tracks_the_wave(sine_dataset, sine_run):
    run_dir, _ = sine_run
    model, _, series, _ = load_series_model(run_dir / "model")
    run = next(PreparedSeries(sine_dataset).iter_runs("validation"))
    history, truth = run[:200], run[200:263]  # one period ahead: about 63 points
    predicted = forecast(model, Normalization(series["mean"], series["std"]), [history], [len(truth)])[0]
    assert predicted.shape == truth.shape
    assert float(((predicted - truth) ** 2).mean()) < 0.05 * float(run.var())
    assert np.corrcoef(predicted[:, 0], truth[:, 0])[0, 1] > 0.95


def test_series_run_keeps_the_lessons_options_and_checkpoints_what_resume_reads(sine_run):
    """Resuming is the text loop's (tested in test_train.py); what is the series task's own is the
    model it checkpoints and reads back."""
    run_dir, _ = sine_run
    run = json.loads((run_dir / "run.json").read_text())["train"]
    assert (run["task"], run["cell"], run["hidden"], run["lr"], run["seq"]) == ("series", "rnn", 32, 0.01, 20)
    assert RunFolder(str(run_dir)).latest_checkpoint_step(TRAINER_STATE) == 800
    checkpoint = run_dir / "ray" / "checkpoint-000000800"
    job = {"model": load_series_model(checkpoint / "model")[1].to_json(),
           "series": load_series_model(checkpoint / "model")[2]}
    task = SeriesTask(job)
    restored = task.build()
    restored.load_state_dict(task.load_state(checkpoint / "model"))
    saved, _, _, _ = load_series_model(checkpoint / "model")
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), saved.state_dict().values()))


def test_series_task_needs_a_prepared_series_dataset(sine_dataset, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a series\n")
    with pytest.raises(TrainingError, match="prepare-series"):
        train([str(text)], str(tmp_path / "a"), {"task": "series", "max_steps": 1}, log=lambda m: None)
    with pytest.raises(CorpusError, match="series"):
        train([sine_dataset], str(tmp_path / "b"), {"max_steps": 1}, log=lambda m: None)  # a text run on it
