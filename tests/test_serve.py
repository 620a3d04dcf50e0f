"""deploy/: the continuous-batching decoder, the HTTP API on Ray Serve (loopback, a free port), the
OpenAI client against it, the Python client and the `charrnn serve` / `charrnn query` commands.

The model is a tiny LSTM trained here in a plain loop for a few seconds (no Ray Train)."""
import asyncio
import dataclasses
import json
import math
import re
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
import yaml

from conftest import REPO, alive, descendants, error_line, free_port, needs_bf16, run_cli
from deploy.decoder import Decoder, Sampling, Sequence
from deploy.limits import Limits
from deploy.padded_step import padded_step
from models import CharRNN, ModelConfig, load_model, score
from pipeline.text.vocab import Vocabulary
from serving import DECODER, LIMITS, PRIME, post, sse, start_serve, train_story_model

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier

def outside_ip() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def refuses(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=2).close()
        return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_story_model(tmp_path_factory.mktemp("serve"))


# -- the decoder alone (no Ray) --------------------------------------------------------------------

def _decode_all(decoder: Decoder, requests_: list[tuple[list[int], Sampling]]) -> list:
    async def go():
        seqs = [decoder.submit(p, s) for p, s in requests_]
        await asyncio.gather(*(s.done for s in seqs))
        return seqs
    return asyncio.run(go())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_decoder_rows_are_bit_identical_alone_or_in_a_batch(cell):
    """The padded batched step gives a row exactly what it gets alone: same logits, same state.
    (Unpadded, a batch of one takes another matrix kernel, whose rounding differs in the last bits.)"""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=60, hidden=128, layers=2, cell=cell)).eval()
    decoder = Decoder(model, [chr(65 + i) for i in range(60)], max_batch=32)
    try:
        ids = torch.randint(60, (20,))
        state = model.init_state(20)
        state = tuple(torch.randn_like(s) for s in state) if cell == "lstm" else torch.randn_like(state)
        parts = lambda s: s if isinstance(s, tuple) else (s,)
        pick = lambda s, rows: tuple(p[:, rows] for p in s) if cell == "lstm" else s[:, rows]
        with torch.inference_mode():
            crowd_logits, crowd_state = padded_step(model, ids, state, decoder.min_step_batch)
            for row in (0, 7, 19):
                alone_logits, alone_state = padded_step(model, ids[row:row + 1], pick(state, slice(row, row + 1)),
                                                       decoder.min_step_batch)
                assert torch.equal(alone_logits[0], crowd_logits[row])
                assert all(torch.equal(a[:, 0], c) for a, c in zip(parts(alone_state), parts(pick(crowd_state, row))))
    finally:
        decoder.close()


def test_decoder_cancel_frees_the_place(run_dir):
    model, _, vocab_json, _ = load_model(run_dir / "model")
    decoder = Decoder(model, list(Vocabulary.from_json(vocab_json).chars) + ["?"], max_batch=4)

    async def go():
        seq = decoder.submit([1, 2, 3], Sampling(max_chars=10**6, seed=1))
        while len(seq.chars) < 20:
            await asyncio.sleep(0.01)
        assert decoder.load == 1
        seq.cancel()
        await seq.done
        return seq
    try:
        seq = asyncio.run(go())
        assert seq.finish_reason == "cancelled" and decoder.load == 0 and decoder.stats()["active"] == 0
    finally:
        decoder.close()


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_decoder_same_seed_same_text_alone_or_in_a_crowd(run_dir, precision):
    model, _, vocab_json, _ = load_model(run_dir / "model")
    vocab = Vocabulary.from_json(vocab_json)
    decoder = Decoder(model, vocab.chars + ["\ufffd"], max_batch=32, precision=precision)
    try:
        prime = vocab.encode(PRIME).tolist()
        wanted = Sampling(max_chars=150, temperature=1.3, top_k=10, top_p=0.95, seed=42)
        [alone] = _decode_all(decoder, [(prime, wanted)])
        others = [(vocab.encode(p).tolist(), Sampling(max_chars=40 + 9 * i, temperature=0.5 + i / 8, seed=i,
                                                       top_k=None if i % 2 else 3))
                  for i, p in enumerate(["A dog", "Anna ", "My friend", "The"] * 4)]
        crowd = _decode_all(decoder, others[:8] + [(prime, wanted)] + others[8:])
        assert decoder.stats()["max_batch_seen"] > 8
        assert crowd[8].text == alone.text and len(alone.text) == 150 and alone.finish_reason == "length"
        assert len({s.text for s in crowd}) == 17
    finally:
        decoder.close()


