"""Evaluation figures: each function draws one PNG from plain arrays or tables and returns its path.

Every function draws something for degenerate input (one class, no rows, missing columns): a panel that says
what is missing, so a run never loses its report to a plot.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

DPI = 120
NEGATIVE_COLOR = "#2b6cb0"  # normal
POSITIVE_COLOR = "#c53030"  # leukemic
ACCENT_COLOR = "#2f855a"
GRID_ALPHA = 0.3
FPR_GRID = np.linspace(0.0, 1.0, 201)
EN_DASH = "\u2013"


def _save(fig: Figure, out: str | Path) -> Path:
    # Figure without pyplot: no global state, nothing to close, safe from worker threads.
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white")
    return out


def _message(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11, color="#4a5568", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _placeholder(out: str | Path, title: str, text: str, figsize: tuple[float, float] = (6, 4)) -> Path:
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    _message(ax, text)
    return _save(fig, out)


def _binary_inputs(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p differ in length ({len(y)} labels, {len(p)} scores)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold 0 (normal) and 1 (leukemic) only")
    if not np.isfinite(p).all():
        raise ValueError("p holds NaN or infinite scores")
    return y, p


def _one_class_text(y: np.ndarray, what: str) -> str | None:
    if len(y) == 0:
        return f"{what} undefined: no samples"
    if len(np.unique(y)) < 2:
        only = "leukemic" if y[0] == 1 else "normal"
        return f"{what} undefined: every sample is {only} (n={len(y)});\nboth classes are needed"
    return None


def _roc_on_grid(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    fpr, tpr, _ = roc_curve(y, p)
    # Vertical steps repeat an FPR; the curve's value there is the highest TPR reached.
    unique_fpr, starts = np.unique(fpr, return_index=True)
    highest = np.maximum.reduceat(tpr, starts)
    return np.interp(FPR_GRID, unique_fpr, highest)


def _bootstrap_indices(rng: np.random.Generator, n: int, groups: np.ndarray | None) -> np.ndarray:
    if groups is None:
        return rng.integers(0, n, n)
    codes, _ = pd.factorize(pd.Series(groups), sort=True)
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    picked = rng.integers(0, len(members), len(members))
    return np.concatenate([members[g] for g in picked])


def plot_roc(
    y: Any,
    p: Any,
    out: str | Path,
    operating_point: tuple[float, float] | None = None,
    n_boot: int = 200,
    groups: Any = None,
    seed: int = 0,
) -> Path:
    """ROC curve with a 95% percentile bootstrap band and AUROC (with its bootstrap CI) in the legend.

    `groups` (e.g. patient IDs) makes the bootstrap resample whole groups. `operating_point` is the (FPR, TPR)
    reached on this data by the threshold chosen on validation for 95% specificity; it is marked.
    """
    y, p = _binary_inputs(y, p)
    undefined = _one_class_text(y, "ROC")
    if undefined:
        return _placeholder(out, "ROC curve", undefined, figsize=(5.5, 5.5))
    group_array = None if groups is None else np.asarray(groups).ravel()
    if group_array is not None and len(group_array) != len(y):
        raise ValueError(f"groups has {len(group_array)} entries for {len(y)} samples")

    auroc = roc_auc_score(y, p)
    fpr, tpr, _ = roc_curve(y, p)
    rng = np.random.default_rng(seed)
    curves, aucs = [], []
    for _ in range(n_boot):
        idx = _bootstrap_indices(rng, len(y), group_array)
        if len(np.unique(y[idx])) < 2:  # a resample with one class has no ROC
            continue
        curves.append(_roc_on_grid(y[idx], p[idx]))
        aucs.append(roc_auc_score(y[idx], p[idx]))

    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    label = f"AUROC {auroc:.3f}"
    if len(aucs) >= 10:
        low, high = np.percentile(aucs, [2.5, 97.5])
        label += f" (95% CI {low:.3f}{EN_DASH}{high:.3f})"
        band_low, band_high = np.percentile(np.vstack(curves), [2.5, 97.5], axis=0)
        unit = "by group" if group_array is not None else "by sample"
        ax.fill_between(
            FPR_GRID,
            band_low,
            band_high,
            color=POSITIVE_COLOR,
            alpha=0.18,
            linewidth=0,
            label=f"95% bootstrap band ({len(curves)} resamples, {unit})",
        )
    ax.plot(fpr, tpr, color=POSITIVE_COLOR, linewidth=2, label=label, drawstyle="default")
    ax.plot([0, 1], [0, 1], linestyle="--", color="#a0aec0", linewidth=1, label="chance")
    op_fpr, op_tpr = (float(v) for v in operating_point) if operating_point is not None else (np.nan, np.nan)
    if np.isfinite(op_fpr) and np.isfinite(op_tpr):
        ax.plot(
            op_fpr,
            op_tpr,
            marker="o",
            markersize=9,
            color="black",
            markerfacecolor="#f6e05e",
            linestyle="none",
            label=f"validation threshold for 95% spec.\n(sens. {op_tpr:.3f}, spec. {1 - op_fpr:.3f} here)",
        )
    ax.set(
        title=f"ROC curve (n={len(y)}, {int(y.sum())} leukemic)",
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
    )
    ax.grid(alpha=GRID_ALPHA)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out)


def plot_precision_recall(y: Any, p: Any, out: str | Path) -> Path:
    """Precision-recall curve with average precision in the legend and the prevalence (chance) baseline."""
    y, p = _binary_inputs(y, p)
    undefined = _one_class_text(y, "Precision-recall")
    if undefined:
        return _placeholder(out, "Precision-recall curve", undefined, figsize=(5.5, 5.5))
    precision, recall, _ = precision_recall_curve(y, p)
    ap = average_precision_score(y, p)
    prevalence = float(y.mean())
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", color=POSITIVE_COLOR, linewidth=2, label=f"AP {ap:.3f}")
    ax.axhline(prevalence, linestyle="--", color="#a0aec0", linewidth=1, label=f"prevalence {prevalence:.3f}")
    ax.set(
        title=f"Precision-recall (n={len(y)}, {int(y.sum())} leukemic)",
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.03),
        aspect="equal",
    )
    ax.grid(alpha=GRID_ALPHA)
    ax.legend(loc="lower left", fontsize=9)
    return _save(fig, out)


def plot_confusion_matrix(
    matrix: Any,
    out: str | Path,
    labels: Sequence[str] = ("normal", "leukemic"),
    threshold: float | None = None,
) -> Path:
    """Confusion matrix (rows: true class, columns: predicted) with counts and row percentages in each cell."""
    counts = np.asarray(matrix, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {counts.shape}")
    if len(labels) != counts.shape[0]:
        raise ValueError(f"{len(labels)} labels for a {counts.shape[0]}x{counts.shape[0]} matrix")
    row_totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(row_totals > 0, counts / row_totals, np.nan)
    size = 1.6 + 1.5 * counts.shape[0]
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.nan_to_num(share), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    for (row, col), n in np.ndenumerate(counts):
        fraction = share[row, col]
        text = f"{int(n)}\n({fraction:.1%})" if np.isfinite(fraction) else f"{int(n)}\n(—)"
        color = "white" if np.isfinite(fraction) and fraction > 0.55 else "black"
        ax.text(col, row, text, ha="center", va="center", fontsize=12, color=color)
    ticks = np.arange(counts.shape[0])
    ax.set_xticks(ticks, labels=list(labels))
    ax.set_yticks(ticks, labels=list(labels))
    title = "Confusion matrix"
    if threshold is not None:
        title += f" (threshold {threshold:.3f})"
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    return _save(fig, out)


def plot_reliability(
    mean_predicted: Any,
    observed_frequency: Any,
    counts: Any,
    out: str | Path,
    ece: float | None = None,
    ece_calibrated: float | None = None,
    bin_edges: Any = None,
) -> Path:
    """Reliability diagram (observed leukemic frequency vs mean predicted probability per bin) over a histogram
    of how many samples fall in each bin. Bins are equal-width on [0, 1] unless `bin_edges` is given; empty bins
    (count 0 or NaN values) are skipped.
    """
    predicted = np.asarray(mean_predicted, dtype=float).ravel()
    observed = np.asarray(observed_frequency, dtype=float).ravel()
    n = np.nan_to_num(np.asarray(counts, dtype=float).ravel())
    if not (len(predicted) == len(observed) == len(n)):
        raise ValueError("mean_predicted, observed_frequency and counts must have one value per bin")
    edges = np.linspace(0, 1, len(n) + 1) if bin_edges is None else np.asarray(bin_edges, dtype=float).ravel()
    if len(edges) != len(n) + 1:
        raise ValueError(f"{len(edges)} bin edges for {len(n)} bins")

    fig = Figure(figsize=(5.5, 6.5), layout="constrained")
    curve_ax, hist_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    curve_ax.plot([0, 1], [0, 1], linestyle="--", color="#a0aec0", linewidth=1, label="perfect calibration")
    filled = (n > 0) & np.isfinite(predicted) & np.isfinite(observed)
    label = "model"
    if ece is not None:
        label += f" (ECE {ece:.3f})"
    if filled.any():
        curve_ax.plot(predicted[filled], observed[filled], marker="o", color=POSITIVE_COLOR, linewidth=2, label=label)
        for x, y_obs in zip(predicted[filled], observed[filled], strict=True):
            curve_ax.plot([x, x], [x, y_obs], color=POSITIVE_COLOR, alpha=0.35, linewidth=1)  # the gap per bin
    else:
        curve_ax.text(0.5, 0.5, "no samples in any bin", ha="center", va="center", color="#4a5568")
    title = "Reliability diagram"
    if ece_calibrated is not None:
        title += (
            "\n"
            + (f"ECE {ece:.3f} → " if ece is not None else "ECE ")
            + f"{ece_calibrated:.3f} after temperature scaling"
        )
    curve_ax.set(title=title, ylabel="observed leukemic frequency", xlim=(0, 1), ylim=(-0.02, 1.02))
    curve_ax.grid(alpha=GRID_ALPHA)
    curve_ax.legend(loc="upper left", fontsize=9)

    hist_ax.bar(edges[:-1], n, width=np.diff(edges), align="edge", color="#718096", edgecolor="white")
    hist_ax.set(xlabel="mean predicted probability (leukemic)", ylabel="samples")
    if n.max(initial=0) > 0 and n[n > 0].min() * 50 < n.max():
        hist_ax.set_yscale("log")  # confident models pile up in the end bins
    hist_ax.grid(alpha=GRID_ALPHA, axis="y")
    return _save(fig, out)


def plot_score_distribution(y: Any, p: Any, out: str | Path, threshold: float | None = None) -> Path:
    """Histograms (as densities) of the predicted leukemic probability for each true class, with the threshold."""
    y, p = _binary_inputs(y, p)
    if len(y) == 0:
        return _placeholder(out, "Score distribution", "no samples")
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 41) if p.min() >= 0 and p.max() <= 1 else 40
    for value, name, color in ((0, "normal", NEGATIVE_COLOR), (1, "leukemic", POSITIVE_COLOR)):
        scores = p[y == value]
        if len(scores) == 0:
            continue
        ax.hist(scores, bins=bins, density=True, alpha=0.35, color=color, label=f"true {name} (n={len(scores)})")
        ax.hist(scores, bins=bins, density=True, histtype="step", linewidth=1.5, color=color)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.5, label=f"threshold {threshold:.3f}")
    ax.set(
        title="Predicted probability by true class",
        xlabel="predicted probability (leukemic)",
        ylabel="density",
    )
    ax.grid(alpha=GRID_ALPHA)
    ax.legend(fontsize=9)
    return _save(fig, out)


def plot_training_curves(metrics_csv: str | Path, out: str | Path) -> Path:
    """Loss (train vs validation) and accuracy (train vs validation, plus validation AUROC) per epoch.

    Reads a per-epoch CSV (`epoch`, `train_loss`, `val_loss`, `train_acc`, `val_acc`, `val_auroc`, any missing);
    rows repeated per epoch, as in Lightning's raw log, are averaged. Lightning's 0-based epochs are shown 1-based.
    """
    table = pd.read_csv(metrics_csv)
    if "epoch" not in table:
        table = table.assign(epoch=np.arange(len(table)))
    columns = [c for c in ("train_loss", "val_loss", "train_acc", "val_acc", "val_auroc") if c in table]
    table = table.groupby("epoch")[columns].mean().reset_index() if columns else table
    epochs = table["epoch"] + 1

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    accuracy_series = (("train_acc", "train"), ("val_acc", "validation"), ("val_auroc", "validation AUROC"))
    for axis, series, empty_text in (
        (loss_ax, (("train_loss", "train"), ("val_loss", "validation")), "no loss logged"),
        (acc_ax, accuracy_series, "no accuracy logged"),
    ):
        drawn = False
        for column, label in series:
            if column in table and table[column].notna().any():
                values = table[column]
                style = {"linestyle": ":"} if column == "val_auroc" else {}
                axis.plot(epochs[values.notna()], values.dropna(), marker="o", markersize=4, label=label, **style)
                drawn = True
        if drawn:
            axis.legend(fontsize=9)
            axis.grid(alpha=GRID_ALPHA)
        else:
            _message(axis, empty_text)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="loss")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="score", ylim=(0, 1.02))
    if "val_loss" in table and table["val_loss"].notna().any():
        best = table["val_loss"].idxmin()
        late = best >= len(table) / 2  # put the label on the side with room
        loss_ax.axvline(epochs[best], color="#a0aec0", linestyle="--", linewidth=1)
        loss_ax.annotate(
            "lowest val. loss",
            (epochs[best], 1),
            xycoords=("data", "axes fraction"),
            xytext=(-3 if late else 3, -12),
            textcoords="offset points",
            ha="right" if late else "left",
            fontsize=8,
            color="#4a5568",
        )
    return _save(fig, out)


def plot_metric_boxplot(
    table: pd.DataFrame,
    out: str | Path,
    metrics: Sequence[str] = ("roc_auc", "f1", "accuracy"),
) -> Path:
    """Cross-validation spread: one box per metric over the folds (rows of `table`), each fold's value overlaid."""
    present = [m for m in metrics if m in table and pd.to_numeric(table[m], errors="coerce").notna().any()]
    if not present:
        return _placeholder(out, "Cross-validation", f"none of {', '.join(metrics)} in the fold table")
    values = [pd.to_numeric(table[m], errors="coerce").dropna().to_numpy() for m in present]
    fig = Figure(figsize=(1.8 + 1.6 * len(present), 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot(values, widths=0.5, showfliers=False, medianprops={"color": POSITIVE_COLOR, "linewidth": 2})
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is repeatable
    for position, column in enumerate(values, start=1):
        x = position + rng.uniform(-0.12, 0.12, len(column))
        ax.scatter(x, column, s=22, color=NEGATIVE_COLOR, alpha=0.8, zorder=3, edgecolor="white", linewidth=0.5)
    tick_labels = [
        f"{m}\n{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{m}\n{v.mean():.3f}"
        for m, v in zip(present, values, strict=True)
    ]
    ax.set_xticks(range(1, len(present) + 1), labels=tick_labels)
    low = min(v.min() for v in values)
    ax.set(
        title=f"Cross-validation over {max(len(v) for v in values)} folds (mean ± SD)",
        ylabel="score",
        ylim=(max(0.0, low - 0.05) if low >= 0 else None, 1.01 if max(v.max() for v in values) <= 1 else None),
    )
    ax.grid(alpha=GRID_ALPHA, axis="y")
    return _save(fig, out)


def plot_transfer_heatmap(matrix: pd.DataFrame, out: str | Path, title: str) -> Path:
    """Cross-dataset transfer: train dataset (rows) by test dataset (columns), each cell annotated.

    Cells where a dataset is tested on itself are outlined; NaN cells (not run) show a dash.
    """
    values = matrix.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    if values.size == 0:
        return _placeholder(out, title, "no train/test pairs")
    finite = values[np.isfinite(values)]
    vmin = min(0.5, float(finite.min())) if finite.size else 0.5
    rows, cols = values.shape
    fig = Figure(figsize=(2.4 + 1.3 * cols, 1.6 + 0.9 * rows), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.85)
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            shade = (value - vmin) / (1.0 - vmin) if vmin < 1 else 1.0
            ax.text(col, row, f"{value:.3f}", ha="center", va="center", color="black" if shade > 0.6 else "white")
        else:
            ax.text(col, row, "—", ha="center", va="center", color="#4a5568")
        if str(matrix.index[row]) == str(matrix.columns[col]):
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=2.5))
    ax.set_xticks(range(cols), labels=[str(c) for c in matrix.columns], rotation=30, ha="right")
    ax.set_yticks(range(rows), labels=[str(i) for i in matrix.index])
    ax.set(title=title, xlabel="tested on", ylabel="trained on")
    return _save(fig, out)


