"""charrnn submit: run a charrnn command on a Ray cluster as a Ray job, follow its logs, exit with its status.

The same as `ray job submit --address URL --working-dir . -- python3 -m charrnn COMMAND ...`, through Ray's
JobSubmissionClient. The job's driver runs on the cluster's head node, where RAY_ADDRESS (set by Ray for
every job) makes the command join that cluster instead of starting a Ray of its own.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from charrnn.errors import CommandError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Entry point on the head node: the charrnn in the uploaded working directory (the job's current folder,
# first on its PYTHONPATH) or, with --no-working-dir, the one installed there. Needs the project's
# dependencies in the head's `python3` (the first on the PATH Ray runs with), not the console script.
# python3, not python: Ubuntu and Debian have no `python` unless python-is-python3 is installed.
ENTRYPOINT = "python3 -m charrnn"
# Never uploaded, on top of what the folder's .gitignore and .rayignore leave out.
EXCLUDES = [".git", "__pycache__", "*.egg-info", ".hypothesis", ".pytest_cache", ".benchmarks", "/data/", "/runs/"]
PATH_OPTIONS = ("data", "out", "model", "inputs", "files", "dataset")  # the commands' path-valued dests
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def add_commands(sub) -> None:
    p = sub.add_parser(
        "submit", help="run a charrnn command on a Ray cluster as a Ray job, streaming its logs",
        usage="charrnn submit [--address URL] [--working-dir DIR | --no-working-dir] [--no-wait] -- COMMAND [ARGS...]",
        description="Submit `charrnn COMMAND ARGS` as a Ray job through the cluster's Jobs API, upload the working "
                    "directory with it, print the job's logs as they come and exit with its status (0 when it "
                    "succeeded, the command's own exit code or 1 when it failed or was stopped). Ctrl-C stops the "
                    "job. Paths in ARGS are read on the cluster: use absolute paths on storage every node sees, or "
                    "URIs. A cluster with token authentication needs RAY_AUTH_MODE=token and its token here "
                    "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN); see docs/cluster.md.",
    )
    p.add_argument("--address", default=None, metavar="URL",
                   help=f"the cluster's dashboard / Jobs API (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, "
                        f"else {DEFAULT_ADDRESS}, e.g. the end of `ray dashboard ray_cluster.yaml`'s tunnel)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--working-dir", default=".", metavar="DIR",
                       help="folder to upload as the job's working directory and import path (default: the current "
                            "folder); its .gitignore is respected, and .git, data/ and runs/ are never uploaded")
    where.add_argument("--no-working-dir", action="store_true",
                       help="upload nothing: run the charrnn installed on the cluster's nodes")
    p.add_argument("--no-wait", action="store_true",
                   help="print the job's submission ID and return at once, leaving the job running")
    # Not `command`: the subcommand's own name is kept there, and errors are prefixed with it.
    p.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                   help="the charrnn command to run, after `--`, e.g. `-- train --data s3://b/ds --out /shared/run`")
    p.set_defaults(handler=_run_submit)




def _note(message: str) -> None:
    print(f"charrnn submit: {message}", file=sys.stderr, flush=True)


def _run_submit(args) -> int:
    command = _checked_command(args)
    working_dir = _working_dir(args)
    client, job_id, entrypoint = _submit(args.address, command, working_dir)
    url = client.get_address()
    if args.no_wait:
        print(job_id, flush=True)
        _note(f"submitted job {job_id} to {url}; follow it with `ray job logs --follow {job_id} --address {url}`, "
              f"stop it with `ray job stop {job_id} --address {url}`")
        return 0
    from storage import redact_uris

    _note(redact_uris(f"submitted job {job_id} to {url}: {entrypoint}"))
    _note("following its logs; Ctrl-C stops the job")
    return _follow(client, job_id, url)


def _checked_command(args) -> list[str]:
    """The charrnn command to run as the job, checked here with the same parser the job will use,
    before anything is uploaded: a typo fails now, with argparse's usage message and exit code 2."""
    command = list(args.job_command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CommandError("no command to run: charrnn submit [options] -- COMMAND [ARGS...], e.g. -- train --data ...")
    if command[0] == "submit":
        raise CommandError("`submit` runs here, not as a job; give the command to run on the cluster")
    _warn_relative_paths(args.parser.parse_args(command))
    return command


def _working_dir(args) -> Path | None:
    """The folder to upload as the job's working directory, or None (--no-working-dir)."""
    if args.no_working_dir:
        return None
    working_dir = Path(args.working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise CommandError(f"--working-dir {args.working_dir} is not a folder")
    if not (working_dir / "charrnn" / "__main__.py").is_file():
        _note(f"{working_dir} holds no charrnn/ package: the job runs the charrnn installed on the cluster")
    return working_dir


def _submit(address: str | None, command: list[str], working_dir: Path | None):
    """(the job client, the job's id, its entrypoint) once the job is submitted."""
    import ray.job_submission  # noqa: F401  (before the next line: importing it sets its logger to INFO)
    from ray.exceptions import AuthenticationError

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."
    try:
        client = _client(address)
        runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES} if working_dir else {}
        entrypoint = f"{ENTRYPOINT} {shlex.join(command)}"
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   metadata={"charrnn_command": command[0]})
    except AuthenticationError as err:
        raise CommandError(_auth_message(err, client_address(address)))
    except (ConnectionError, RuntimeError, ValueError, OSError) as err:
        raise CommandError(_one_line(err))
    return client, job_id, entrypoint


