"""What `charrnn train` shows by default: this project's progress lines, evaluations, checkpoints
and errors. Ray Train and Ray Data log a line at every report, checkpoint and dataset read; those
go to Ray's log files as always, and to the console only with --verbose."""
from __future__ import annotations

import logging


def quiet_ray_logs() -> None:
    """Raise Ray's chatty loggers to WARNING in this process (the driver or a worker)."""
    import ray.train.v2._internal.execution.context as train_context

    for name in ("ray.data", "ray.train", train_context.__file__):  # the last one is named by its file
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.experimental.tqdm_ray").setLevel(logging.ERROR)  # "tqdm is not installed"
