"""Per-epoch metrics table and training-curve figure from Lightning's CSV log."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import pandas as pd

EPOCH_COLUMNS = ("train_loss", "val_loss", "train_acc", "val_acc", "val_auroc", "images_per_s")


def epoch_metrics(lightning_csv: str | Path) -> pd.DataFrame:
    """One row per epoch: the epoch-level values Lightning logged (step-level throughput averaged)."""
    raw = pd.read_csv(lightning_csv)
    columns = [c for c in EPOCH_COLUMNS if c in raw.columns]
    table = raw.groupby("epoch")[columns].agg(lambda values: values.dropna().mean() if len(values.dropna()) else None)
    return table.reset_index()


def save_training_curves(lightning_csv: str | Path, out_csv: str | Path, out_png: str | Path) -> pd.DataFrame:
    """Write the per-epoch table (CSV) and a loss / accuracy figure (train vs validation); returns the table."""
    table = epoch_metrics(lightning_csv)
    table.to_csv(out_csv, index=False)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    epochs = table["epoch"] + 1
    for column, label, axis in (
        ("train_loss", "train", loss_ax),
        ("val_loss", "validation", loss_ax),
        ("train_acc", "train", acc_ax),
        ("val_acc", "validation", acc_ax),
        ("val_auroc", "validation AUROC", acc_ax),
    ):
        if column in table and table[column].notna().any():
            axis.plot(epochs, table[column], marker="o", label=label)
    loss_ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title="accuracy", xlabel="epoch", ylabel="score", ylim=(0, 1.02))
    for axis in (loss_ax, acc_ax):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return table