def _stream(decoder, prime: list[int], sampling: Sampling):
    """One streamed sequence: (the sequence, its chunks as they came)."""
    async def go():
        sink = asyncio.Queue()
        seq = decoder.submit(prime, sampling, sink)
        chunks = []
        while (item := await sink.get())[1] is not None:
            chunks.append(item[1])
        return seq, chunks
    return asyncio.run(go())


def test_decoder_stop_strings_and_streamed_chunks(run_dir):
    model, _, vocab_json, _ = load_model(run_dir / "model")
    vocab = Vocabulary.from_json(vocab_json)
    decoder = Decoder(model, vocab.chars + ["\ufffd"], max_batch=8, flush_chars=3)

    try:
        seq, chunks = _stream(decoder, vocab.encode("Anna").tolist(),
                              Sampling(max_chars=300, seed=5, stop=("sister", ".")))
        assert seq.finish_reason == "stop" and "." not in seq.text and "sister" not in seq.text
        assert "".join(chunks) == seq.text and len(chunks) > 1
        [free] = _decode_all(decoder, [(vocab.encode("Anna").tolist(), Sampling(max_chars=300, seed=5))])
        cut = min(i for i in (free.text.find("sister"), free.text.find(".")) if i >= 0)
        assert free.text[:cut] == seq.text  # the stop string only cuts: the text before it is the same
    finally:
        decoder.close()


def test_overlapping_stop_strings_cut_before_the_earliest_start():
    loop = asyncio.new_event_loop()
    try:
        seq = Sequence([1], Sampling(max_chars=10, stop=("b", "ab")), "cpu", loop, None, 0)
        assert [seq._push(c) for c in "xab"] == [False, False, True]
        assert seq.text == "x" and seq.finish_reason == "stop"
    finally:
        loop.close()


def test_decoder_streams_the_first_character_at_once(run_dir):
    """The first chunk goes out after one step, whatever the chunk size and interval; with both out
    of reach the rest comes in one chunk at the end."""
    model, _, vocab_json, _ = load_model(run_dir / "model")
    vocab = Vocabulary.from_json(vocab_json)
    decoder = Decoder(model, vocab.chars + ["\ufffd"], max_batch=8, flush_chars=10_000, flush_interval_s=3600)

    try:
        seq, chunks = _stream(decoder, vocab.encode("Anna").tolist(), Sampling(max_chars=200, seed=5))
        assert [len(c) for c in chunks] == [1, 199] and "".join(chunks) == seq.text
    finally:
        decoder.close()



def test_decoder_survives_a_failing_step(run_dir, monkeypatch):
    """A bug in a step fails the sequences of that batch, frees their places and keeps decoding. A
    sequence that finished sampling in that very step still gets its text."""
    import deploy.decoder

    model, _, vocab_json, _ = load_model(run_dir / "model")
    decoder = Decoder(model, list(Vocabulary.from_json(vocab_json).chars) + ["?"], max_batch=4)
    widths, failed = [], []

    def broken_once(model, ids, state, min_rows, precision):
        widths.append(len(ids))
        if widths[-2:] == [2, 1] and not failed:  # the step in which the short sequence finished
            failed.append(True)
            raise RuntimeError("boom")
        return padded_step(model, ids, state, min_rows, precision)
    monkeypatch.setattr(deploy.decoder, "padded_step", broken_once)

    async def go():
        short = decoder.submit([1, 2], Sampling(max_chars=30, seed=0))
        long = decoder.submit([1, 2], Sampling(max_chars=300, seed=1))
        results = await asyncio.wait_for(asyncio.gather(short.done, long.done, return_exceptions=True), 120)
        assert decoder.load == 0
        later = decoder.submit([1, 2], Sampling(max_chars=50, seed=0))
        await later.done
        return results, later
    try:
        (short, long), later = asyncio.run(go())
        assert str(long) == "boom" and failed
        assert short.finish_reason == "length" and len(short.text) == 30
        assert len(later.text) == 50
        decoder.raise_if_stopped()
    finally:
        decoder.close()


