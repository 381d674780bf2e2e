"""The shortcut audit's pieces: does a run's model read the leukocyte, or the slide around it?

`blastscan.workflows.shortcuts.shortcut_audit` runs them over a run's splits. Three views of the run's test images
are scored with the run's own model: the original images, the cell removed (only background left) and the
background removed (only the cell left). A background-only probe, a logistic regression on colour and texture
statistics of the background pixels, is trained on the train split. When the background alone predicts the label
well, the dataset carries a shortcut (slide, stain batch, illumination) that a CNN can learn instead of the
morphology.

Cells are found by `blastscan.imaging.segmentation.segment_cell` on a 128-px copy of each source image; the cell
mask is dilated by `DILATE_PX` (so the cell's halo goes with it) and resized to the model's input size. Images that
cannot be segmented are kept unmasked in every view and counted in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import ndimage as ndi

from blastscan.data.images import load_rgb, resize_rgb
from blastscan.data.manifest import Manifest
from blastscan.data.parallel import threaded_map
from blastscan.evaluation import figures
from blastscan.explain.localisation import resize_mask
from blastscan.imaging.segmentation import WORKING_SIZE, disk_dilate, segment_cell
from blastscan.inference import Predictor

__all__ = [
    "CONDITIONS",
    "PROBE",
    "ShortcutReport",
    "background_features",
    "cell_mask",
    "example_rows",
    "remove_background",
    "remove_cell",
    "segment_rows",
]

#: The three views of the images that the run's model is scored on.
CONDITIONS = ("original", "cell_removed", "background_removed")
#: The name of the background-only probe in the report.
PROBE = "background_probe"
#: The cell mask grows by this many pixels (at 128 px) before masking, so no cell rim or halo is left behind.
DILATE_PX = 3
#: Bins per channel of the background colour histogram the probe reads.
HISTOGRAM_BINS = 8

_LABELS = {
    "original": "original",
    "cell_removed": "cell removed (background only)",
    "background_removed": "background removed (cell only)",
    PROBE: "background-only probe (colour/texture + LR)",
}


@dataclass
class ShortcutReport:
    """What `shortcut_audit` found: metrics per condition (CONDITIONS + PROBE) at validation-chosen thresholds.

    `examples` holds the example images of the figure: "original", "cell_removed", "background_removed" as
    (k, S, S, 3) uint8 arrays and "cell_mask" as (k, S, S) bool, the dilated mask the views were made with.
    """

    out_dir: Path
    run_dir: Path
    split: str
    n_images: int
    n_unsegmented: int
    conditions: dict[str, dict[str, Any]]
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    examples: dict[str, np.ndarray] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per condition: AUROC, F1, accuracy and their 95% intervals."""
        rows = []
        for name, metrics in self.conditions.items():
            ci = metrics.get("ci", {})
            rows.append(
                {
                    "condition": name,
                    "roc_auc": metrics["roc_auc"],
                    "roc_auc_ci": ci.get("roc_auc"),
                    "f1": metrics["f1"],
                    "f1_ci": ci.get("f1"),
                    "accuracy": metrics["accuracy"],
                    "accuracy_ci": ci.get("accuracy"),
                    "n_images": metrics["n_images"],
                }
            )
        return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ masks and views


