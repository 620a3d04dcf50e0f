"""RUN_DIR/loss.png from RUN_DIR/metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("event") is None]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*zip(*train), label="training loss", linewidth=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(png_path)