def _decoder(run_dir, **kw) -> Decoder:
    model, _, vocab_json, _ = load_model(run_dir / "model")
    return Decoder(model, list(Vocabulary.from_json(vocab_json).chars) + ["?"], **{"max_batch": 8, **kw})


def test_a_short_prime_is_not_kept_waiting_behind_long_scores(run_dir):
    """Chunked prefill: a one-character generate submitted after six long scores gets its text
    while they are still being scored, and a stream already decoding keeps decoding meanwhile."""
    decoder = _decoder(run_dir)
    text = [1, 2, 3, 4, 5, 6, 7] * 3000

    async def go():
        stream = decoder.submit([1, 2], Sampling(max_chars=300, seed=0))
        scores = [asyncio.ensure_future(decoder.score(text)) for _ in range(6)]
        await asyncio.sleep(0)
        short = decoder.submit([3], Sampling(max_chars=1, seed=0))
        await short.done
        assert not any(s.done() for s in scores)  # the short one did not wait for a whole score
        await stream.done
        assert not all(s.done() for s in scores)  # nor did the stream wait for all of them
        results = await asyncio.gather(*scores)
        assert decoder.queued_chars == 0 and decoder.load == 0
        return results

    try:
        results = asyncio.run(go())
        model, _, _, _ = load_model(run_dir / "model")
        total, count = score(model, text)
        # slicing keeps the sum
        assert all(r.count == count and r.total == pytest.approx(total, rel=1e-4) for r in results)
    finally:
        decoder.close()


def test_n_sequences_share_one_prime_and_a_cancelled_prime_never_runs(run_dir):
    """n samples of one prime, and requests with the same prime in flight together, prime once and
    fork the context; a fork samples what its own prime would. (Prefix cache off: every new prime runs.)"""
    decoder = _decoder(run_dir, state_cache_bytes=0)
    prime = [1, 2, 3, 4, 5] * 40

    async def go():
        samplings = [Sampling(max_chars=40, seed=s) for s in (5, 6, 7)]
        forked = decoder.submit_group(prime, samplings)
        await asyncio.gather(*(s.done for s in forked))
        primed_once = decoder.stats()["prime_chars"]
        twins = [decoder.submit(prime, s) for s in samplings]  # three requests, one prime in flight
        await asyncio.gather(*(s.done for s in twins))
        primed_twice = decoder.stats()["prime_chars"]
        alone = []
        for s in samplings:  # one after another: each runs its prime
            alone.append(decoder.submit(prime, s))
            await alone[-1].done
        gone = decoder.submit(prime, Sampling(max_chars=40, seed=1))
        gone.cancel()  # the client left before the decoder took the prime up
        await gone.done
        return forked, twins, alone, primed_once, primed_twice, gone

    try:
        forked, twins, alone, primed_once, primed_twice, gone = asyncio.run(go())
        assert primed_once == len(prime) and primed_twice == 2 * len(prime)
        assert [s.text for s in forked] == [s.text for s in twins] == [s.text for s in alone]
        assert gone.finish_reason == "cancelled" and gone.text == ""
        assert decoder.stats()["prime_chars"] == 5 * len(prime)  # the cancelled prime never ran
    finally:
        decoder.close()


def test_a_dead_decode_loop_fails_its_requests_and_the_health_check(run_dir):
    """A bug outside the step (here in handing out streamed text) ends the decode loop: what it held
    fails at once instead of waiting forever, new work is refused, and check() (the replica's
    health check, and /healthz) says so, so Serve replaces the replica."""
    from deploy.decoder import DecoderStopped

    model, _, vocab_json, _ = load_model(run_dir / "model")
    decoder = Decoder(model, list(Vocabulary.from_json(vocab_json).chars) + ["?"], max_batch=8, min_step_batch=1)

    def broken_flush():
        raise ZeroDivisionError("injected")

    async def go():
        seq = decoder.submit([1, 2], Sampling(max_chars=500, seed=0), sink=asyncio.Queue())
        await asyncio.sleep(0)
        decoder._flush_streams = broken_flush  # the loop calls it after each step
        with pytest.raises(DecoderStopped, match="ZeroDivisionError"):
            await asyncio.wait_for(seq.done, 60)
        with pytest.raises(DecoderStopped):
            decoder.submit([1], Sampling(max_chars=5, seed=0))
        assert decoder.load == 0

    try:
        decoder.raise_if_stopped()
        asyncio.run(go())
        with pytest.raises(DecoderStopped, match="the decoder stopped"):
            decoder.raise_if_stopped()
    finally:
        decoder.close()


