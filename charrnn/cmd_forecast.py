"""charrnn forecast: continue a time series with a trained series model on this machine, no Ray needed."""
from __future__ import annotations

import sys
from pathlib import Path

PLOT_HISTORY = 300  # points of history drawn before the forecast


def add_commands(sub) -> None:
    p = sub.add_parser("forecast", help="forecast the next values of a time series with a series model",
                       description="Read the model's columns from --history (CSV or Parquet), run the whole history "
                                   "through the model in one pass, then predict --steps values, each fed back as the "
                                   "next input. Prints CSV (step,<columns>) in the data's own units.")
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a run folder (uses RUN_DIR/model) or a model folder")
    p.add_argument("--history", required=True, metavar="FILE",
                   help="CSV or Parquet file (local path or pyarrow.fs URI) holding the model's columns, oldest row first")
    p.add_argument("--steps", required=True, type=int, metavar="K", help="values to forecast (>= 1)")
    p.add_argument("--holdout", action="store_true",
                   help="hold the last K rows of --history back as the truth, forecast them from the rows before, "
                        "and print the forecast's mean squared error on stderr")
    p.add_argument("--plot", metavar="PNG", help="draw the history's end, the truth (with --holdout) and the forecast")
    p.add_argument("--out", metavar="CSV", help="write the forecast here instead of to stdout")
    p.set_defaults(run=_run_forecast)


def model_folder(location: str) -> Path:
    """A run folder's model, or the model folder itself (as `charrnn sample` reads it)."""
    path = Path(location)
    if (path / "model" / "config.json").exists() or not (path / "config.json").exists() and (path / "model").is_dir():
        return path / "model"
    return path


def _fail(message: str) -> int:
    print(f"charrnn forecast: error: {message}", file=sys.stderr)
    return 2


def _run_forecast(args) -> int:
    if args.steps < 1:
        return _fail(f"--steps must be >= 1, got {args.steps}")
    from models import Normalization, forecast, load_series_model
    from pipeline.series.read import read_points

    model, _, series, _ = load_series_model(model_folder(args.model))
    columns = series["columns"]
    history = read_points(args.history, columns)
    truth = None
    if args.holdout:
        if len(history) < args.steps + 1:
            return _fail(f"--holdout needs more than --steps {args.steps} rows in {args.history}, which has "
                         f"{len(history)}")
        history, truth = history[: -args.steps], history[-args.steps :]
    predicted = forecast(model, Normalization(series["mean"], series["std"]), [history], [args.steps])[0]

    lines = ["step," + ",".join(columns)]
    lines += [f"{step}," + ",".join(f"{v:.9g}" for v in row) for step, row in enumerate(predicted, start=1)]
    text = "\n".join(lines) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as err:
            return _fail(f"cannot write --out {args.out}: {err.strerror}")
    else:
        sys.stdout.write(text)
    if truth is not None:
        errors = ((predicted - truth) ** 2).mean(axis=0)
        per_feature = ", ".join(f"{c} {e:.6g}" for c, e in zip(columns, errors))
        print(f"holdout: MSE {errors.mean():.6g} over the last {args.steps} rows ({per_feature})", file=sys.stderr)
    if args.plot:
        from training.plot import plot_forecast

        try:
            plot_forecast(Path(args.plot), columns, history[-PLOT_HISTORY:], predicted, truth)
        except OSError as err:
            return _fail(f"cannot write --plot {args.plot}: {err.strerror}")
    return 0
