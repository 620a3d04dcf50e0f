"""What operators and people trying a model see of `charrnn serve`, run as a user runs it: its
Prometheus metrics, scraped over HTTP from Ray's metrics agent, and its playground page, driven in
the system's Chromium by Playwright."""
import re
import shutil
import signal
import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, free_port
from deploy.state_cache import Context
from deploy.state_format import encode_state
from models import load_model
from serving import LIMITS, PRIME, post, sse, start_serve, train_story_model

pytestmark = pytest.mark.slow  # starts `charrnn serve`, with its own local Ray
KEY = "playground-Key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_CHARS = 100_000  # a stream the playground can stop long before it ends, however fast the machine
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_story_model(tmp_path_factory.mktemp("operations"))


@pytest.fixture(scope="module")
def server(run_dir):
    """`charrnn serve` with an API key: (its URL, its metrics URL, the model's name)."""
    name, port = f"story-{uuid.uuid4().hex[:8]}", free_port()
    limits = [f"--{k.replace('_', '-')}={v}" for k, v in {**LIMITS, "max_sessions": 1, "max_chars": MAX_CHARS}.items()]
    proc, lines = start_serve("--model", run_dir, "--port", port, "--num-cpus", 2, "--name", name, *limits,
                              env={"CHARRNN_API_KEY": KEY})
    try:
        metrics_url = next(line for line in lines if line.startswith("  Prometheus metrics:")).split()[-1]
        yield f"http://127.0.0.1:{port}", metrics_url, name
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines[-30:])


def scrape(metrics_url: str, model: str) -> dict:
    """{(sample name, frozenset of its labels but Ray's and Serve's): value} of `model`'s series."""
    ours = {}
    for family in text_string_to_metric_families(requests.get(metrics_url, timeout=30).text):
        for sample in family.samples:
            if sample.name.startswith("ray_charrnn_") and sample.labels.get("model") == model:
                labels = {k: v for k, v in sample.labels.items()
                          if k not in {"model", "deployment", "replica", "application", "Component", "NodeAddress",
                                       "SessionName", "Version", "WorkerId"} and not k.startswith("otel_")}
                key = (sample.name[len("ray_"):], frozenset(labels.items()))
                ours[key] = ours.get(key, 0.0) + sample.value
    return ours


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def foreign_state(run_dir) -> bytes:
    """An exported state as another model's server would write it."""
    model = load_model(run_dir / "model")[0]
    return encode_state(Context(model.init_state(1), model.head.bias[None].detach()), model, "0" * 64, 5)


