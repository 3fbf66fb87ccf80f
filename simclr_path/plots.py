"""The loss and learning-rate curve of a run, as a PNG."""

from __future__ import annotations

import os


def plot_curves(records: list[dict], path: str) -> str | None:
    """Write loss and lr against step; returns the path, or None when there is nothing to plot."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    ax_loss.plot(steps, [r["loss"] for r in records], color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="NT-Xent loss", title="loss")
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
