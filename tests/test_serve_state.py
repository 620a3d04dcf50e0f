"""Stateful serving over HTTP (docs/contracts.md, section 3.1): the prefix-state cache, sessions
(continue, export and import, errors), and log-probabilities with the real `openai` client, on a
tiny trained model served on loopback."""
import json
from pathlib import Path

import pytest
import requests

from deploy.state_cache import Context
from deploy.state_format import encode_state
from models import load_model
from conftest import free_port
from serving import DECODER, LIMITS, post, sse, train_story_model

pytestmark = pytest.mark.slow

A, B, C = "The cat saw a dog. ", "My friend ", "Anna "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_story_model(tmp_path_factory.mktemp("serve-state"))


@pytest.fixture(scope="module")
def server(ray_local, run_dir):
    from ray import serve

    from deploy.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(str(run_dir), limits=LIMITS, decoder=DECODER), name="charrnn", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def generate(server, prime, **kw):
    r = post(server, "/v1/generate", {"prime": prime, "max_chars": 40, "seed": 3, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def new_session(server, prime=A) -> str:
    r = post(server, "/v1/sessions", {"prime": prime})
    assert r.status_code == 200, r.text
    assert r.json()["length"] == len(prime) and r.json()["object"] == "session"
    return r.json()["session"]


def stats(server) -> dict:
    return requests.get(server + "/v1/stats", timeout=30).json()["decoder"]


def test_a_shared_preamble_is_read_once_and_the_text_does_not_change(server):
    preamble = "A dog saw the cat. " * 12
    before = stats(server)
    texts = [generate(server, preamble + tail, seed=5)["text"] for tail in ("My ", "Anna ", "My ", "The ")]
    after = stats(server)
    assert after["state_cache"]["hits"] - before["state_cache"]["hits"] >= 2
    # the first request reads the whole prime; the others at most the tail and the last 256 characters
    assert after["prime_chars"] - before["prime_chars"] <= len(preamble) + 2 * 256 + 20
    assert texts[0] == texts[2] and texts[0] != texts[1]


def test_a_session_continues_exactly_where_one_long_prime_would(server):
    sid = new_session(server)
    first = generate(server, B, session=sid)  # the session now holds A + B + the text
    assert first["text"] == generate(server, A + B)["text"]
    assert first["session"]["length"] == len(A + B) + len(first["text"])
    second = generate(server, C, session=sid, seed=4)
    assert second["text"] == generate(server, A + B + first["text"] + C, seed=4)["text"]
    branch = generate(server, "", session=sid, seed=9, session_append="none")  # nothing new, nothing kept
    assert branch["session"]["length"] == second["session"]["length"]
    info = requests.get(f"{server}/v1/sessions/{sid}", timeout=30).json()
    assert info["length"] == len(A + B + first["text"] + C + second["text"]) and not info["in_use"]

    # exported and imported: a new session in the same place
    state = requests.get(f"{server}/v1/sessions/{sid}/state", timeout=30)
    assert state.status_code == 200 and state.headers["content-type"] == "application/octet-stream"
    copy = post(server, "/v1/sessions", state.content, headers={"Content-Type": "application/octet-stream"})
    assert copy.status_code == 200, copy.text
    twin = copy.json()["session"]
    assert twin != sid and copy.json()["length"] == info["length"]
    assert generate(server, C, session=twin, seed=11)["text"] == generate(server, C, session=sid, seed=11)["text"]

    assert requests.delete(f"{server}/v1/sessions/{sid}", timeout=30).json()["deleted"] is True
    gone = generate_status(server, session=sid)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "session"


def generate_status(server, **body) -> requests.Response:
    return post(server, "/v1/generate", {"prime": "x", "max_chars": 5, **body})


def test_completions_continue_a_session_and_streams_save_it_at_the_end(server):
    sid = new_session(server)
    r = post(server, "/v1/completions", {"prompt": B, "max_tokens": 30, "seed": 2, "session": sid})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text == generate(server, A + B, max_chars=30, seed=2)["text"]
    with post(server, "/v1/generate", {"prime": C, "max_chars": 30, "seed": 6, "session": sid, "stream": True},
              stream=True) as streamed:
        events = sse(streamed)
    assert events[-1]["session"]["length"] == len(A + B + text + C) + events[-1]["chars"]
    assert "".join(e["text"] for e in events) == generate(server, A + B + text + C, max_chars=30, seed=6)["text"]


def test_a_session_is_one_request_at_a_time(server):
    sid = new_session(server)
    body = {"prime": B, "max_chars": 400, "seed": 1, "session": sid, "stream": True}
    with post(server, "/v1/generate", body, stream=True) as busy:
        lines = busy.iter_lines()
        next(line for line in lines if line.startswith(b"data:"))  # it holds the session now
        clash = generate_status(server, session=sid)
        assert clash.status_code == 409 and clash.headers["Retry-After"] == "1", clash.text
        assert clash.json()["error"]["type"] == "invalid_request_error"
        for _ in lines:
            pass
    assert generate_status(server, session=sid).status_code == 200


def test_a_foreign_or_broken_state_is_refused(server, run_dir):
    model, _, _, _ = load_model(run_dir / "model")
    state = model.init_state(1)
    logits = model.head.bias[None].detach()
    foreign = encode_state(Context(state, logits), model, "0" * 64, 5)
    for data, status, words in ((foreign, 422, "another model"), (b"\x00" * 12, 400, "not a safetensors"),
                                (json.dumps({"prime": "x"}).encode(), 400, "safetensors")):
        r = post(server, "/v1/sessions", data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    for body, status, param in (({"session": "nope"}, 404, "session"), ({"session": 5}, 400, "session"),
                                ({"session_append": "all"}, 422, "session_append"),
                                ({"session": "nope", "session_append": "some"}, 422, "session_append")):
        r = generate_status(server, **body)
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_log_probabilities_with_the_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    prompt = "The cat "
    out = client.completions.create(model="run", prompt=prompt, max_tokens=30, seed=1, logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 30
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(t) <= 4 for t in lp.top_logprobs)
    assert all(tok in top and max(top.values()) >= top[tok] for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset == list(range(30))
    assert choice.text == generate(server, prompt, max_chars=30, seed=1)["text"]  # logprobs change nothing

    echoed = client.completions.create(model="run", prompt=prompt, max_tokens=30, seed=1, logprobs=0, echo=True)
    e = echoed.choices[0].logprobs
    assert "".join(e.tokens) == prompt + choice.text and e.token_logprobs[0] is None and e.top_logprobs[0] is None
    assert e.token_logprobs[len(prompt):] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert e.text_offset == list(range(len(prompt) + 30))
    # what evaluation harnesses do: the prompt's log-probabilities are /v1/score's surprisal, negated
    scored = post(server, "/v1/score", {"text": prompt + choice.text, "per_char": True}).json()
    assert scored["tokens"] == e.tokens and scored["surprisal"][0] is None
    assert [-s for s in scored["surprisal"][1:]] == pytest.approx(e.token_logprobs[1:], abs=1e-4)
    assert sum(scored["surprisal"][1:]) / scored["chars"] == pytest.approx(scored["loss"], rel=1e-5)

    chunks = list(client.completions.create(model="run", prompt=prompt, max_tokens=30, seed=1, logprobs=2,
                                            stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert "".join(tokens) == choice.text and offsets == list(range(30))


def test_the_python_client_drives_sessions(server):
    from deploy.client import CharRNNClient, ServerError

    client = CharRNNClient(server)
    sid = client.create_session(A)
    out = client.generate(B, max_chars=30, seed=8, session=sid, session_append="input")
    assert out["session"]["length"] == len(A + B) == client.session_info(sid)["length"]
    twin = client.import_state(client.export_state(sid))
    assert client.generate("", max_chars=30, seed=8, session=twin)["text"] == \
        client.generate(A + B, max_chars=30, seed=8)["text"]
    assert "".join(client.stream(C, max_chars=20, seed=1, session=sid)) == \
        client.generate(A + B + C, max_chars=20, seed=1)["text"]
    assert client.last["session"]["length"] == len(A + B + C) + 20
    client.delete_session(sid)
    with pytest.raises(ServerError) as err:
        client.session_info(sid)
    assert err.value.status == 404
    assert client.score("The cat", per_char=True)["surprisal"][0] is None
