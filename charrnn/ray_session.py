"""Where a command's Ray work runs: a local Ray started in-process (the default) or a cluster."""
from __future__ import annotations

import atexit
import logging
import os
import signal
import time


def add_address_option(parser) -> None:
    parser.add_argument(
        "--address", default=None,
        help="Ray cluster to join: 'auto' (the cluster this machine belongs to), 'ray://HOST:10001', "
             "or HOST:PORT. Default: start a local Ray in this process, using this machine's cores.",
    )
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs for the local Ray (default: all of this machine's); ignored with --address")


def stop_on_signals() -> None:
    """SIGTERM (a service manager, `kill`, a container stop) ends a command as Ctrl-C does: its
    cleanup runs and every process it started ends with it. Set again after ray.init, whose core
    worker installs a handler of its own that aborts the process. Both signals also stop any
    later publish (storage.publish_nothing_more), in case their KeyboardInterrupt gets lost."""
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)


def _interrupt(signum, frame):
    from storage import publish_nothing_more  # light: no Ray, no torch

    publish_nothing_more()
    raise KeyboardInterrupt


def require_token_for_local_ray() -> None:
    """Token authentication on every listener of a local Ray this process starts, whatever the
    installed release's default (2.52 brought it, off by default); RAY_AUTH_MODE=disabled set by
    the user still wins. Ray reads the variable when it is imported: call this before that."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def is_local(address: str | None) -> bool:
    """Whether `connect(address)` starts this command's own Ray (inside `ray job submit`,
    RAY_ADDRESS names the job's cluster)."""
    return address is None and not os.environ.get("RAY_ADDRESS")


def connect(address: str | None, num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Start or join Ray once per process; quiet unless something goes wrong. `dashboard` False
    leaves a local Ray without its dashboard (about 1 GB less memory and a faster start), for
    commands whose libraries never ask its state API: Ray Data alone does not, Ray Train does."""
    import ray  # here, not at the top: commands that need no Ray should not pay for importing it

    if ray.is_initialized():
        return
    # Inside `ray job submit` the job's driver already knows its cluster.
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address is None:
        # "local" starts a fresh Ray even if a `ray start` cluster runs on this machine.
        address = "local"
        # A local Ray is this one machine, which no autoscaler drains: Ray Train's preemption
        # watcher (an actor polling every 5 s, and an error line on the console) has nothing to watch.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        kwargs.update(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard, dashboard_host="127.0.0.1")
    ray.init(address=address, **kwargs)
    stop_on_signals()
    if address == "local":
        # After Ray's own exit hook, so these run before it (last in, first out): note, then end.
        atexit.register(_end_local_ray)
        atexit.register(_note_local_ray_processes)


# The local Ray's processes as the command ends: (pid, start time), filled in by the exit hooks.
_LOCAL_RAY: set[tuple[int, int]] = set()


def _note_local_ray_processes() -> None:
    """Runs first at exit, while every process of the local Ray is still this one's descendant."""
    _LOCAL_RAY.update(descendants(os.getpid()))


def _end_local_ray(grace_s: float = 5.0) -> None:
    """After ray.shutdown: some of Ray's agents (DashboardAgent, RuntimeEnvAgent) ignore SIGTERM
    and outlive the raylet, reparented to init. Whatever this command started and is still alive
    after `grace_s` is killed, by pid and start time, so no other process is ever touched; the
    command ends once they are gone."""
    import ray

    ray.shutdown()
    left = _wait_gone(_LOCAL_RAY, grace_s)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_gone(left, grace_s)


def _wait_gone(processes, timeout_s: float) -> list[tuple[int, int]]:
    """Those of `processes` still alive after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in processes if _start_time(p[0]) == p[1]]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def descendants(pid: int) -> set[tuple[int, int]]:
    """Every live descendant of `pid` as (pid, start time in clock ticks), from /proc (Linux; empty
    elsewhere)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat:
                children.setdefault(stat[0], []).append(int(entry))
                starts[int(entry)] = stat[1]
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, starts[child]))
            todo.append(child)
    return found


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return stat[1] if stat else None