def _follow(client, job_id: str, url: str) -> int:
    """Print the job's logs until it ends, and return the exit code that says how it ended; Ctrl-C
    stops the job (130)."""
    from ray.exceptions import AuthenticationError

    try:
        _follow_logs(client, job_id)
        info = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        _note(f"interrupted: stopping job {job_id}")
        try:
            client.stop_job(job_id)
        except Exception as err:  # the job may already be gone; say so, but the answer is still 130
            _note(f"could not stop job {job_id}: {_one_line(err)}")
        return 130
    except AuthenticationError as err:
        raise CommandError(_auth_message(err, url))
    except (ConnectionError, RuntimeError, OSError) as err:
        raise CommandError(f"lost job {job_id}: {_one_line(err)}")

    status = str(info.status)
    if status == "SUCCEEDED":
        _note(f"job {job_id} succeeded")
        return 0
    code = info.driver_exit_code
    if status == "FAILED" and code:  # the command ran and failed: its own message is in the logs above
        print(f"charrnn submit: error: job {job_id} failed: the command exited with code {code}",
              file=sys.stderr, flush=True)
        return code if 0 < code < 256 else 1
    reason = "was stopped" if status == "STOPPED" else f"failed: {_one_line(info.message or status)}"
    print(f"charrnn submit: error: job {job_id} {reason}", file=sys.stderr, flush=True)
    return 1


def client_address(address: str | None) -> str:
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def _client(address: str | None):
    """A JobSubmissionClient for `address`. Ray's client lets RAY_API_SERVER_ADDRESS and RAY_ADDRESS
    override its argument; here an explicit --address wins, and the environment only fills in for it."""
    from ray.job_submission import JobSubmissionClient

    if address is None:
        if os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"):
            return JobSubmissionClient()
        address = DEFAULT_ADDRESS
    with _without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        return JobSubmissionClient(address)


@contextmanager
def _without_env(*names):
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _follow_logs(client, job_id: str) -> None:
    """Print the job's output as it comes, until the job ends. If the log stream breaks (the dashboard
    restarting, a network blip), wait for the end by polling and print what was missed."""
    printed = 0

    async def tail():
        nonlocal printed
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            printed += len(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as err:
        _note(f"log stream broke ({_one_line(err)}); waiting for the job to end")
        _wait_terminal(client, job_id, timeout=None)
        rest = client.get_job_logs(job_id)[printed:]
        sys.stdout.write(rest)
        sys.stdout.flush()


def _wait_terminal(client, job_id: str, timeout: float | None = 60.0):
    """The job's info once it is SUCCEEDED, FAILED or STOPPED (the log stream ends a moment before)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise RuntimeError(f"the job's log stream ended but the job is still {info.status}")
        time.sleep(0.5)


def _warn_relative_paths(inner) -> None:
    """The job runs in its own copy of the working directory on the head node: a relative path names a
    folder there (a run written to it is lost with the job's files), not one on this machine."""
    from storage import is_uri

    for dest in PATH_OPTIONS:
        value = getattr(inner, dest, None)
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and path and not is_uri(path) and not os.path.isabs(os.path.expanduser(path)):
                _note(f"note: {path!r} is a relative path, read on the cluster inside the job's working directory; "
                      "use an absolute path on storage every node sees, or a URI")


def _auth_message(err: Exception, address: str) -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if str(err).lower().startswith("authentication failed"):  # 403: a token was sent and refused
        return (f"the cluster at {address} rejected this token: use the cluster's token "
                "(`ray get-auth-token` on its head node) in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
    hint = "set RAY_AUTH_MODE=token and " if mode.lower() != "token" else ""
    return (f"the cluster at {address} requires token authentication: {hint}make its token available here "
            "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; `ray get-auth-token` on the head prints it)")


def _one_line(err) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
