"""RUN_DIR/loss.png from RUN_DIR/metrics.jsonl, and `charrnn forecast --plot`'s figure."""
from __future__ import annotations

import io
from pathlib import Path


def plot_losses(records: list[dict], unit: str = "nats per character") -> bytes | None:
    """loss.png's bytes from metrics.jsonl's records; None before the first training step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("event") is None]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*zip(*train), label="training loss", linewidth=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({unit})")
    ax.grid(alpha=0.3)
    ax.legend()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png.getvalue()


def plot_forecast(png_path: Path, columns: list[str], history, forecast, truth=None) -> None:
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
