"""Where a command's Ray work runs: a local Ray started in-process (the default) or a cluster."""
from __future__ import annotations

import logging
import os


def add_address_option(parser) -> None:
    parser.add_argument(
        "--address", default=None,
        help="Ray cluster to join: 'auto' (the cluster this machine belongs to), 'ray://HOST:10001', "
             "or HOST:PORT. Default: start a local Ray in this process, using this machine's cores.",
    )
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs for the local Ray (default: all of this machine's); ignored with --address")


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