def image_gallery(items: list[dict[str, Any]], out: str | Path, columns: int = 4) -> Path:
    """A grid of images with titles (e.g. the most confident errors); items are {"image": HxWx3 uint8, "title"}.

    An empty list writes a small placeholder that says there is nothing to show.
    """
    if not items:
        return _placeholder(out, "Gallery", "no images to show", figsize=(4, 1.6))
    columns = max(1, min(columns, len(items)))
    rows = int(np.ceil(len(items) / columns))
    fig = Figure(figsize=(3.0 * columns, 3.3 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, item in zip(axes, items, strict=False):
        image = np.asarray(item["image"])
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        title = "\n".join(textwrap.wrap(str(item.get("title", "")), 32)[:3])
        ax.set_title(title, fontsize=9, parse_math=False)  # user text: "$" is not mathtext
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(items) :]:
        ax.set_axis_off()
    return _save(fig, out)


def plot_ood_scores(groups: dict[str, np.ndarray], out: str | Path, threshold: float | None, method: str) -> Path:
    """Histograms of an in-distribution score per image set (the first set is the in-domain one), with the flag
    threshold; a log scale when the scores span decades."""
    kept = {name: np.asarray(v, dtype=float)[np.isfinite(v)] for name, v in groups.items()}
    kept = {name: v for name, v in kept.items() if len(v)}
    if not kept:
        return _placeholder(out, f"{method} scores", "no finite scores to plot")
    everything = np.concatenate(list(kept.values()))
    log = everything.min() > 0 and everything.max() / max(everything.min(), 1e-12) > 100
    edges = (
        np.geomspace(everything.min(), everything.max(), 50)
        if log
        else np.linspace(everything.min(), everything.max(), 50)
    )
    fig = Figure(figsize=(7.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, values in kept.items():
        ax.hist(values, bins=edges, histtype="step", linewidth=1.6, density=True, label=f"{name} ({len(values)})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="flag threshold")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(f"{method} score (higher = less like the training cells)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.grid(alpha=GRID_ALPHA)
    return _save(fig, out)


def plot_selective_accuracy(curves: dict[str, list[dict[str, float]]], out: str | Path) -> Path:
    """Accuracy vs coverage (selective prediction), one line per image set and abstention rule."""
    if not curves:
        return _placeholder(out, "Selective prediction", "no labelled images to draw the curve")
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, rows in curves.items():
        ax.plot([r["coverage"] for r in rows], [r["accuracy"] for r in rows], marker="o", markersize=3, label=name)
    ax.invert_xaxis()
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy on the answered images")
    ax.legend(fontsize=8)
    ax.grid(alpha=GRID_ALPHA)
    return _save(fig, out)


def plot_estimates_with_ci(
    names: Sequence[str],
    values: Sequence[float],
    intervals: Sequence[Sequence[float]],
    out: str | Path,
    title: str,
    xlabel: str,
    reference: float | None = None,
) -> Path:
    """One row per model: the estimate as a dot with its 95% CI as a bar (a forest plot), an optional reference
    line (e.g. chance, 0.5)."""
    if not len(names):
        return _placeholder(out, title, "no models to compare")
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    rows = np.arange(len(names))[::-1]
    low = np.array([ci[0] for ci in intervals], dtype=float)
    high = np.array([ci[1] for ci in intervals], dtype=float)
    estimate = np.asarray(values, dtype=float)
    ax.errorbar(
        estimate, rows, xerr=[np.clip(estimate - low, 0, None), np.clip(high - estimate, 0, None)], fmt="o",
        color=POSITIVE_COLOR, ecolor="#4a5568", capsize=3,
    )  # fmt: skip
    for row, value in zip(rows, estimate, strict=True):
        ax.annotate(f"{value:.3f}", (value, row), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if reference is not None:
        ax.axvline(reference, color="#a0aec0", linestyle="--", linewidth=1)
    ax.set_yticks(rows, labels=list(names))
    ax.set(title=title, xlabel=xlabel)
    ax.grid(alpha=GRID_ALPHA, axis="x")
    return _save(fig, out)


def plot_reliability_curves(curves: dict[str, dict[str, np.ndarray]], out: str | Path, title: str) -> Path:
    """Several models' reliability curves (from `metrics.reliability_curve`) on one diagram, empty bins skipped."""
    if not curves:
        return _placeholder(out, title, "no probabilistic models")
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="#a0aec0", linewidth=1, label="perfect calibration")
    for name, curve in curves.items():
        filled = np.asarray(curve["counts"]) > 0
        ax.plot(
            np.asarray(curve["mean_predicted"])[filled], np.asarray(curve["observed_frequency"])[filled],
            marker="o", markersize=4, label=name,
        )  # fmt: skip
    ax.set(title=title, xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=GRID_ALPHA)
    return _save(fig, out)
