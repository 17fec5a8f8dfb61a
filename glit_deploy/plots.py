"""Plots people would rather look at than read (written next to the numbers they show)."""

from __future__ import annotations

import json
from pathlib import Path

from glit_deploy.atomic_io import atomic_write


def plot_training_curves(metrics_path: Path, out_path: Path) -> None:
    """Training loss and validation top-1 (every key starting with val_top1) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        return
    epochs = [r["epoch"] + 1 for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key in sorted({k for r in records for k in r if k.startswith("val_top1")}):
        points = [(r["epoch"] + 1, r[key]) for r in records if key in r]
        ax_acc.plot(*zip(*points, strict=True), marker="o", label=key.removeprefix("val_top1_"))
    ax_acc.set(xlabel="epoch", ylabel="validation top-1 (%)", title="validation accuracy")
    if ax_acc.lines:
        ax_acc.legend()
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
