"""Explanations over a whole split: how much CAM energy falls on the cell, and a gallery of confident cases."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from blastscan.data.images import load_rgb, resize_rgb
from blastscan.data.manifest import Manifest
from blastscan.explain.cam import compute_cams, overlay_grid
from blastscan.explain.localisation import localisation_summary
from blastscan.imaging.segmentation import WORKING_SIZE, segment_cell
from blastscan.inference.torch_backend import TorchPredictor

#: ScoreCAM needs one forward pass per channel: too slow for a whole split on a CPU, so it is not a default.
DEFAULT_METHODS = ("gradcam", "gradcam++", "eigencam")


def localisation_table(
    predictor: TorchPredictor,
    manifest: Manifest,
    rows: Sequence[int],
    targets: np.ndarray,
    methods: Sequence[str] = DEFAULT_METHODS,
    batch_size: int = 16,
    max_images: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Per method and class: mean share of CAM energy inside the segmented cell (nucleus + cytoplasm).

    CAMs are computed on the images exactly as the model sees them (with its cell focus, if any) and the cell is
    looked for in that same view. At most `max_images` images are used (a seeded random sample, so CPU runs stay
    short); images whose cell cannot be segmented are left out (counted in `n_not_segmented`).
    """
    rows, targets = np.asarray(rows), np.asarray(targets)
    if len(rows) > max_images:
        chosen = np.sort(np.random.default_rng(seed).choice(len(rows), max_images, replace=False))
        rows, targets = rows[chosen], targets[chosen]
    paths = manifest.absolute_paths()
    if predictor.focus.active:
        views = [predictor.prepare_with_cell_mask(paths[int(r)]) for r in rows]
    else:
        # The image at the segmentation's working size, segmented there and fed to the network from there (as
        # since the first release, so earlier reports' shares stay comparable).
        images = [resize_rgb(load_rgb(paths[int(r)], min_side=WORKING_SIZE), WORKING_SIZE) for r in rows]
        segmented = [segment_cell(image) for image in images]
        views = [(predictor.prepare(im), s.cell if s.ok else None) for im, s in zip(images, segmented, strict=True)]
    keep = [i for i, (_, mask) in enumerate(views) if mask is not None]
    masks = [views[i][1] for i in keep]
    labels = np.asarray(targets)[keep]
    tables = []
    for method in methods:
        cams = []
        for start in range(0, len(keep), batch_size):
            chunk = np.stack([views[i][0] for i in keep[start : start + batch_size]])
            cams.append(compute_cams(predictor.model, predictor.to_input(chunk), method=method))
        stacked = np.concatenate(cams) if cams else np.zeros((0, 1, 1))
        tables.append(localisation_summary(stacked, masks, labels, method))
    table = pd.concat(tables, ignore_index=True)
    table["label"] = table["label"].map({0: "normal", 1: "leukemic"}).fillna(table["label"])
    table["n_not_segmented"] = len(rows) - len(keep)
    return table


def plot_localisation(table: pd.DataFrame, out: Path) -> Path:
    """Bars: share of CAM energy inside the cell, per method and class (error bars: sd)."""
    methods = list(dict.fromkeys(table["method"]))
    labels = list(dict.fromkeys(table["label"]))
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    width = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        block = table[table["label"] == label].set_index("method").reindex(methods)
        ax.bar(
            np.arange(len(methods)) + k * width, block["mean"], width, yerr=block["sd"].fillna(0),
            capsize=3, label=str(label),
        )  # fmt: skip
    ax.set_xticks(np.arange(len(methods)) + width * (len(labels) - 1) / 2, methods)
    ax.set(ylim=(0, 1.05), ylabel="share of CAM energy inside the cell", title="Does the model look at the cell?")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def confident_cases_gallery(
    predictor: TorchPredictor,
    manifest: Manifest,
    rows: np.ndarray,
    targets: np.ndarray,
    probability: np.ndarray,
    threshold: float,
    out: Path,
    per_case: int = 2,
    method: str = "gradcam",
) -> Path:
    """Grad-CAM overlays of the most confident true positives, true negatives, false positives, false negatives,
    on the images as the model saw them (framed on the cell when the run has a cell focus)."""
    called = probability >= threshold
    cases = {
        "true positive": np.flatnonzero(called & (targets == 1)),
        "true negative": np.flatnonzero(~called & (targets == 0)),
        "false positive": np.flatnonzero(called & (targets == 0)),
        "false negative": np.flatnonzero(~called & (targets == 1)),
    }
    items = []
    paths = manifest.absolute_paths()
    for name, found in cases.items():
        # Confidence in the call made: p for positive calls, 1 - p for negative ones.
        confidence = probability[found] if name.endswith("positive") else 1 - probability[found]
        for index in found[np.argsort(-confidence)][:per_case]:
            image = predictor.prepare(paths[int(rows[index])])
            cam = compute_cams(predictor.model, predictor.to_input(image[None]), method=method)[0]
            items.append((image, cam, f"{name}, p={probability[index]:.2f}"))
    return overlay_grid(items, out, columns=4)
