"""charrnn forecast: continue a time series with a trained series model on this machine, no Ray needed."""
from __future__ import annotations

import sys
from pathlib import Path

from charrnn.errors import CommandError

PLOT_HISTORY = 300  # points of history drawn before the forecast


def add_commands(sub) -> None:
    p = sub.add_parser("forecast", help="forecast the next values of a time series with a series model",
                       description="Read the model's columns from --history (CSV or Parquet), run the whole history "
                                   "through the model in one pass, then predict --steps values, each fed back as the "
                                   "next input. Prints CSV (step,<columns>) in the data's own units.")
    p.add_argument("--model", required=True, metavar="RUN_DIR",
                   help="a run folder (uses RUN_DIR/model) or a model folder; a local path or a pyarrow.fs URI")
    p.add_argument("--history", required=True, metavar="FILE",
                   help="CSV or Parquet file (local path or pyarrow.fs URI) holding the model's columns, oldest row "
                        "first")
    p.add_argument("--steps", required=True, type=int, metavar="K", help="values to forecast (>= 1)")
    p.add_argument("--holdout", action="store_true",
                   help="hold the last K rows of --history back as the truth, forecast them from the rows before, "
                        "and print the forecast's mean squared error on stderr")
    p.add_argument("--plot", metavar="PNG", help="draw the history's end, the truth (with --holdout) and the forecast")
    p.add_argument("--out", metavar="CSV", help="write the forecast here instead of to stdout")
    p.set_defaults(handler=_run_forecast)




def _run_forecast(args) -> int:
    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    from deploy import source
    from models import Normalization, forecast
    from pipeline.series.read import read_points

    model, feature_scaling, _ = source.load_series(source.resolve(args.model))
    columns = feature_scaling["columns"]
    history = read_points(args.history, columns)
    truth = None
    if args.holdout:
        if len(history) < args.steps + 1:
            raise CommandError(f"--holdout needs more than --steps {args.steps} rows in {args.history}, which has "
                               f"{len(history)}")
        history, truth = history[: -args.steps], history[-args.steps :]
    normalization = Normalization(feature_scaling["mean"], feature_scaling["std"])
    predicted = forecast(model, normalization, [history], [args.steps])[0]

    lines = ["step," + ",".join(columns)]
    lines += [f"{step}," + ",".join(f"{v:.9g}" for v in row) for step, row in enumerate(predicted, start=1)]
    text = "\n".join(lines) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as err:
            raise CommandError(f"cannot write --out {args.out}: {err.strerror}") from None
    else:
        sys.stdout.write(text)
    if truth is not None:
        errors = ((predicted - truth) ** 2).mean(axis=0)
        per_feature = ", ".join(f"{c} {e:.6g}" for c, e in zip(columns, errors))
        print(f"holdout: MSE {errors.mean():.6g} over the last {args.steps} rows ({per_feature})", file=sys.stderr)
    if args.plot:
        try:
            _plot_forecast(Path(args.plot), columns, history[-PLOT_HISTORY:], predicted, truth)
        except OSError as err:
            raise CommandError(f"cannot write --plot {args.plot}: {err.strerror}") from None
    return 0


def _plot_forecast(png_path: Path, columns: list[str], history, forecast, truth=None) -> None:
    """One subplot per feature: `history` [points, features] up to the forecast's start, then
    `forecast` [steps, features] and, if given, the `truth` it is measured against."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    past = np.arange(-len(history), 0)
    ahead = np.arange(len(forecast))
    fig, axes = plt.subplots(len(columns), 1, figsize=(9, 3 * len(columns)), squeeze=False, sharex=True)
    for j, (ax, name) in enumerate(zip(axes[:, 0], columns)):
        ax.plot(past, history[:, j], color="0.3", linewidth=0.9, label="history")
        if truth is not None:
            ax.plot(ahead, truth[:, j], color="tab:green", linewidth=1.2, label="truth (held out)")
        ax.plot(ahead, forecast[:, j], "--", color="tab:red", linewidth=1.2, label="forecast")
        ax.axvline(-0.5, color="0.6", linewidth=0.8)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left")
    axes[-1, 0].set_xlabel("step (0: the first forecast value)")
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(png_path)
