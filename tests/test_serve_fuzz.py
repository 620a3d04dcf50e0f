"""The HTTP API under generated input: whatever the body, the answer is a 2xx or a 4xx (errors in
the JSON envelope), the replica stays up, and no sequence is left decoding or waiting."""
import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import free_port
from models import CharRNN, ModelConfig, save_model

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier

EXAMPLES = 1200
LIMITS = dict(max_prime_chars=64, max_chars=40, max_n=3, max_score_chars=256, max_body_bytes=4096,
              max_concurrent=8, max_queued=8)
ROUTES = ["/v1/generate", "/v1/completions", "/v1/score", "/v1/models", "/v1/stats", "/healthz", "/v1/nope"]
FIELDS = ["prime", "prompt", "text", "max_chars", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
          "stream", "n", "echo", "model", "logprobs", "stream_options", "user", "suffix"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 50),
                    st.floats(allow_nan=False), st.floats(0, 2), st.text(max_size=80), st.sampled_from(["The ", "m"]))
json_values = st.recursive(scalars, lambda inner: (st.lists(inner, max_size=4)
                                                   | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
def _mostly(valid, other=json_values):
    return st.one_of(valid, valid, valid, other)


texts = st.text(min_size=1, max_size=70)
sampling = dict(temperature=_mostly(st.floats(0, 3)), top_k=_mostly(st.integers(-1, 20)),
                top_p=_mostly(st.floats(0, 1.2)),
                seed=_mostly(st.integers(-2**64, 2**64)), stop=_mostly(st.lists(st.text(max_size=5), max_size=5)),
                stream=_mostly(st.booleans()))
plausible = st.one_of(  # (route, body) near what each route accepts, so that many reach the decoder
    st.tuples(st.just("/v1/generate"), st.fixed_dictionaries(
        {"prime": _mostly(texts)}, optional={"max_chars": _mostly(st.integers(-2, 45)), **sampling})),
    st.tuples(st.just("/v1/completions"), st.fixed_dictionaries(
        {"prompt": _mostly(texts | st.lists(texts, max_size=3))},
        optional={"max_tokens": _mostly(st.integers(-2, 45)), "n": _mostly(st.integers(0, 4)),
                  "echo": _mostly(st.booleans()), "logprobs": _mostly(st.none() | st.integers(0, 5)),
                  "model": _mostly(st.sampled_from(["fuzz", "other"])), **sampling})),
    st.tuples(st.just("/v1/score"), st.fixed_dictionaries({"text": _mostly(st.text(max_size=300))})),
).map(lambda pair: (pair[0], json.dumps(pair[1])))
anything = st.tuples(st.sampled_from(ROUTES), st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=7).map(json.dumps),  # near the schema
    json_values.map(json.dumps),  # any JSON
    st.binary(max_size=300),  # not JSON, not UTF-8
    st.text(max_size=300),
))


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from deploy.app import build_app

    folder = tmp_path_factory.mktemp("fuzz") / "model"
    config = ModelConfig(vocab_size=12, layers=1, hidden=16)
    save_model(CharRNN(config), config, {"chars": "\n Tabehmnrt", "unknown_id": 11}, folder)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(str(folder), name="fuzz", limits=LIMITS), name="fuzz", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def test_generated_requests_get_2xx_or_4xx_and_leave_the_replica_up_and_idle(server, session):
    counted = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(request=plausible | anything, method=st.sampled_from(["POST", "POST", "POST", "GET"]),
           content_type=st.sampled_from(["application/json", "application/json", "application/json; charset=utf-8",
                                         "text/plain", None]))
    def one_request(request, method, content_type):
        route, body = request
        headers = {"Content-Type": content_type} if content_type else {}
        response = session.request(method, server + route, data=body, headers=headers, timeout=120)
        counted.append(response.status_code)
        assert 200 <= response.status_code < 300 or 400 <= response.status_code < 500, (route, body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param"} and error["message"], response.text
        elif response.headers.get("content-type", "").startswith("text/event-stream"):
            assert '"error"' not in response.text, response.text  # a stream that failed after its 200
        else:
            response.json()

    one_request()
    assert len(counted) >= 1000
    assert session.get(server + "/healthz", timeout=60).status_code == 200
    decoder = session.get(server + "/v1/stats", timeout=60).json()["decoder"]
    assert decoder["active"] == 0 and decoder["waiting"] == 0, decoder
    assert decoder["sequences"] > 20, decoder  # the fuzz reached the decoder, not only the parsers