# -- the server --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(ray_local, run_dir):
    """The model served on 127.0.0.1 at a free port (app "charrnn" at /), plus a second, tight app
    built from deploy/serve_config.yaml's builder (one sequence at a time, no queue) at /tight."""
    from ray import serve

    from deploy.app import app_builder, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(str(run_dir), limits=LIMITS, decoder=DECODER), name="charrnn", route_prefix="/")
        config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
        args = dict(config["applications"][0]["args"], model=f"file://{run_dir}", name="tight", max_concurrent=1,
                    max_queued=0, max_n=1, autoscale="1:1")  # a URI, and an autoscaling config Serve accepts
        del args["replicas"]
        serve.run(app_builder(args), name="tight", route_prefix="/tight")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_serves_on_loopback_only(server):
    port = int(server.rsplit(":", 1)[1])
    assert requests.get(server + "/healthz", timeout=30).status_code == 200
    ip = outside_ip()
    if ip is not None:
        assert refuses(ip, port), f"the server answers on {ip}:{port}, not only on 127.0.0.1"


def test_health_models_and_stats(server):
    health = requests.get(server + "/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == "run" and health["stats"]["running"] in (True, False)
    models = requests.get(server + "/v1/models", timeout=30).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [("run", "model", "charrnn")]
    stats = requests.get(server + "/v1/stats", timeout=30).json()
    assert stats["limits"] == {**dataclasses.asdict(Limits()), **LIMITS}
    assert stats["network"]["hidden"] == 48 and stats["decoder"]["max_batch"] == 48


def test_generate_and_same_seed(server):
    body = {"prime": PRIME, "max_chars": 120, "temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 7}
    first = post(server, "/v1/generate", body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["chars"] == len(out["text"]) == 120 and out["finish_reason"] == "length" and out["seed"] == 7
    assert re.search(r"[a-z]+ [a-z]+", out["text"])  # the model learned words
    assert post(server, "/v1/generate", body).json()["text"] == out["text"]
    assert post(server, "/v1/generate", {**body, "seed": 8}).json()["text"] != out["text"]
    unseeded = post(server, "/v1/generate", {"prime": PRIME, "max_chars": 30}).json()
    assert isinstance(unseeded["seed"], int) and len(unseeded["text"]) == 30
    replay = post(server, "/v1/generate", {"prime": PRIME, "max_chars": 30, "seed": unseeded["seed"]}).json()
    assert replay["text"] == unseeded["text"]
    zero = post(server, "/v1/generate", {"prime": "x", "max_chars": 0, "seed": 0}).json()
    assert zero == {"text": "", "chars": 0, "finish_reason": "length", "seed": 0, "model": "run"}


def test_generate_with_stop_and_unknown_characters(server):
    out = post(server, "/v1/generate", {"prime": "Anna", "max_chars": 300, "seed": 3, "stop": ["."]}).json()
    assert out["finish_reason"] == "stop" and "." not in out["text"] and 0 < out["chars"] < 300
    # é, the snowman, a tab, a lone surrogate and CRLF are not in the vocabulary (or not characters)
    odd = post(server, "/v1/generate",
               '{"prime": "The caf\\u00e9 \\u2603\\t\\ud800\\r\\n", "max_chars": 20, "seed": 1}')
    assert odd.status_code == 200, odd.text
    assert odd.json()["chars"] == 20


def test_generate_stream(server):
    body = {"prime": PRIME, "max_chars": 150, "top_k": 5, "seed": 11}
    response = post(server, "/v1/generate", {**body, "stream": True}, stream=True)
    assert response.status_code == 200
    events = sse(response)
    *chunks, final = events
    assert len(chunks) > 1 and all(set(e) == {"text"} and e["text"] for e in chunks)
    assert final == {"text": "", "finish_reason": "length", "chars": 150, "seed": 11}
    assert "".join(e["text"] for e in chunks) == post(server, "/v1/generate", body).json()["text"]


def test_python_client(server):
    from deploy.client import CharRNNClient, ServerError

    client = CharRNNClient(server)
    assert client.health()["status"] == "ok" and client.models() == ["run"]
    text = client.generate(PRIME, max_chars=60, seed=2)["text"]
    assert "".join(client.stream(PRIME, max_chars=60, seed=2)) == text
    assert client.last["finish_reason"] == "length" and client.last["chars"] == 60
    assert client.completions(PRIME, max_tokens=60, seed=2)["choices"][0]["text"] == text
    assert client.score("The cat sees a bird.")["chars"] == 19
    with pytest.raises(ServerError) as err:
        client.generate(PRIME, temperature=0)
    assert err.value.status == 422 and err.value.param == "temperature" and "temperature" in err.value.message


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["run"]

    done = client.completions.create(model="run", prompt=PRIME, max_tokens=80, seed=5, temperature=0.9, top_p=0.95,
                                     extra_body={"top_k": 5})
    assert done.object == "text_completion" and done.model == "run"
    [choice] = done.choices
    assert choice.index == 0 and choice.finish_reason == "length" and len(choice.text) == 80
    assert done.usage.prompt_tokens == len(PRIME) and done.usage.completion_tokens == 80
    assert done.usage.total_tokens == len(PRIME) + 80
    same = post(server, "/v1/generate", {"prime": PRIME, "max_chars": 80, "seed": 5, "temperature": 0.9,
                                         "top_p": 0.95, "top_k": 5}).json()
    assert same["text"] == choice.text  # one engine behind both routes

    two = client.completions.create(model="run", prompt=PRIME, max_tokens=40, seed=5, n=2, temperature=0.9,
                                    top_p=0.95, stop=["."], extra_body={"top_k": 5})
    assert [c.index for c in two.choices] == [0, 1]
    assert choice.text.startswith(two.choices[0].text)  # seed, then seed + 1 for the second choice
    assert all("." not in c.text for c in two.choices)

    chunks = list(client.completions.create(model="run", prompt=PRIME, max_tokens=80, seed=5, temperature=0.9,
                                            top_p=0.95, stream=True, extra_body={"top_k": 5}))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2

    greedy = client.completions.create(model="run", prompt=PRIME, max_tokens=30, temperature=0)
    assert greedy.choices[0].text == client.completions.create(model="run", prompt=PRIME, max_tokens=30,
                                                               temperature=0).choices[0].text
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model="run", prompt=PRIME, max_tokens=10, top_p=1.5)
    assert err.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PRIME, max_tokens=10)


def test_completions_stream_raw_format(server):
    response = post(server, "/v1/completions", {"model": "run", "prompt": [PRIME, "Anna"], "max_tokens": 20,
                                                "stream": True, "stream_options": {"include_usage": True},
                                                "seed": 1, "echo": True})
    events = sse(response)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 40
    texts = {0: "", 1: ""}
    for e in events[:-2]:
        assert e["object"] == "text_completion" and e["model"] == "run"
        [c] = e["choices"]
        texts[c["index"]] += c["text"]
    assert texts[0].startswith(PRIME) and texts[1].startswith("Anna") and len(texts[1]) == 24


def test_score(server, run_dir):
    text = "The cat sees a bird. Anna waits for the train."
    out = post(server, "/v1/score", {"text": text}).json()
    model, _, vocab_json, _ = load_model(run_dir / "model")
    total, count = score(model, Vocabulary.from_json(vocab_json).encode(text).tolist())
    assert out["chars"] == count == len(text) - 1
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["bits_per_char"] == pytest.approx(out["loss"] / math.log(2))
    assert out["bits_per_char"] < 2.0  # far below uniform (log2 of ~30 = 4.9): the model learned the grammar


BAD = [  # (path, body, status, param, words in the message)
    ("/v1/generate", '{"prime": "The", ', 400, None, "not valid JSON"),
    ("/v1/generate", '["The"]', 400, None, "JSON object"),
    ("/v1/generate", '{"prime": "The", "temperature": NaN}', 400, None, "not valid JSON"),
    ("/v1/generate", '{"prime": 5}', 400, "prime", "must be a string"),
    ("/v1/generate", '{"prime": "The", "max_chars": "10"}', 400, "max_chars", "must be an integer"),
    ("/v1/generate", '{"prime": "The", "top_k": 2.5}', 400, "top_k", "must be an integer"),
    ("/v1/generate", '{"prime": "The", "stream": "yes"}', 400, "stream", "must be a boolean"),
    ("/v1/generate", '{"prime": "The", "seed": true}', 400, "seed", "must be an integer"),
    ("/v1/generate", '{"prime": "The", "max_tokens": 10}', 400, "max_tokens", "unrecognized"),
    ("/v1/generate", '{"max_chars": 10}', 400, "prime", "required"),
    ("/v1/generate", '{"prime": "The", "temperature": 0}', 422, "temperature", "0 < temperature"),
    ("/v1/generate", '{"prime": "The", "temperature": -1}', 422, "temperature", "0 < temperature"),
    ("/v1/generate", '{"prime": "The", "temperature": 1e999}', 422, "temperature", "temperature <="),
    ("/v1/generate", '{"prime": "The", "top_k": 0}', 422, "top_k", ">= 1"),
    ("/v1/generate", '{"prime": "The", "top_p": 1.5}', 422, "top_p", "(0, 1]"),
    ("/v1/generate", '{"prime": "The", "top_p": 0}', 422, "top_p", "(0, 1]"),
    ("/v1/generate", '{"prime": "The", "max_chars": 401}', 422, "max_chars", "[0, 400]"),
    ("/v1/generate", '{"prime": "The", "max_chars": -1}', 422, "max_chars", "[0, 400]"),
    ("/v1/generate", '{"prime": ""}', 422, "prime", "empty"),
    ("/v1/generate", json.dumps({"prime": "a" * 301}), 422, "prime", "limit is 300"),
    ("/v1/generate", '{"prime": "The", "seed": 99999999999999999999999}', 422, "seed", "64-bit"),
    ("/v1/generate", '{"prime": "The", "stop": [""]}', 422, "stop", "1 to 64"),
    ("/v1/generate", '{"prime": "The", "stop": 5}', 400, "stop", "string"),
    ("/v1/completions", '{"prompt": "The", "n": 5}', 422, "n", "[1, 4]"),
    ("/v1/completions", '{"prompt": ["The", "A", "B"], "n": 2}', 422, "n", "limit is 4"),
    ("/v1/completions", '{"prompt": "The", "max_tokens": 401}', 422, "max_tokens", "[0, 400]"),
    ("/v1/completions", '{"prompt": "The", "temperature": -0.5}', 422, "temperature", "0 <= temperature"),
    ("/v1/completions", '{"prompt": [1, 2, 3]}', 422, "prompt", "token ids"),
    ("/v1/completions", '{"prompt": "The", "logprobs": 6}', 422, "logprobs", "[0, 5]"),
    ("/v1/completions", '{"prompt": "The", "best_of": 2}', 422, "best_of", "not supported"),
    ("/v1/completions", '{"prompt": "The", "model": "other"}', 404, "model", "does not exist"),
    ("/v1/completions", '{"prompt": 5}', 400, "prompt", "must be a string"),
    ("/v1/score", '{"text": "a"}', 422, "text", "at least two"),
    ("/v1/score", json.dumps({"text": "ab" * 1001}), 422, "text", "limit is 2000"),
    ("/v1/score", '{"text": null}', 400, "text", "required"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD, ids=[f"{b[0]}:{b[1][:40]}" for b in BAD])
def test_bad_input(server, path, body, status, param, words):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param"}
    assert error["param"] == param and words in error["message"], error


def test_body_limit_unknown_route_and_method(server):
    big = post(server, "/v1/generate", json.dumps({"prime": "a", "pad": "x" * 9000}))
    assert big.status_code == 413 and "8192 bytes" in big.json()["error"]["message"]
    missing = requests.get(server + "/v2/nothing", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = requests.get(server + "/v1/generate", timeout=30)
    assert wrong.status_code == 405 and "GET" in wrong.json()["error"]["message"]
    assert requests.get(server + "/healthz", timeout=30).status_code == 200  # still serving


def test_only_json_bodies_are_read(server):
    """A web page can post text/plain, a form or multipart to 127.0.0.1 without a CORS preflight."""
    body = json.dumps({"prime": PRIME, "max_chars": 5, "seed": 1})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        for path in ("/v1/generate", "/v1/completions", "/v1/score"):
            r = requests.post(server + path, data=body, timeout=60,
                              headers={"Content-Type": content_type} if content_type else {})
            assert r.status_code == 415, (path, content_type, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
    ok = post(server, "/v1/generate", body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_overload_is_429_with_retry_after(server):
    """The tight app decodes one sequence and queues none: a second request while one streams is refused."""
    url = server + "/tight"
    # 2000 characters, the tight app's limit: 2000 decode steps, while the refusals take two round trips.
    with post(url, "/v1/generate", {"prime": PRIME, "max_chars": 2000, "stream": True, "seed": 1}, stream=True) as busy:
        assert busy.status_code == 200
        lines = busy.iter_lines()
        assert next(line for line in lines if line.startswith(b"data:"))  # decoding has started
        refused = post(url, "/v1/generate", {"prime": PRIME, "max_chars": 10})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "overloaded_error" and "retry" in error["message"]
        assert post(url, "/v1/score", {"text": "The cat"}).status_code == 429
    deadline = time.time() + 60  # the stream was dropped: its sequence leaves, the next request is served
    while (ok := post(url, "/v1/generate", {"prime": PRIME, "max_chars": 10})).status_code == 429:
        assert time.time() < deadline, "the dropped stream never released its place"
        time.sleep(0.2)
    assert ok.status_code == 200 and ok.json()["chars"] == 10


def test_32_concurrent_clients_are_batched_and_seeds_hold(server, ray_local):
    alone = post(server, "/v1/generate", {"prime": "Anna ", "max_chars": 200, "seed": 1234, "top_k": 8}).json()
    before = requests.get(server + "/v1/stats", timeout=30).json()["decoder"]

    def client(i):
        if i == 16:
            body = {"prime": "Anna ", "max_chars": 200, "seed": 1234, "top_k": 8}
        else:
            body = {"prime": PRIME if i % 2 else "A dog ", "max_chars": 150 + i, "seed": i, "temperature": 0.7 + i / 50}
        response = post(server, "/v1/generate", body)
        return response.status_code, response.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, range(32)))
    assert [status for status, _ in results] == [200] * 32, [r for r in results if r[0] != 200][:2]
    assert all(out["chars"] == 150 + i for i, (_, out) in enumerate(results) if i != 16)
    assert results[16][1]["text"] == alone["text"]  # same seed, same text, alone or in a crowd

    after = requests.get(server + "/v1/stats", timeout=30).json()["decoder"]
    batched = {int(size): n - before["batch_histogram"].get(size, 0) for size, n in after["batch_histogram"].items()}
    assert max(size for size, n in batched.items() if n > 0) > 8, batched
    assert after["sequences"] - before["sequences"] == 32

    # ... and the replica's log says so too
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.time() + 30
    while True:
        lines = [line for f in logs.glob("replica_charrnn_CharRNNServer_*.log")
                 for line in f.read_text(errors="replace").splitlines() if "charrnn decoder:" in line]
        biggest = max((int(m.group(1)) for m in (re.search(r"batch mean [\d.]+ max (\d+)", l) for l in lines) if m),
                      default=0)
        if biggest > 8 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert biggest > 8, lines[-5:]


def test_deployment_options_and_config_file(run_dir):
    from ray.serve.schema import ServeDeploySchema

    from deploy.app import app_builder, deployment_options

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    [app] = config.applications
    assert app.import_path == "deploy.app:app_builder" and set(app.args) >= {"model", "replicas", "max_concurrent"}
    with pytest.raises(ValueError, match="unknown application arguments: colour"):
        app_builder({"model": str(run_dir), "colour": "red"})
    app_builder({"model": str(run_dir), "replicas": "2", "gpu": "false",
                 "max_chars": "10"})  # `serve run` passes strings

    limits = Limits(max_concurrent=32, max_queued=100)
    fixed = deployment_options(limits, replicas=3)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] > 132 and fixed["backpressure_config"] == {"status_code": 429,
                                                                                    "retry_after_s": 1}
    scaled = deployment_options(limits, autoscale=(2, 5), gpu=True, num_cpus=2)
    assert scaled["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 5, "initial_replicas": 2,
                                            "target_ongoing_requests": 16}
    assert "num_replicas" not in scaled and scaled["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}


# -- the command line --------------------------------------------------------------------------------

def cli_error(capsys, *args) -> str:
    """`charrnn ARGS` in this process, for errors raised before any Ray or HTTP work: the one line."""
    from charrnn.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_query_cli(server, capsys):
    want = post(server, "/v1/generate", {"prime": PRIME, "max_chars": 50, "seed": 9, "top_k": 4}).json()["text"]
    args = ["query", "--url", server, "--prime", PRIME, "--max-chars", 50, "--seed", 9, "--top-k", 4]
    plain = run_cli(*args, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == PRIME + want + "\n"
    streamed = run_cli(*args, "--stream", timeout=120)
    assert streamed.returncode == 0 and streamed.stdout == PRIME + want + "\n"
    assert "HTTP 422 (temperature)" in cli_error(capsys, *args, "--temperature", 0)
    assert "cannot connect" in cli_error(capsys, "query", "--url", f"http://127.0.0.1:{free_port()}")


@pytest.mark.parametrize("args, words", [
    (["--model", "/no/such/run"], "does not exist"),
    (["--autoscale", "3:1"], "0 <= MIN <= MAX"),
    (["--autoscale", "two"], "MIN:MAX"),
    (["--max-n", "100"], "max_n"),
    (["--port", "70000"], "--port"),
])
def test_serve_cli_rejects_bad_options(run_dir, capsys, args, words):
    full = ["--model", run_dir, *args] if args[0] != "--model" else args
    assert words in cli_error(capsys, "serve", *full)


def test_serve_cli_refuses_a_taken_port_before_starting_ray(run_dir, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in cli_error(capsys, "serve", "--model", run_dir, "--port", port)


def test_serve_cli_end_to_end(run_dir):
    """`charrnn serve` in its own process (its own local Ray): answers, then stops cleanly on SIGTERM
    (what systemd, Docker and Kubernetes send), every process it started with it."""
    port = free_port()
    key = "s3cret-Key-0123"
    proc, out = start_serve("--model", run_dir, "--port", port, "--num-cpus", 1, "--max-chars", 100,
                            env={"CHARRNN_API_KEY": key})
    try:
        url = f"http://127.0.0.1:{port}"
        assert any(line.startswith("charrnn serve: serving") and f"at {url}" in line for line in out)
        assert "Authorization: Bearer $CHARRNN_API_KEY" in "".join(out)
        query = run_cli("query", "--url", url, "--prime", "Anna", "--max-chars", 30, "--seed", 1, "--api-key", key,
                        timeout=120)
        assert query.returncode == 0 and len(query.stdout) == len("Anna") + 30 + 1, query.stderr
        bearer = {"Authorization": f"Bearer {key}"}
        assert post(url, "/v1/generate", {"prime": "Anna", "max_chars": 101}, headers=bearer).status_code == 422
        # The key is asked on every /v1 route, before the body is read; /healthz stays open for probes.
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            for r in (post(url, "/v1/generate", {"prime": "Anna"}, headers=headers),
                      requests.get(url + "/v1/models", headers=headers, timeout=60),
                      requests.get(url + "/v1/stats", headers=headers, timeout=60)):
                assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.text
                assert r.json()["error"]["type"] == "authentication_error"
        assert requests.get(url + "/healthz", timeout=60).status_code == 200
        assert "HTTP 401" in error_line(run_cli("query", "--url", url, timeout=120))
        ip = outside_ip()
        if ip is not None:
            assert refuses(ip, port)
    finally:
        family = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(out[-30:])
    assert key not in "".join(out)
    assert refuses("127.0.0.1", port)
    assert len(family) > 5 and not [p for p in family if alive(*p)], "processes of charrnn serve outlived it"
