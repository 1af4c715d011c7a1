"""The loss curves of a training run as a PNG in the model folder, redrawn after every epoch."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CURVES_NAME", "plot_curves"]

CURVES_NAME = "loss_curves.png"


def plot_curves(model_dir: Path, train_loss: list[float], val_loss: list[float], lr: list[float],
                best_epoch: int) -> Path:
    """Draw train and validation loss per epoch (log scale) and the learning rate into
    ``model_dir/loss_curves.png``; the best epoch is marked. Written under a temporary name and
    renamed, so a viewer never sees half a file. Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; leaves an interactive backend alone
    import matplotlib.pyplot as plt

    epochs = list(range(1, len(train_loss) + 1))
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(6, 5), sharex=True, height_ratios=(3, 1))
    ax.plot(epochs, train_loss, "o-", ms=3, label="train")
    ax.plot(epochs, val_loss, "s-", ms=3, label="validation")
    if 0 <= best_epoch < len(val_loss):
        ax.axvline(best_epoch + 1, color="0.6", ls="--", lw=1, label=f"best (epoch {best_epoch + 1})")
    if min(train_loss + val_loss) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.legend(frameon=False)
    ax.set_title(f"{model_dir.name}: {len(epochs)} epoch(s)")
    ax_lr.plot(epochs, lr, "-", color="0.3")
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    fig.tight_layout()
    path = Path(model_dir) / CURVES_NAME
    partial = path.with_suffix(".partial.png")
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    os.replace(partial, path)
    return path
