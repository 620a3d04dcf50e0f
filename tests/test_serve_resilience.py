"""`charrnn serve` under load while one replica's process is killed: Serve replaces the replica, at
least 99% of the requests succeed, the others get a clean 503 (JSON error, Retry-After) and none
hangs past its timeout. (Serve's own proxy answers a bare 500 for a request whose replica died
holding it; deploy/proxy.py makes that a 503, and `charrnn serve` installs it.)

Serve runs in its own `charrnn serve` process (its own local Ray, its own process group), so killing
a replica never touches the Ray of the test session, and the replica killed is found among that
process's descendants only."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import torch

from conftest import REPO, descendants, free_port, write_story_corpus
from models import CharRNN, ModelConfig, save_model
from pipeline.text.vocab import Vocabulary

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier

REPLICA_TITLE = "ray::ServeReplica:charrnn:CharRNNServer"
CLIENTS = 8
TIMEOUT_S = 30.0  # per request
BODY = {"prime": "The cat ", "max_chars": 40}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An untrained 1x32 LSTM: what it writes does not matter here, only that it answers."""
    tmp = tmp_path_factory.mktemp("resilience")
    text = write_story_corpus(tmp / "story.txt", 3000)
    vocab = Vocabulary.from_counts(Counter(map(ord, text)))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab.size, layers=1, hidden=32, dropout=0.0)
    save_model(CharRNN(config), config, vocab.to_json(), tmp / "run" / "model", info={"step": 0})
    return tmp / "run"


# -- processes -------------------------------------------------------------------------------------

def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


MONITOR = """
import json, sys
import ray
from ray import serve

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print("ready", flush=True)
while sys.stdin.readline():
    status = serve.status().applications["charrnn"].deployments["CharRNNServer"]
    print(json.dumps(status.replica_states), flush=True)
"""


class Replicas:
    """The CharRNNServer replicas of `charrnn serve` (process `serve_pid`): their processes (by
    process title, among that process's descendants only) and Serve's count of them by state, from a
    Ray driver in its own process connected to that Ray (the test session's own Ray, if any, is left
    alone)."""

    def __init__(self, serve_pid: int):
        self.serve_pid = serve_pid
        # that Ray's GCS, as its own processes (log monitor, dashboard, workers) are told it
        gcs = next(arg.split("=", 1)[1] for pid, _ in descendants(serve_pid) for arg in cmdline(pid)
                   if arg.startswith(("--gcs-address=", "--gcs_address=")))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.setdefault("RAY_AUTH_MODE", "token")  # as the local Ray `charrnn serve` started: ~/.ray/auth_token
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-c", MONITOR, gcs], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"cannot connect to the Ray at {gcs}: {self._stderr()}"

    def _stderr(self) -> str:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.err.seek(0)
        return self.err.read()[-3000:]

    def pids(self) -> list[int]:
        """The replicas' processes, by their Ray process title."""
        return sorted(p for p, _ in descendants(self.serve_pid)
                      if (cmdline(p) or [""])[0].startswith(REPLICA_TITLE))

    def states(self) -> dict:
        """Serve's replica count by state, e.g. {"RUNNING": 2}."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"serve.status() failed: {self._stderr()}"
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def start_serve(run_dir: Path) -> tuple[subprocess.Popen, int, list[str]]:
    """`charrnn serve` with 2 replicas (half a CPU each) on a free loopback port, in its own process
    group: the process, its port and its output so far; the process has exited if it failed."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "serve", "--model", str(run_dir), "--port", str(port),
                             "--replicas", "2", "--cpus-per-replica", "0.5", "--num-cpus", "2", "--max-chars", "100"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 240
    while not any("serving" in line for line in out) and proc.poll() is None:
        if time.time() > deadline:
            stop(proc)
            pytest.fail("charrnn serve did not come up:\n" + "".join(out[-30:]))
        time.sleep(0.5)
    if proc.poll() is not None:
        time.sleep(1)  # the rest of its output
    return proc, port, out


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C; SIGINT may be ignored in a background job
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own group: only what it started
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(run_dir):
    """`charrnn serve` (start_serve); yields (url, Replicas)."""
    proc, port, out = start_serve(run_dir)
    if proc.poll() is not None and "timed out during startup" in "".join(out):
        proc, port, out = start_serve(run_dir)  # Ray's own start-up, on a very busy machine: once more
    try:
        assert proc.poll() is None, "charrnn serve failed:\n" + "".join(out[-40:])
        replicas = Replicas(proc.pid)
        try:
            yield f"http://127.0.0.1:{port}", replicas
        finally:
            replicas.close()
    finally:
        stop(proc)


# -- the test --------------------------------------------------------------------------------------

