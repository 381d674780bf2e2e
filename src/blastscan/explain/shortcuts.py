"""`shortcut_audit`: does a run's model read the leukocyte, or the slide around it?

Three views of the run's test images are scored with the run's own model: the original images, the cell removed
(only background left) and the background removed (only the cell left). A background-only probe, a logistic
regression on colour and texture statistics of the background pixels, is trained on the train split. When the
background alone predicts the label well, the dataset carries a shortcut (slide, stain batch, illumination) that a
CNN can learn instead of the morphology.

Cells are found by `blastscan.baselines.segmentation.segment_cell` on a 128-px copy of each source image; the cell
mask is dilated by `DILATE_PX` (so the cell's halo goes with it) and resized to the model's input size. Images that
cannot be segmented are kept unmasked in every view and counted in the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure
from scipy import ndimage as ndi
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from blastscan.baselines.segmentation import WORKING_SIZE, segment_cell
from blastscan.data.images import load_rgb, resize_rgb
from blastscan.data.manifest import Manifest, read_manifest
from blastscan.data.parallel import threaded_map
from blastscan.data.splits import read_splits
from blastscan.errors import ConfigError
from blastscan.evaluation import figures
from blastscan.evaluation.evaluate import jsonable
from blastscan.evaluation.metrics import metrics_with_ci, threshold_for_specificity, youden_threshold
from blastscan.evaluation.predict import RunModel, cache_for, load_run_model, predict_logits, probabilities
from blastscan.explain.localisation import resize_mask
from blastscan.training.config import parse_config
from blastscan.training.prepare import class_targets

__all__ = [
    "CONDITIONS",
    "PROBE",
    "ShortcutReport",
    "background_features",
    "cell_mask",
    "remove_background",
    "remove_cell",
    "shortcut_audit",
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


def _background_colour(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    background = image[~mask]
    return np.median(background, axis=0) if len(background) else None


def remove_cell(image: np.ndarray, mask: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """`image` with the pixels inside `mask` set to the median colour of its own background (outside `mask`).

    An empty mask leaves the image unchanged; a mask covering everything uses `fallback` (or grey).
    """
    colour = _background_colour(image, mask)
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
class _Segmented:
    masks: np.ndarray  # (N, S, S) bool, dilated, at the model's input size
    ok: np.ndarray  # (N,) bool
    features: np.ndarray  # (N, F) background features at 128 px


def _segment_rows(manifest: Manifest, rows: np.ndarray, size: int, workers: int) -> _Segmented:
    paths = manifest.absolute_paths()

    def one(row: int) -> tuple[np.ndarray, bool, np.ndarray]:
        working = resize_rgb(load_rgb(paths[row], min_side=WORKING_SIZE), WORKING_SIZE)
        mask, ok = cell_mask(working, WORKING_SIZE)
        return resize_mask(mask, (size, size)), ok, background_features(working, mask)

    done = threaded_map(one, [int(r) for r in rows], workers=workers)
    return _Segmented(
        masks=np.stack([d[0] for d in done]) if done else np.zeros((0, size, size), dtype=bool),
        ok=np.array([d[1] for d in done], dtype=bool),
        features=np.stack([d[2] for d in done]) if done else np.zeros((0, 0)),
    )


# ------------------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def _logits(run_model: RunModel, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, 2) logits of (N, S, S, 3) uint8 images, normalised as the run's model expects."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        outputs.append(run_model.model(run_model.normalize(batch, train=False)).float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 2), dtype=np.float32)


def shortcut_audit(
    run_dir: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    probe_c: float = 1.0,
    n_examples: int = 4,
    workers: int = 4,
    log: Callable[[str], None] | None = None,
) -> ShortcutReport:
    """Score `run_dir`'s model on its `split` as is, with the cell removed and with the background removed, and a
    background-only probe trained on the train split; write shortcuts.json, shortcuts.md, shortcuts.png and
    shortcut_examples.png to `out_dir` (default `run_dir/eval/shortcuts-<split>`).

    Thresholds (Youden and 95% specificity) come from the validation split: the model's on the original validation
    images, the probe's on its validation scores. Intervals are bootstraps over patients when known, else images.
    `probe_c` is the probe's inverse L2 strength; `log` receives progress lines.
    """
    started = time.perf_counter()
    say = log or (lambda _message: None)
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    config = parse_config(yaml.safe_load(config_path.read_text()), source=str(config_path))
    manifest = read_manifest(run_dir / "manifest.csv")
    splits = read_splits(run_dir / "splits.csv", manifest).table["split"].astype(str).to_numpy()
    rows = {name: np.flatnonzero(splits == name) for name in ("train", "val", split)}
    for name, chosen in rows.items():
        if len(chosen) == 0:
            raise ConfigError(f"{run_dir}: the split {name!r} is empty; choose one of {sorted(set(splits))}")
    targets = class_targets(manifest, config.data.positive_label)
    patients = manifest.table["patient_id"].astype(str).to_numpy() if manifest.has_patients else None
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval" / f"shortcuts-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)

    run_model = load_run_model(run_dir)
    size = run_model.image_size
    cache = cache_for(run_model, manifest, config.data.cache_dir)
    say(f"segmenting {sum(len(r) for r in rows.values())} images")
    segmented = {name: _segment_rows(manifest, chosen, size, workers) for name, chosen in rows.items()}

    # The neutral colour that replaces the background: the median glass colour of the training images, so the
    # cell-only view carries no per-image glass colour.
    train_images = cache.array()[rows["train"]]
    glass = [
        _background_colour(image, mask)
        for image, mask, ok in zip(train_images, segmented["train"].masks, segmented["train"].ok, strict=True)
        if ok
    ]
    neutral = np.median(np.stack(glass), axis=0) if glass else np.full(3, 255.0)

    val_logits = predict_logits(run_model, cache, rows["val"])
    p_val, y_val = probabilities(val_logits), targets[rows["val"]]
    threshold, threshold_95 = youden_threshold(y_val, p_val), threshold_for_specificity(y_val, p_val, 0.95)

    test_rows, test_seg = rows[split], segmented[split]
    y_test = targets[test_rows]
    groups = patients[test_rows] if patients is not None else None
    originals = cache.array()[test_rows]
    views = {
        "original": originals,
        "cell_removed": np.stack(
            [remove_cell(im, m, neutral) for im, m in zip(originals, test_seg.masks, strict=True)]
        ),
        "background_removed": np.stack(
            [remove_background(im, m, neutral) for im, m in zip(originals, test_seg.masks, strict=True)]
        ),
    }
    conditions: dict[str, dict[str, Any]] = {}
    for name in CONDITIONS:
        say(f"scoring {name}")
        p = probabilities(_logits(run_model, views[name]))
        conditions[name] = metrics_with_ci(y_test, p, threshold, threshold_95, groups, n_boot, seed)

    say("training the background-only probe")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=probe_c, max_iter=5000))
    probe.fit(segmented["train"].features, targets[rows["train"]])
    p_probe_val = probe.predict_proba(segmented["val"].features)[:, 1]
    p_probe = probe.predict_proba(test_seg.features)[:, 1]
    conditions[PROBE] = metrics_with_ci(
        y_test,
        p_probe,
        youden_threshold(y_val, p_probe_val),
        threshold_for_specificity(y_val, p_probe_val, 0.95),
        groups,
        n_boot,
        seed,
    )

    picks = _example_rows(y_test, n_examples)
    examples = {name: views[name][picks] for name in CONDITIONS} | {"cell_mask": test_seg.masks[picks]}
    n_unsegmented = int((~test_seg.ok).sum())
    report = ShortcutReport(
        out_dir=out_dir,
        run_dir=run_dir,
        split=split,
        n_images=len(test_rows),
        n_unsegmented=n_unsegmented,
        conditions=conditions,
        seconds=0.0,
        examples=examples,
    )
    paths = manifest.table["path"].astype(str).to_numpy()
    report.files["examples"] = _examples_figure(
        out_dir / "shortcut_examples.png", examples, y_test[picks], test_seg.ok[picks]
    )
    report.files["chart"] = _auroc_chart(out_dir / "shortcuts.png", report)
    report.seconds = time.perf_counter() - started
    details = {
        "run": str(run_dir),
        "split": split,
        "n_images": len(test_rows),
        "n_unsegmented": n_unsegmented,
        "unsegmented_paths": paths[test_rows][~test_seg.ok].tolist(),
        "n_unsegmented_train_val": {n: int((~segmented[n].ok).sum()) for n in ("train", "val")},
        "masking": {
            "segmentation": f"segment_cell at {WORKING_SIZE} px, cell mask dilated by {DILATE_PX} px",
            "cell_removed": "pixels in the cell mask set to the image's own median background colour",
            "background_removed": "pixels outside the cell mask set to the train split's median glass colour",
            "neutral_colour": neutral.tolist(),
            "unsegmented": "kept unmasked in every view",
        },
        "thresholds": {"chosen_on": "validation, original images", "youden": threshold, "spec95": threshold_95},
        "probe": {
            "features": "background RGB mean/sd/percentiles, colour histograms, gradient and Laplacian energy",
            "model": f"StandardScaler + LogisticRegression(C={probe_c})",
            "trained_on": "train",
            "threshold_on": "val",
        },
        "conditions": conditions,
        "seconds": report.seconds,
    }
    report.files["json"] = out_dir / "shortcuts.json"
    report.files["json"].write_text(json.dumps(jsonable(details), indent=2))
    report.files["markdown"] = out_dir / "shortcuts.md"
    report.files["markdown"].write_text(shortcut_markdown(report))
    say(f"done in {report.seconds:.1f} s")
    return report


def _example_rows(y: np.ndarray, n: int) -> np.ndarray:
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


def _auroc_chart(out: Path, report: ShortcutReport) -> Path:
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


def _examples_figure(out: Path, examples: dict[str, np.ndarray], labels: np.ndarray, ok: np.ndarray) -> Path:
    items = []
    for i, label in enumerate(labels):
        for name in CONDITIONS:
            note = "" if ok[i] else " [not segmented]"
            items.append({"image": examples[name][i], "title": f"{'leukemic' if label else 'normal'}: {name}{note}"})
    return figures.image_gallery(items, out, columns=len(CONDITIONS))
