"""charrnn on a Ray cluster: a head node started with `ray start --head` on loopback with token
authentication on, and `charrnn submit` jobs run on it through the Jobs API."""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO, alive, descendants, error_line, free_port, free_ports, run_cli, write_story_corpus

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else shutil.which("ray")


@pytest.fixture(scope="module")
def head():
    """A one-node Ray cluster of its own: every port chosen free, its own temp dir (so the machine's
    /tmp/ray/ray_current_cluster is not touched) and its own token, in its own process group."""
    root = Path(tempfile.mkdtemp(prefix="crj", dir="/tmp"))  # short: Ray's socket paths live under it
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(9)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM
               # The job's `python3 -m charrnn` is this Python, with this project installed.
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    command = [
        # (Ray advertises the machine's address even when given 127.0.0.1; what listens on loopback
        # only is the dashboard, with the Jobs API.)
        _ray_executable(), "start", "--head", "--block", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        "--num-cpus=2", "--num-gpus=0", "--object-store-memory=200000000", f"--temp-dir={root / 'ray'}",
        "--disable-usage-stats",
    ]
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited with {proc.returncode}:\n"
                            f"{(root / 'head.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/api/version", timeout=5).status_code in (200, 401):
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the head's dashboard did not answer at {url}:\n{(root / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "env": env, "root": root, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        # Only this head's processes: `ray start` stops its own (raylet first, which stops the workers),
        # then whatever of its process group or its descendants is left (Ray puts workers and job
        # drivers in process groups of their own).
        family = descendants(proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 20
        while family and time.monotonic() < deadline:
            family = [p for p in family if alive(*p)]
            time.sleep(0.5)
        for pid, _ in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def submit_command(head, *args) -> list[str]:
    return [sys.executable, "-m", "charrnn", "submit", "--address", head["url"], *map(str, args)]


def submit(head, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`charrnn submit --address HEAD ARGS` in a real process, from the repository (the working dir)."""
    return subprocess.run(submit_command(head, *args), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=head["env"] if env is None else env)


@pytest.fixture(scope="module")
def failing_job(head, tmp_path_factory):
    """A job whose command fails, submitted as soon as the head is up so that it runs alongside the
    training job (jobs wait mostly on process start-up: together they take half the time)."""
    missing = tmp_path_factory.mktemp("failing") / "no-such-corpus.txt"
    proc = subprocess.Popen(submit_command(head, "--no-working-dir", "--", "train", "--data", missing,
                                           "--out", missing.parent / "run"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=head["env"])
    yield proc, missing
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_train_job_writes_a_model(head, failing_job, tmp_path):
    from models import load_model

    write_story_corpus(tmp_path / "story.txt", 20_000)
    run = tmp_path / "run"
    result = submit(head, "--", "train", "--data", tmp_path / "story.txt", "--out", run,
                    "--layers", 1, "--hidden", 32, "--dropout", 0, "--batch", 1, "--seq", 20, "--max-steps", 10,
                    "--val-every", 10, "--val-max-tokens", 2000, "--checkpoint-every", 10, "--log-every", 5,
                    "--workers", 1)
    assert result.returncode == 0, result.stdout + result.stderr
    # The job's own output came back through the log stream.
    assert "trained 10 steps" in result.stdout, result.stdout
    assert "succeeded" in result.stderr
    model, config, vocab, info = load_model(run / "model")
    assert config.hidden == 32 and config.layers == 1
    assert config.vocab_size > 10 and len(vocab["chars"]) > 10
    assert (run / "metrics.jsonl").exists()


def test_failed_job_exits_with_its_error(failing_job):
    proc, missing = failing_job
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stdout + stderr  # the command's own exit code
    assert "charrnn train: error:" in stdout and str(missing) in stdout  # its message, streamed
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "failed" in errors[0], stderr
    assert "Traceback" not in stderr


def test_client_without_the_token_is_refused(head, tmp_path):
    env = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    result = submit(head, "--", "verify", tmp_path, env=env, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "RAY_AUTH_MODE=token" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def _start_serve(head, model, port, *args) -> tuple[subprocess.Popen, list[str]]:
    """`charrnn serve --address HEAD` in its own session, once it says it is serving."""
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "serve", "--address", head["gcs"], "--model", str(model),
                             "--port", str(port), "--cpus-per-replica", "0.5", *args], cwd=REPO, env=head["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("charrnn serve: serving"):
            return proc, lines
    proc.wait()
    pytest.fail("charrnn serve did not come up:\n" + "".join(lines[-30:]))


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest
    return rest


def _model_name(url: str) -> str | int:
    """The model a route prefix serves, once Serve's proxy routes it (it learns of an application a
    moment after the application is RUNNING): its name, or the status that says there is none."""
    deadline = time.monotonic() + 60
    while (r := requests.get(f"{url}/v1/models", timeout=60)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    return r.json()["data"][0]["id"] if r.status_code == 200 else r.status_code


def _gone(url: str) -> bool:
    """Whether the proxy stops routing `url` within a minute of its application's deletion."""
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/v1/models", timeout=60).status_code != 404:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_serve_on_a_shared_cluster_touches_only_its_own_application(head, tmp_path):
    from models import CharRNN, ModelConfig, save_model

    config = ModelConfig(vocab_size=4, hidden=16, layers=1)
    save_model(CharRNN(config), config, {"chars": "abc", "unknown_id": 3}, tmp_path / "model")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    other, _ = _start_serve(head, tmp_path / "model", port, "--app-name", "other", "--route-prefix", "/other",
                            "--name", "theirs")
    try:
        mine, _ = _start_serve(head, tmp_path / "model", port, "--name", "mine")
        try:
            assert _model_name(url) == "mine"
            assert _model_name(f"{url}/other") == "theirs"
            taken = subprocess.run([sys.executable, "-m", "charrnn", "serve", "--address", head["gcs"], "--model",
                                    str(tmp_path / "model"), "--port", str(port), "--app-name", "other"],
                                   cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=300)
            assert taken.returncode == 2 and "'other' is already running" in taken.stderr, taken.stderr
            assert _model_name(f"{url}/other") == "theirs"
        finally:
            _stop(mine)
        # Ending took down its own application only.
        assert _gone(url)
        assert _model_name(f"{url}/other") == "theirs"
    finally:
        _stop(other)


def test_a_local_ray_asks_for_its_token(tmp_path):
    """The local Ray a command starts (as cli.main starts it) listens with token authentication on,
    whatever Ray's default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from charrnn import ray_session as rs; rs.require_token_for_local_ray()\n"
         "import ray; rs.connect(None, 1); "
         "print(ray.get_runtime_context().gcs_address, ray.worker.get_dashboard_url(), flush=True)\n"
         "sys.stdin.read()"], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        gcs, dashboard = proc.stdout.readline().split()
        assert requests.get(f"http://{dashboard}/api/version", timeout=60).status_code == 401
        assert requests.get(f"http://{dashboard}/api/jobs/", timeout=60).status_code == 401
        # A client without the token cannot join either.
        joined = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{gcs}')"], cwd=tmp_path,
                                env=dict(env, RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=300)
        assert joined.returncode != 0, joined.stderr
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0


def test_submit_errors_name_the_submit_command():
    assert error_line(run_cli("submit")).startswith("charrnn submit: error: no command to run")
    assert error_line(run_cli("submit", "--", "submit")).startswith("charrnn submit: error: `submit` runs here")
