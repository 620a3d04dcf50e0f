"""deploy/series_app.py: time-series models on Ray Serve (loopback, a free port). POST /v1/forecast
against models.forecast and the true sine, validation, batching, overload, the config file's
dispatch to the series application, the Python client and `charrnn serve`'s limits.

The models are tiny RNNs trained here on a sine in a plain loop (about a second each, no Ray Train)."""
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

from conftest import REPO, free_port
from deploy.client import CharRNNClient, ServerError
from models import Normalization, SeriesConfig, SeriesRNN, forecast, load_series_model, save_series_model

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier

FREQ = 0.3  # radians per point: about 21 points a period, enough for a 32-unit RNN to learn in 300 steps
LIMITS = dict(max_history=500, max_forecast_steps=60, max_body_bytes=16384, max_concurrent=32, max_queued=64)


def wave(t: np.ndarray, features: int = 1) -> np.ndarray:
    """[len(t), features] in data units: 3 + 2 sin(FREQ t), then -1 + 0.5 cos(FREQ t)."""
    return np.stack([3 + 2 * np.sin(FREQ * t), -1 + 0.5 * np.cos(FREQ * t)][:features], axis=-1)


def train_sine_model(folder: Path, features: int) -> Path:
    """A 1x32 RNN trained on the wave with teacher forcing, saved as a series model folder."""
    values = wave(np.arange(2000.0), features)
    mean, std = values.mean(0), values.std(0)
    x = torch.from_numpy(((values - mean) / std).astype(np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine are far slower than one
    try:
        torch.manual_seed(0)
        config = SeriesConfig(features=features, hidden=32)
        model = SeriesRNN(config)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            starts = torch.randint(len(x) - 41, (16,), generator=g)
            batch = torch.stack([x[s : s + 41] for s in starts])
            predicted, _ = model(batch[:, :-1])
            # The first points of a window, predicted from almost no context, only add noise.
            loss = torch.nn.functional.mse_loss(predicted[:, 10:], batch[:, 11:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 1e-3, loss.item()
    columns = ["sin", "cos"][:features]
    save_series_model(model, config, {"columns": columns, "mean": mean.tolist(), "std": std.tolist()},
                      folder / "model", info={"step": 300})
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("series")
    return {1: train_sine_model(tmp / "sine", 1), 2: train_sine_model(tmp / "pair", 2)}


def local_forecast(run: Path, history, steps: int) -> np.ndarray:
    model, _, series, _ = load_series_model(run / "model")
    history = np.asarray(history, np.float64).reshape(len(history), model.config.features)
    return forecast(model, Normalization(series["mean"], series["std"]), [history], [steps])[0]


@pytest.fixture(scope="module")
def server(ray_local, runs):
    """The 1-feature model at / (build_series_app, LIMITS), and the 2-feature one at /tight through
    deploy/serve_config.yaml's deploy.app:app_builder (from a file:// URI), taking one request at a
    time and queueing none."""
    from ray import serve

    from deploy.app import app_builder
    from deploy.series_app import build_series_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_series_app(str(runs[1]), limits=LIMITS), name="series", route_prefix="/")
        config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
        [app] = config["applications"]
        # The file's text limits are at their defaults, so a series model takes them too.
        args = dict(app["args"], model=f"file://{runs[2]}", name="tight", max_concurrent=1, max_queued=0)
        serve.run(app_builder(args), name="tight", route_prefix="/tight")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def post(url, path, body, headers=None, **kw) -> requests.Response:
    """`body` (an object, or raw JSON text) sent as a JSON client sends it."""
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(url + path, data=data, headers=headers, timeout=120, **kw)


def test_forecast_tracks_the_sine_and_matches_models_forecast(server, runs):
    t = np.arange(1000.0, 1050.0)
    history = wave(t)[:, 0].tolist()
    one = post(server, "/v1/forecast", {"history": history})
    assert one.status_code == 200, one.text
    assert one.json()["steps"] == 1 and one.json()["model"] == "sine" and len(one.json()["forecast"]) == 1
    many = post(server, "/v1/forecast", {"history": history, "steps": 50}).json()
    assert set(many) == {"forecast", "steps", "model"} and many["steps"] == 50
    got = np.array(many["forecast"])
    assert got.shape == (50,) and isinstance(many["forecast"][0], float)
    np.testing.assert_allclose(got, local_forecast(runs[1], history, 50)[:, 0], atol=1e-5)
    assert one.json()["forecast"][0] == pytest.approx(got[0], abs=1e-5)
    true = wave(np.arange(1050.0, 1100.0))[:, 0]
    assert abs(got[0] - true[0]) < 0.05 and np.abs(got - true).max() < 0.15  # the amplitude is 2
    # One feature may also come as arrays of one number: the forecast comes back the same way.
    nested = post(server, "/v1/forecast", {"history": [[v] for v in history], "steps": 3}).json()["forecast"]
    assert [len(p) for p in nested] == [1, 1, 1] and np.allclose(np.ravel(nested), got[:3], atol=1e-5)


def test_two_features_through_the_config_file_and_the_client(server, runs):
    history = wave(np.arange(500.0, 540.0), 2)
    client = CharRNNClient(server + "/tight")
    out = client.forecast(history, steps=30)  # a numpy array goes as lists
    got = np.array(out["forecast"])
    assert out["model"] == "tight" and got.shape == (30, 2)
    np.testing.assert_allclose(got, local_forecast(runs[2], history, 30), atol=1e-5)
    assert np.abs(got - wave(np.arange(540.0, 570.0), 2)).max() < 0.15
    assert client.models() == ["tight"] and client.health()["status"] == "ok"
    with pytest.raises(ServerError) as err:
        client.forecast(history[:, 0], steps=2)
    assert err.value.status == 422 and err.value.param == "history" and "needs 2" in err.value.message


BIG_INT = "1" + "0" * 400  # an integer JSON allows and no float holds
BAD = [
    ("not json", 400, None, "not valid JSON"),
    ('{"history": [1, NaN]}', 400, None, "not valid JSON"),
    ("[1, 2]", 400, None, "JSON object"),
    ("{}", 400, "history", "required"),
    ('{"history": null}', 400, "history", "required"),
    ('{"history": "1, 2"}', 400, "history", "must be an array"),
    ('{"history": [1, "2"]}', 400, "history", "numbers"),
    ('{"history": [1, true]}', 400, "history", "numbers"),
    ('{"history": [[1], 2]}', 400, "history", "numbers"),
    ('{"history": [[1, 2], [3]]}', 400, "history", "equal-length"),
    ('{"history": [[1, null]]}', 400, "history", "numbers"),
    ('{"history": []}', 422, "history", "empty"),
    (json.dumps({"history": [0.5] * 501}), 422, "history", "limit is 500"),
    ('{"history": [[1, 2], [3, 4]]}', 422, "history", "needs 1"),
    ('{"history": [1e400]}', 422, "history", "too large"),
    ('{"history": [%s]}' % BIG_INT, 422, "history", "too large"),
    ('{"history": [1], "steps": 0}', 422, "steps", "[1, 60]"),
    ('{"history": [1], "steps": 61}', 422, "steps", "[1, 60]"),
    ('{"history": [1], "steps": 1.5}', 400, "steps", "integer"),
    ('{"history": [1], "steps": true}', 400, "steps", "integer"),
    ('{"history": [1], "steps": "3"}', 400, "steps", "integer"),
    ('{"history": [1], "colour": "red"}', 400, "colour", "unrecognized"),
]


@pytest.mark.parametrize("body, status, param, words", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_input(server, body, status, param, words):
    response = post(server, "/v1/forecast", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param"}
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize("path, history", [("", [1e300]), ("", [-1.7e308, 1e-320, 0]),
                                           ("/tight", [[1e300, -1e300]]), ("/tight", [[3e38, -3e38], [1, 1]])])
def test_extreme_values_are_forecast_or_refused_never_a_500(server, path, history):
    response = post(server + path, "/v1/forecast", {"history": history, "steps": 5})
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert response.json()["error"]["param"] == "history"
    else:
        assert np.isfinite(response.json()["forecast"]).all()


def test_body_limit_routes_and_methods(server):
    big = post(server, "/v1/forecast", {"history": [0.123456789] * 1500})
    assert big.status_code == 413 and "16384 bytes" in big.json()["error"]["message"]
    for path in ("/v1/generate", "/v1/completions", "/v1/score"):  # a series model has no text routes
        missing = post(server, path, {"prime": "The"})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error", path
    assert requests.get(server + "/v1/stats", timeout=30).status_code == 404
    wrong = requests.get(server + "/v1/forecast", timeout=30)
    assert wrong.status_code == 405 and "GET" in wrong.json()["error"]["message"]
    models = requests.get(server + "/v1/models", timeout=30).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["sine"]
    assert models["data"][0]["owned_by"] == "charrnn"
    health = requests.get(server + "/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == "sine"
    assert set(health["stats"]) >= {"forecasts", "batches", "max_batch_seen", "mean_batch", "batch_histogram"}


def test_32_concurrent_requests_are_batched(server, runs):
    before = requests.get(server + "/healthz", timeout=30).json()["stats"]

    def client(i):
        history = wave(np.arange(100.0 + i, 120.0 + 2 * i))[:, 0].tolist()
        response = post(server, "/v1/forecast", {"history": history, "steps": 1 + i})
        return history, response.status_code, response.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, range(32)))
    assert [status for _, status, _ in results] == [200] * 32, [r for r in results if r[1] != 200][:2]
    for i, (history, _, out) in enumerate(results):  # each as if it had been alone
        np.testing.assert_allclose(out["forecast"], local_forecast(runs[1], history, 1 + i)[:, 0], atol=1e-5)

    after = requests.get(server + "/healthz", timeout=30).json()["stats"]
    batched = {int(size): n - before["batch_histogram"].get(size, 0) for size, n in after["batch_histogram"].items()}
    assert after["forecasts"] - before["forecasts"] == 32
    assert max(size for size, n in batched.items() if n > 0) > 1, batched


def test_overload_is_429_with_retry_after(server):
    """The tight app forecasts one request at a time and queues none: long requests sent together
    are refused but for the one it is working on."""
    body = json.dumps({"history": wave(np.arange(10000.0), 2).round(4).tolist(), "steps": 1000})
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(server + "/tight", "/v1/forecast", body), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and statuses[0] == 200 and statuses[-1] == 429, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "overloaded_error" and "retry" in error["message"]
    assert post(server + "/tight", "/v1/forecast", {"history": [[3, -1]]}).status_code == 200  # free again


def test_serve_cli_limits_follow_the_model(runs, capsys):
    """`charrnn serve` reads the folder's task first: the other task's limits are refused (before any Ray)."""
    from charrnn.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(runs[1]), "--max-chars", "10"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code != 0 and len(err.splitlines()) == 1
    assert "max_chars applies to text models only; this is a series model" in err
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(runs[1]), "--max-history", "0"])
    assert "max_history must be an integer >= 1" in capsys.readouterr().err