class Load:
    """CLIENTS threads posting short /v1/generate requests back to back until stopped; each result
    is (start, elapsed s, status or exception name, Retry-After, body head)."""

    def __init__(self, url: str):
        self.url, self.stop, self.results = url, threading.Event(), []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, i: int):
        session, n = requests.Session(), 0
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                r = session.post(self.url + "/v1/generate", json={**BODY, "seed": i * 100_000 + n},
                                 timeout=TIMEOUT_S)
                result = (r.status_code, r.headers.get("Retry-After"), r.text[:300])
            except requests.RequestException as err:
                result = (type(err).__name__, None, str(err)[:300])
                session = requests.Session()
            with self.lock:
                self.results.append((start, time.monotonic() - start, *result))
            n += 1

    def ok(self) -> int:
        with self.lock:
            return sum(r[2] == 200 for r in self.results)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self.threads), "a client hangs past its timeout"


def test_a_killed_replica_is_replaced_and_requests_keep_succeeding(server):
    url, replicas = server
    deadline = time.monotonic() + 120  # `serve.run` may return before Serve counts both as RUNNING
    while (states := replicas.states()) != {"RUNNING": 2}:
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    before = replicas.pids()
    assert len(before) == 2, before
    started = time.monotonic()
    with Load(url) as load:
        while load.ok() < 4 * CLIENTS:  # the load is on
            assert time.monotonic() - started < 60, load.results[-5:]
            time.sleep(0.2)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        # Serve notices, starts a replacement and routes to it; the load goes on meanwhile. A new
        # replica process exists only once Serve has noticed the death, so from then on its count of
        # RUNNING replicas is about the new set.
        deadline = killed_at + 90
        while True:
            pids, states = replicas.pids(), replicas.states()
            if len(pids) == 2 and victim not in pids and states == {"RUNNING": 2}:
                break
            assert time.monotonic() < deadline, f"no replacement replica: {pids} {states}"
            time.sleep(0.5)
        replaced_at = time.monotonic()
        # Load on the new set too, counted in requests, not seconds: however slow the machine.
        while len(load.results) < 100 * CLIENTS or \
                sum(r[0] > replaced_at and r[2] == 200 for r in list(load.results)) < 4 * CLIENTS:
            assert time.monotonic() < replaced_at + 600, "the load stalled after the replacement"
            time.sleep(0.2)
    stopped = time.monotonic()

    results = load.results
    failures = [r for r in results if r[2] != 200]
    statuses = Counter(r[2] for r in failures)
    print(f"\n{len(results)} requests in {stopped - started:.1f} s, {len(failures)} failed {dict(statuses)}; "
          f"replaced in {replaced_at - killed_at:.1f} s; slowest {max(r[1] for r in results):.2f} s")
    for t0, elapsed, status, retry_after, body in failures:
        print(f"  {t0 - killed_at:+.2f} s after the kill, {elapsed:.2f} s: {status} {retry_after} {body[:150]!r}")
    # Only the requests in flight on the killed replica may fail (at most one per client), and none
    # sent once the replacement was serving.
    assert len(failures) <= CLIENTS, (len(failures), len(results), dict(statuses))
    assert all(t0 < replaced_at for t0, *_ in failures), failures
    assert max(r[1] for r in results) < TIMEOUT_S
    for _, _, status, retry_after, body in failures:
        assert status == 503, (status, body)
        assert retry_after is not None and int(retry_after) >= 1
        assert json.loads(body)["error"]["type"] == "unavailable_error"

    health = requests.get(url + "/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def _generate(url: str, **body) -> dict:
    """POST /v1/generate, retried while a replica is being replaced (503)."""
    for _ in range(120):
        r = requests.post(url + "/v1/generate", json={"max_chars": 60, **body}, timeout=TIMEOUT_S)
        if r.status_code != 503:
            assert r.status_code == 200, r.text
            return r.json()
        time.sleep(0.5)
    raise AssertionError("no replica answered")


def _running(replicas, avoid=()) -> list[int]:
    """The replicas' processes once Serve runs two, none of them in `avoid`."""
    deadline = time.monotonic() + 120
    while True:
        pids = replicas.pids()
        if len(pids) == 2 and not set(pids) & set(avoid) and replicas.states() == {"RUNNING": 2}:
            return pids
        assert time.monotonic() < deadline, (pids, replicas.states())
        time.sleep(0.5)


def test_a_session_outlives_every_replica_that_served_it(server):
    """The session's state lives in SessionStore, not in a replica: killed both, their replacements
    continue it with exactly the text one long prime gives."""
    url, replicas = server
    before = _running(replicas)
    made = requests.post(url + "/v1/sessions", json={"prime": "The cat "}, timeout=TIMEOUT_S)
    assert made.status_code == 200, made.text
    sid = made.json()["session"]
    first = _generate(url, prime="saw ", seed=1, session=sid)["text"]
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    _running(replicas, avoid=before)
    later = _generate(url, prime="A dog ", seed=2, session=sid)
    assert later["text"] == _generate(url, prime="The cat saw " + first + "A dog ", seed=2)["text"]
    assert later["session"]["length"] == len("The cat saw " + first + "A dog ") + len(later["text"])
