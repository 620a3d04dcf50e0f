"""RUN_DIR/loss.png from RUN_DIR/metrics.jsonl."""
from __future__ import annotations

import io


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