def test_metrics_count_what_was_sent(server, run_dir):
    url, metrics_url, model = server
    story = "The cat sat on the mat. The dog ran to the park. " * 10
    for _ in range(3):
        assert post(url, "/v1/generate", {"prime": PRIME, "max_chars": 50}, AUTH).status_code == 200
    stream = post(url, "/v1/generate", {"prime": PRIME, "max_chars": 50, "stream": True}, AUTH)
    assert sse(stream)[-1]["finish_reason"] == "length"
    scored = post(url, "/v1/score", {"text": story}, AUTH)
    assert scored.status_code == 200
    # Refusals: over a limit, a body over max_body_bytes, an unknown field, no key, an unknown
    # route, another model's state, a session beyond --max-sessions 1.
    assert post(url, "/v1/generate", {"prime": PRIME, "max_chars": MAX_CHARS + 1}, AUTH).status_code == 422
    assert post(url, "/v1/generate", {"prime": "x" * LIMITS["max_body_bytes"]}, AUTH).status_code == 413
    assert post(url, "/v1/generate", {"prime": PRIME, "colour": "red"}, AUTH).status_code == 400
    assert post(url, "/v1/generate", {"prime": PRIME}).status_code == 401
    assert requests.get(url + "/nowhere", timeout=60).status_code == 404
    octets = {**AUTH, "Content-Type": "application/octet-stream"}
    assert post(url, "/v1/sessions", foreign_state(run_dir), octets).status_code == 422
    session = post(url, "/v1/sessions", {"prime": PRIME}, AUTH).json()["session"]
    assert requests.get(f"{url}/v1/sessions/{session}", headers=AUTH, timeout=60).status_code == 200
    assert post(url, "/v1/sessions", {"prime": PRIME}, AUTH).status_code == 429

    expected = {("/v1/generate", "200"): 4, ("/v1/score", "200"): 1, ("/v1/sessions", "429"): 1,
                ("/v1/sessions", "422"): 1, ("/v1/generate", "422"): 1, ("/v1/generate", "413"): 1,
                ("/v1/generate", "400"): 1, ("/v1/generate", "401"): 1, ("unknown", "404"): 1,
                ("/v1/sessions/{session}", "200"): 1}
    deadline = time.time() + 180  # Ray's agent exports every few seconds
    while True:
        metrics = scrape(metrics_url, model)
        seen = {key: value(metrics, "charrnn_requests_total", route=key[0], status=key[1]) for key in expected}
        if seen == expected and value(metrics, "charrnn_sessions") == 1 and \
                value(metrics, "charrnn_chars_total", kind="scored") > 0:
            break
        assert time.time() < deadline, (seen, metrics)
        time.sleep(1)

    for reason in ("session_limit", "invalid_max_chars", "body_too_large", "invalid_request", "unauthorized",
                   "not_found", "invalid_state"):
        assert value(metrics, "charrnn_rejections_total", reason=reason) == 1, reason
    assert value(metrics, "charrnn_sequences_total", finish_reason="length") == 4
    assert value(metrics, "charrnn_chars_total", kind="generated") == 4 * 50
    assert value(metrics, "charrnn_chars_total", kind="scored") == scored.json()["chars"]
    # The prime ran once for the four generations and the session: the others found it in the cache.
    assert value(metrics, "charrnn_chars_total", kind="primed") == len(PRIME)
    assert value(metrics, "charrnn_state_cache_hits_total") >= 4
    for histogram in ("time_to_first_char_seconds", "inter_char_seconds", "sequence_seconds"):
        assert value(metrics, f"charrnn_{histogram}_count") == 4, histogram
        assert value(metrics, f"charrnn_{histogram}_bucket", le="+Inf") == 4, histogram
    steps = value(metrics, "charrnn_decode_steps_total")
    assert steps >= 50 and value(metrics, "charrnn_step_batch_rows_count") == steps
    assert value(metrics, "charrnn_sequences_running") == 0 and value(metrics, "charrnn_sequences_waiting") == 0
    assert value(metrics, "charrnn_session_bytes") > 0
    # The Grafana dashboard asks only for what is exported.
    dashboard = (REPO / "deploy" / "grafana" / "charrnn.json").read_text()
    exported = {name for name, _ in metrics}
    for name in set(re.findall(r"ray_(charrnn_\w+)", dashboard)):
        assert name in exported, name


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium; .ci/run installs it)")
def test_the_playground_generates_stops_and_scores_in_a_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, _, model = server
    expect.set_options(timeout=120_000)  # events, not speed: a busy machine only takes longer
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            requested, console = [], []
            page.on("request", lambda r: requested.append(r.url))
            page.on("console", lambda m: console.append(m.text))
            page.goto(url + "/")

            # The server has an API key: the page says so, and works once given it.
            expect(page.locator("#error")).to_contain_text("needs an API key")
            page.fill("#key", KEY)
            page.click("#key-use")
            expect(page.locator("#model")).to_have_text(model)
            expect(page.locator("#limits")).to_contain_text(f"up to {MAX_CHARS} generated")
            expect(page.locator("#error")).to_be_empty()

            # Generate: the streamed text is the API's for the same seed and settings.
            page.fill("#prime", PRIME)
            page.fill("#length", "120")
            page.fill("#seed", "7")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("finished (length): 120 characters, seed 7")
            same = post(url, "/v1/generate", {"prime": PRIME, "max_chars": 120, "seed": 7, "temperature": 0.8}, AUTH)
            assert page.locator("#generated").text_content() == same.json()["text"]

            # Stop: text streams in, Stop ends it, and the server stops decoding for it.
            page.fill("#length", str(MAX_CHARS))
            page.click("#generate")
            expect(page.locator("#generated")).not_to_be_empty()
            page.click("#stop")
            expect(page.locator("#status")).to_contain_text("stopped after")
            _wait_until_idle(url)
            stopped_at = len(page.locator("#generated").text_content())
            assert 0 < stopped_at < MAX_CHARS
            expect(page.locator("#generate")).to_be_enabled()

            # An error from the API, in its own words.
            page.fill("#temperature", "0")
            page.click("#generate")
            expect(page.locator("#error")).to_contain_text("'temperature' must satisfy")
            page.fill("#temperature", "0.8")

            # Score: one span per character, coloured by the API's per-character surprisal.
            text = "The cat sat on the mat. Zq"
            page.click("#mode-score")
            page.fill("#score-text", text)
            page.click("#score")
            expect(page.locator("#score-summary")).to_contain_text("nats/char")
            spans = page.locator("#scored span")
            assert spans.count() == len(text)
            truth = post(url, "/v1/score", {"text": text, "per_char": True}, AUTH).json()["surprisal"]
            assert spans.nth(0).get_attribute("class") == "first"
            for i in range(1, len(text)):
                assert float(spans.nth(i).get_attribute("data-surprisal")) == pytest.approx(truth[i], abs=1e-9)
                assert "hsl(" in spans.nth(i).get_attribute("style") or "rgb(" in spans.nth(i).get_attribute("style")
            assert "".join(spans.all_text_contents()) == text
            page.screenshot(path=tmp_path / "playground.png", full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    # Offline and contained: every request went to this server, and the page's policy refused nothing.
    assert requested and all(r.startswith(url + "/") for r in requested), requested
    assert not [m for m in console if "Content Security Policy" in m], console


def _wait_until_idle(url: str) -> None:
    """Until the server decodes nothing: the stopped stream's sequence was cancelled."""
    deadline = time.time() + 120
    while True:
        decoder = requests.get(url + "/v1/stats", headers=AUTH, timeout=60).json()["decoder"]
        if decoder["active"] == 0 and decoder["waiting"] == 0:
            return
        assert time.time() < deadline, decoder
        time.sleep(0.2)