def cell_mask(image: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
    """The dilated cell mask of an (H, W, 3) uint8 image at (size, size), and whether segmentation worked.

    The image is segmented at 128 px (`segment_cell`'s working size); a failed segmentation gives an all-False mask.
    """
    working = resize_rgb(image, WORKING_SIZE)
    seg = segment_cell(working)
    if not seg.ok:
        return np.zeros((size, size), dtype=bool), False
    grown = ndi.distance_transform_edt(~seg.cell) <= DILATE_PX
    return resize_mask(grown, (size, size)), True


def background_colour(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    background = image[~mask]
    return np.median(background, axis=0) if len(background) else None


def remove_cell(image: np.ndarray, mask: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """`image` with the pixels inside `mask` set to the median colour of its own background (outside `mask`).

    An empty mask leaves the image unchanged; a mask covering everything uses `fallback` (or grey).
    """
    colour = background_colour(image, mask)
    if colour is None:
        colour = fallback if fallback is not None else np.full(3, 128.0)
    out = image.copy()
    out[mask] = np.round(colour).astype(np.uint8)
    return out


def remove_background(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """`image` with the pixels outside `mask` set to `colour` (RGB); an empty mask leaves the image unchanged."""
    out = image.copy()
    if mask.any():
        out[~mask] = np.round(np.asarray(colour, dtype=float)).astype(np.uint8)
    return out


def background_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Colour and texture statistics of the pixels outside `mask` (the whole image when nothing is outside).

    Per RGB channel: mean, sd, 10/50/90th percentiles and a HISTOGRAM_BINS-bin histogram; of the grey image: mean
    gradient magnitude and mean absolute Laplacian over the background. Nothing about the cell's shape is kept.
    """
    pixels = image.astype(np.float64) / 255.0
    background = ~mask if (~mask).any() else np.ones(mask.shape, dtype=bool)
    values = pixels[background]
    stats = [values.mean(axis=0), values.std(axis=0), *np.percentile(values, [10, 50, 90], axis=0)]
    histograms = [np.histogram(values[:, c], bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] / len(values) for c in range(3)]
    grey = pixels.mean(axis=2)
    gy, gx = np.gradient(grey)
    texture = [np.hypot(gx, gy)[background].mean(), np.abs(ndi.laplace(grey))[background].mean()]
    return np.concatenate([*stats, *histograms, texture])


@dataclass
class Segmented:
    masks: np.ndarray  # (N, S, S) bool, dilated, at the model's input size
    ok: np.ndarray  # (N,) bool
    features: np.ndarray  # (N, F) background features at 128 px


def segment_rows(
    manifest: Manifest, rows: np.ndarray, size: int, workers: int, predictor: Predictor | None = None
) -> Segmented:
    """Dilated cell masks at the model's size and background features of `rows`. With a `predictor` whose run has a
    cell focus, both come from the framed view the model sees (so the masks line up with its inputs and the probe
    sees the background the model could use); otherwise from the decoded image."""
    paths = manifest.absolute_paths()

    def one(row: int) -> tuple[np.ndarray, bool, np.ndarray]:
        working = resize_rgb(load_rgb(paths[row], min_side=WORKING_SIZE), WORKING_SIZE)
        mask, ok = cell_mask(working, WORKING_SIZE)
        return resize_mask(mask, (size, size)), ok, background_features(working, mask)

    def one_framed(row: int) -> tuple[np.ndarray, bool, np.ndarray]:
        assert predictor is not None
        image, cell = predictor.prepare_with_cell_mask(paths[row])
        working = resize_rgb(image, WORKING_SIZE)
        if cell is None:
            return (
                np.zeros((size, size), dtype=bool),
                False,
                background_features(working, np.zeros((WORKING_SIZE, WORKING_SIZE), bool)),
            )
        grown = disk_dilate(resize_mask(cell, (WORKING_SIZE, WORKING_SIZE)), DILATE_PX)
        return resize_mask(grown, (size, size)), True, background_features(working, grown)

    framed = predictor is not None and predictor.focus.active
    done = threaded_map(one_framed if framed else one, [int(r) for r in rows], workers=workers)
    return Segmented(
        masks=np.stack([d[0] for d in done]) if done else np.zeros((0, size, size), dtype=bool),
        ok=np.array([d[1] for d in done], dtype=bool),
        features=np.stack([d[2] for d in done]) if done else np.zeros((0, 0)),
    )


def example_rows(y: np.ndarray, n: int) -> np.ndarray:
    """Up to `n` rows, alternating classes so both are shown."""
    by_class = [np.flatnonzero(y == c).tolist() for c in (1, 0)]
    picks: list[int] = []
    while len(picks) < n and any(by_class):
        for members in by_class:
            if members and len(picks) < n:
                picks.append(members.pop(0))
    return np.array(picks, dtype=int)


# ------------------------------------------------------------------------------------------------- outputs


def _ci_text(value: float, ci: list[float] | None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if not ci or ci[0] is None or not np.all(np.isfinite(ci)):
        return f"{value:.3f}"
    return f"{value:.3f} ({ci[0]:.3f}{figures.EN_DASH}{ci[1]:.3f})"


def shortcut_markdown(report: ShortcutReport) -> str:
    """The shortcuts.md text: the table of conditions and what each one means."""
    lines = [
        f"# Shortcut audit: {report.run_dir.name} ({report.split}, {report.n_images} images)",
        "",
        "| condition | AUROC (95% CI) | F1 (95% CI) | accuracy |",
        "|---|---|---|---|",
    ]
    for name, m in report.conditions.items():
        ci = m.get("ci", {})
        lines.append(
            f"| {_LABELS.get(name, name)} | {_ci_text(m['roc_auc'], ci.get('roc_auc'))} | "
            f"{_ci_text(m['f1'], ci.get('f1'))} | {m['accuracy']:.3f} |"
        )
    method = next(iter(report.conditions.values())).get("ci_method", "")
    lines += [
        "",
        f"- Cells not segmented (kept unmasked in every view): {report.n_unsegmented} of {report.n_images}.",
        "- The model's thresholds were chosen on the validation split's original images; the probe's on its "
        "validation scores.",
        f"- Intervals: {method}.",
        "- A high AUROC with the cell removed, or for the background-only probe, means the slide around the cell "
        "carries the label: a shortcut the CNN can learn instead of the cell's morphology.",
        f"- Runtime: {report.seconds:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def auroc_chart(out: Path, report: ShortcutReport) -> Path:
    names = list(report.conditions)
    values = np.array([report.conditions[n]["roc_auc"] for n in names], dtype=float)
    cis = [report.conditions[n].get("ci", {}).get("roc_auc") or [np.nan, np.nan] for n in names]
    low = np.array([c[0] if c[0] is not None else np.nan for c in cis], dtype=float)
    high = np.array([c[1] if c[1] is not None else np.nan for c in cis], dtype=float)
    errors = np.nan_to_num(np.vstack([values - low, high - values]), nan=0.0).clip(0.0)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    colours = [figures.NEGATIVE_COLOR] * len(CONDITIONS) + [figures.POSITIVE_COLOR] * (len(names) - len(CONDITIONS))
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(values), yerr=errors, color=colours, capsize=5, alpha=0.85)
    for xi, v in zip(x, values, strict=True):
        ax.text(xi, 0.02, "n/a" if not np.isfinite(v) else f"{v:.2f}", ha="center", color="white", fontsize=10)
    ax.axhline(0.5, color="#4a5568", linestyle="--", linewidth=1)
    ax.text(len(names) - 0.5, 0.51, "chance", ha="right", va="bottom", fontsize=8, color="#4a5568")
    ax.set_xticks(x, [_LABELS.get(n, n).replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUROC (95% CI)")
    ax.set_title(f"Shortcut audit: {report.run_dir.name} on {report.split}")
    ax.grid(axis="y", alpha=figures.GRID_ALPHA)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=figures.DPI, facecolor="white")
    return out


def examples_figure(out: Path, examples: dict[str, np.ndarray], labels: np.ndarray, ok: np.ndarray) -> Path:
    items = []
    for i, label in enumerate(labels):
        for name in CONDITIONS:
            note = "" if ok[i] else " [not segmented]"
            items.append({"image": examples[name][i], "title": f"{'leukemic' if label else 'normal'}: {name}{note}"})
    return figures.image_gallery(items, out, columns=len(CONDITIONS))
