"""The loss and learning-rate curve of a run, as a PNG."""

from __future__ import annotations

import os


def plot_curves(records: list[dict], path: str, loss_label: str = "NT-Xent loss") -> str | None:
    """Write loss and lr (and kNN accuracy, when logged) against step; None when nothing to plot."""
    losses = [r for r in records if "loss" in r]
    knn = [r for r in records if "knn_acc" in r]
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in losses]
    fig, axes = plt.subplots(1, 3 if knn else 2, figsize=(15 if knn else 10, 3.5), dpi=100)
    ax_loss, ax_lr = axes[0], axes[1]
    ax_loss.plot(steps, [r["loss"] for r in losses], color="tab:blue")
    ax_loss.set(xlabel="step", ylabel=loss_label, title="loss")
    ax_lr.plot(steps, [r["lr"] for r in losses], color="tab:orange")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    if knn:
        axes[2].plot([r["step"] for r in knn], [r["knn_acc"] for r in knn], "o-", color="tab:green")
        axes[2].set(xlabel="step", ylabel="accuracy", title="kNN accuracy (labelled check)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
