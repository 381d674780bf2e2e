"""Classical ML vs CNN vs hybrid on one split: every model scored on the same test images by the same metric code.

`run_baselines` trains, for each feature set (handcrafted features; ImageNet EfficientNet-Lite0 embeddings; the
embeddings of a trained blastscan run) and each classifier of `classifiers.make_classifiers`, a model tuned by
grouped cross-validation on the training split only. Operating points (Youden, 95% specificity) are chosen on the
validation split, and the test split is scored with `blastscan.evaluation.metrics.metrics_with_ci`, exactly as
`blastscan evaluate` scores a CNN: bootstrap intervals resample patients when the manifest has them, else images.
With a trained run, the CNN itself (end to end) is scored the same way and becomes one more row.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline

from blastscan.baselines.classifiers import (
    CLASSIFIER_NAMES,
    best_params,
    grouped_folds,
    make_classifiers,
    positive_scores,
    tune,
)
from blastscan.baselines.embeddings import CnnEmbeddings
from blastscan.baselines.features import HandcraftedFeatures, SegmentationWarning
from blastscan.data.cache import ImageCache
from blastscan.data.manifest import Manifest, class_targets, patient_ids, read_manifest
from blastscan.data.splits import read_splits
from blastscan.errors import ConfigError, TrainingError
from blastscan.evaluation.figures import DPI, GRID_ALPHA
from blastscan.evaluation.metrics import metrics_with_ci, threshold_for_specificity, youden_threshold
from blastscan.imaging.segmentation import save_segmentation_figure
from blastscan.inference import Predictor, probabilities
from blastscan.runs import RunFolder

#: Metrics stored per model (value and 95% CI); the markdown table and bar chart show the first five.
METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "specificity", "pr_auc", "sensitivity_at_95_specificity")
SHOWN = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1", "roc_auc": "AUROC"}
CNN_MODEL = "CNN (end-to-end)"
FAMILY_COLOURS = {
    "classical ML": ("#1c4e80", "#2b6cb0", "#4299e1", "#90cdf4"),
    "hybrid (ImageNet CNN features)": ("#1c4532", "#2f855a", "#48bb78", "#9ae6b4"),
    "hybrid (trained CNN features)": ("#5f370e", "#b7791f", "#ecc94b", "#faf089"),
    "CNN (end-to-end)": ("#c53030",),
}
_CHUNK = 256  # images per transform call: bounds the memory of one feature-extraction step
EN_DASH = "\u2013"


@dataclass
class FeatureSource:
    """One feature set: its key, its description in tables, its family, and the transformer that makes it."""

    key: str
    features: str
    family: str
    transformer: BaseEstimator
    image_size: int


@dataclass
class BaselineResult:
    """What `run_baselines` made: one table row per model, the files written, and the fitted image classifiers.

    `models` maps "<feature key>/<classifier>" to a fitted Pipeline (feature transformer + classifier) that takes
    (N, H, W, 3) uint8 images (resized inside to the feature set's size) and predicts leukemic (1) vs normal (0).
    """

    out_dir: Path
    table: pd.DataFrame
    csv: Path
    markdown: Path
    bar_chart: Path
    segmentation: Path
    models: dict[str, Pipeline]
    seconds: float
    notes: list[str] = field(default_factory=list)


def run_baselines(
    manifest_path: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    cnn_run: str | Path | None = None,
    image_size: int = 128,
    n_boot: int = 1000,
    include_hybrid_imagenet: bool = True,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda _: None,
    positive_label: str = "leukemic",
    classifiers: Sequence[str] | None = None,
    seed: int = 0,
    n_jobs: int | None = None,
    device: str = "auto",
) -> BaselineResult:
    """Train and score the baselines on the train/val/test split in `splits_path`; write the comparison to out_dir.

    Feature sets: handcrafted (`HandcraftedFeatures` on `image_size` images), ImageNet EfficientNet-Lite0
    embeddings (unless `include_hybrid_imagenet` is False), and the embeddings of `cnn_run` (a `blastscan train`
    run folder) when given. Each is paired with every classifier in `classifiers` (default: all of
    `make_classifiers`), tuned by grouped CV (groups: the split file's `group` column, else patients, else images)
    on the training split. With `cnn_run` the CNN itself is scored too; `cnn_run` must not have trained or
    validated on any test image of this split (ConfigError otherwise).

    Writes baselines.csv, baselines.md, baselines_bar.png, segmentation.png and features/*.npz (the extracted
    features, reused by a later call on the same images). `n_jobs` runs each grid search's fits in that many
    processes (None: one by one, the quickest for these small grids on 2 cores). `device` runs the CNNs (auto:
    CUDA, then MPS, then CPU).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(manifest_path)
    split_table = read_splits(splits_path, manifest).table
    names = _resolve_classifiers(classifiers)
    targets = class_targets(manifest, positive_label)
    rows = _split_rows(split_table, targets, positive_label)
    tune_groups = _tuning_groups(manifest, split_table)
    ci_groups = patient_ids(manifest)
    notes = [
        "Intervals: percentile bootstrap over test "
        + ("patients." if ci_groups is not None else "images (the manifest has no patient IDs).")
    ]
    if not grouped_folds(targets[rows["train"]], tune_groups[rows["train"]], random_state=seed):
        notes.append("Too few training groups for grouped CV: each classifier kept its first grid values.")
    if cnn_run is not None:
        _check_run_split(Path(cnn_run), manifest, rows["test"])
    log(
        f"{len(manifest)} images: train {len(rows['train'])}, val {len(rows['val'])}, test {len(rows['test'])}; "
        f"tuning groups: {len(np.unique(tune_groups[rows['train']]))} in train"
    )

    # Segmented at the size the images are cached at (its sizes scale with the image); threads: ~2x faster.
    handcrafted = HandcraftedFeatures(size=image_size, n_jobs=-1)
    sources = [FeatureSource("handcrafted", "handcrafted", "classical ML", handcrafted, image_size)]
    if include_hybrid_imagenet:
        sources.append(
            FeatureSource(
                "cnn-imagenet",
                "EfficientNet-Lite0 ImageNet embeddings",
                "hybrid (ImageNet CNN features)",
                CnnEmbeddings(image_size=image_size, device=device),
                image_size,
            )
        )
    if cnn_run is not None:
        run_size = int(RunFolder.open(cnn_run).model_card()["image_size"])
        sources.append(
            FeatureSource(
                "cnn-run",
                f"embeddings of run {Path(cnn_run).name}",
                "hybrid (trained CNN features)",
                CnnEmbeddings(run_dir=cnn_run, device=device),
                run_size,
            )
        )

    used = np.sort(np.concatenate([rows["train"], rows["val"], rows["test"]]))
    caches: dict[int, ImageCache] = {}
    table_rows: list[dict[str, Any]] = []
    models: dict[str, Pipeline] = {}
    for source in sources:
        if source.image_size not in caches:
            caches[source.image_size] = ImageCache(manifest, size=source.image_size, cache_dir=cache_dir)
            caches[source.image_size].build()
        features, failures = _features(
            source, caches[source.image_size], used, rows["train"], out_dir / "features", log
        )
        if failures:
            notes.append(
                f"{source.features}: {failures} of {len(used)} images could not be segmented; their features are "
                "zeros with segmentation_ok = 0."
            )
        position = np.full(len(manifest), -1)
        position[used] = np.arange(len(used))
        X = {split: features[position[r]] for split, r in rows.items()}
        for name in names:
            pipeline, grid = make_classifiers(seed)[name]
            began = time.perf_counter()
            y_train, groups_train = targets[rows["train"]], tune_groups[rows["train"]]
            fitted = tune(pipeline, grid, X["train"], y_train, groups_train, n_jobs=n_jobs, random_state=seed)
            seconds = time.perf_counter() - began
            p_val, p_test = positive_scores(fitted, X["val"]), positive_scores(fitted, X["test"])
            metrics = _scored(targets, rows, p_val, p_test, ci_groups, n_boot, seed)
            table_rows.append(
                _table_row(
                    metrics,
                    model=CLASSIFIER_NAMES[name],
                    family=source.family,
                    features=f"{source.features} ({features.shape[1]})",
                    feature_key=source.key,
                    classifier=name,
                    n_features=features.shape[1],
                    best_params=json.dumps(best_params(fitted, grid), default=str),
                    fit_seconds=round(seconds, 2),
                )
            )
            models[f"{source.key}/{name}"] = Pipeline([("features", source.transformer), *fitted.steps])
            log(f"{source.key} + {name}: test AUROC {metrics['roc_auc']:.3f} (tuned in {seconds:.1f} s)")

    if cnn_run is not None:
        metrics = _score_cnn(Path(cnn_run), manifest, targets, rows, ci_groups, n_boot, seed, cache_dir, device)
        table_rows.append(
            _table_row(
                metrics,
                model=CNN_MODEL,
                family="CNN (end-to-end)",
                features=f"images (run {Path(cnn_run).name})",
                feature_key="cnn",
                classifier="cnn",
                n_features=np.nan,
                best_params="",
                fit_seconds=np.nan,
            )
        )
        log(f"CNN end to end: test AUROC {metrics['roc_auc']:.3f}")

    table = pd.DataFrame(table_rows)
    csv = out_dir / "baselines.csv"
    table.to_csv(csv, index=False)
    markdown = out_dir / "baselines.md"
    markdown.write_text(baselines_markdown(table, header=_header(manifest, rows, notes)))
    bar_chart = plot_baselines_bar(table, out_dir / "baselines_bar.png")
    segmentation = _segmentation_figure(
        manifest, targets, rows["test"], caches[image_size], out_dir / "segmentation.png"
    )
    seconds = time.perf_counter() - start
    log(f"baselines done in {seconds:.1f} s: {csv}")
    return BaselineResult(out_dir, table, csv, markdown, bar_chart, segmentation, models, seconds, notes)


# ---------------------------------------------------------------------------------------------- the data


def _resolve_classifiers(classifiers: Sequence[str] | None) -> list[str]:
    known = list(CLASSIFIER_NAMES)
    if classifiers is None:
        return known
    unknown = sorted(set(classifiers) - set(known))
    if unknown or not classifiers:
        raise ConfigError(f"unknown classifier(s) {unknown or '(none given)'}; choose from {', '.join(known)}")
    return [name for name in known if name in classifiers]


def _split_rows(split_table: pd.DataFrame, targets: np.ndarray, positive_label: str) -> dict[str, np.ndarray]:
    names = split_table["split"].astype(str).to_numpy()
    rows = {split: np.flatnonzero(names == split) for split in ("train", "val", "test")}
    for split, r in rows.items():
        if len(r) == 0:
            raise ConfigError(
                f"the split file has no {split!r} rows (it has {sorted(set(names))}); baselines need a "
                "train/val/test split from `blastscan data split`, not folds"
            )
        present = np.unique(targets[r])
        if len(present) < 2:
            only = positive_label if present[0] == 1 else f"not {positive_label}"
            raise TrainingError(
                f"the {split} split holds only {only} images; tuning, operating points and AUROC need both classes"
            )
    return rows


def _tuning_groups(manifest: Manifest, split_table: pd.DataFrame) -> np.ndarray:
    """Groups that CV folds must not cut: the split's groups (patients or duplicate clusters), else patients."""
    if "group" in split_table.columns:
        groups = split_table["group"].astype(str)
        if (groups != "").all():
            return groups.to_numpy()
    if manifest.has_patients:
        return manifest.table["patient_id"].astype(str).to_numpy()
    return np.array([f"image-{i}" for i in range(len(manifest))])


def _check_run_split(run_dir: Path, manifest: Manifest, test_rows: np.ndarray) -> None:
    """Refuse a run that trained or validated on a test image of this split: its scores would be optimistic."""
    run = RunFolder.open(run_dir, need=("manifest", "splits", "model_card"))
    run_manifest = run.manifest()
    run_split = run.split_names(run_manifest)
    run_root = run_manifest.root.resolve()
    seen = {str(run_root / p) for p, s in zip(run_manifest.table["path"], run_split, strict=True) if s != "test"}
    root = manifest.root.resolve()
    test_paths = [str(root / p) for p in manifest.table["path"].to_numpy()[test_rows]]
    leaked = [p for p in test_paths if p in seen]
    if leaked:
        raise ConfigError(
            f"{len(leaked)} of the {len(test_paths)} test images were in the training or validation split of "
            f"{run_dir} (e.g. {leaked[0]}); score it on the split it was trained with "
            f"(--splits {run_dir / 'splits.csv'}) so that every model is tested on unseen images"
        )


def _code_fingerprint(obj: object) -> str:
    """Hash of the Python files beside the module defining type(obj): changed feature code means new features."""
    try:
        folder = Path(inspect.getsourcefile(type(obj)) or "").parent
        digest = hashlib.sha256()
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
        return digest.hexdigest()[:16]
    except (OSError, TypeError):
        return type(obj).__qualname__


def _features(
    source: FeatureSource, cache: ImageCache, rows: np.ndarray, train_rows: np.ndarray, folder: Path, log: Callable
) -> tuple[np.ndarray, int]:
    """(features of cache rows `rows`, how many of those images could not be segmented), the transformer fitted
    on the training images only. Read from folder/<key>-<hash>.npz when the same inputs made them before."""
    transformer = source.transformer
    described = transformer.describe() if hasattr(transformer, "describe") else transformer.get_params()
    key = {
        "transformer": f"{type(transformer).__module__}.{type(transformer).__qualname__}",
        "code": _code_fingerprint(transformer),
        "params": described,
        "images": cache.key,
        "rows": hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest(),
        "train_rows": hashlib.sha256(np.ascontiguousarray(train_rows, dtype=np.int64).tobytes()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = folder / f"{source.key}-{digest}.npz"
    images = cache.array()
    transformer.fit(images[np.sort(train_rows)])  # fitted either way: it goes into the returned image pipelines
    if path.is_file():
        with np.load(path) as stored:
            log(f"{source.key}: features reused from {path.name}")
            return stored["X"], int(stored["failures"])
    began = time.perf_counter()
    chunks, failures = [], 0
    for i in range(0, len(rows), _CHUNK):
        with warnings.catch_warnings():
            # Counted below from `segmentation_failures_` and reported once, not once per chunk.
            warnings.simplefilter("ignore", SegmentationWarning)
            chunks.append(transformer.transform(images[rows[i : i + _CHUNK]]))
        failures += len(getattr(transformer, "segmentation_failures_", ()))
    X = np.concatenate(chunks).astype(np.float64)
    if X.ndim != 2 or len(X) != len(rows):
        raise ConfigError(f"{key['transformer']} returned shape {X.shape} for {len(rows)} images; expected (N, F)")
    if not np.isfinite(X).all():
        raise ConfigError(f"{key['transformer']} returned NaN or infinite features; every feature must be finite")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, X=X, rows=rows, failures=failures, key=json.dumps(key, sort_keys=True, default=str))
    tmp.replace(path)
    log(f"{source.key}: {X.shape[1]} features of {len(rows)} images in {time.perf_counter() - began:.1f} s")
    return X, failures


# ---------------------------------------------------------------------------------------------- scoring


def _scored(
    targets: np.ndarray,
    rows: dict[str, np.ndarray],
    p_val: np.ndarray,
    p_test: np.ndarray,
    ci_groups: np.ndarray | None,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Test metrics with CIs at operating points chosen on validation: the same code path as `blastscan evaluate`."""
    y_val, y_test = targets[rows["val"]], targets[rows["test"]]
    threshold = youden_threshold(y_val, p_val)
    threshold_95 = threshold_for_specificity(y_val, p_val, 0.95)
    groups = None if ci_groups is None else ci_groups[rows["test"]]
    return metrics_with_ci(y_test, p_test, threshold, threshold_95, groups, n_boot, seed)


def _score_cnn(
    run_dir: Path,
    manifest: Manifest,
    targets: np.ndarray,
    rows: dict[str, np.ndarray],
    ci_groups: np.ndarray | None,
    n_boot: int,
    seed: int,
    cache_dir: str | Path | None,
    device: str = "auto",
) -> dict[str, Any]:
    predictor = Predictor.from_run(run_dir, device=device)
    cache = predictor.image_cache(manifest, cache_dir)
    p_val = probabilities(predictor.logits_of_rows(cache, rows["val"]))
    p_test = probabilities(predictor.logits_of_rows(cache, rows["test"]))
    return _scored(targets, rows, p_val, p_test, ci_groups, n_boot, seed)


def _table_row(metrics: dict[str, Any], **labels: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict(labels)
    for name in METRICS:
        low, high = metrics["ci"].get(name, (np.nan, np.nan))
        row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = float(metrics[name]), low, high
    row.update(
        threshold=metrics["threshold"],
        threshold_95_specificity=metrics["threshold_95_specificity"],
        n_test=metrics["n_images"],
        n_test_patients=metrics["n_patients"],
        ci_method=metrics["ci_method"],
    )
    return row


# ---------------------------------------------------------------------------------------------- reporting


def _header(manifest: Manifest, rows: dict[str, np.ndarray], notes: list[str]) -> str:
    level = "patient-level" if manifest.has_patients else "image-level (duplicates grouped)"
    counts = ", ".join(f"{split} {len(r)}" for split, r in rows.items())
    return (
        f"# Classical ML vs CNN vs hybrid ({manifest.format}, {level} split: {counts} images)\n\n"
        "Test split; thresholds (Youden) chosen on the validation split; classifiers tuned by grouped 3-fold CV "
        f"on the training split (AUROC). {' '.join(notes)} Values: estimate (95% CI).\n\n"
    )


def baselines_markdown(table: pd.DataFrame, header: str = "") -> str:
    """The comparison as a markdown table: model, features and the five shown metrics with their 95% CIs."""
    lines = ["| model | features | " + " | ".join(SHOWN.values()) + " |", "|---|---|" + "---|" * len(SHOWN)]
    for record in table.to_dict(orient="records"):
        cells = []
        for name in SHOWN:
            value, low, high = record[name], record[f"{name}_ci_low"], record[f"{name}_ci_high"]
            text = "n/a" if pd.isna(value) else f"{value:.3f}"
            if not (pd.isna(low) or pd.isna(high)):
                text += f" ({low:.3f}{EN_DASH}{high:.3f})"
            cells.append(text)
        lines.append(f"| {record['model']} | {record['features']} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"


def _bar_label(record: dict[str, Any]) -> str:
    if record["feature_key"] == "cnn":
        return CNN_MODEL
    return f"{record['model']} / {record['features']}"


def plot_baselines_bar(table: pd.DataFrame, out: str | Path) -> Path:
    """Grouped bars: one group per metric (accuracy, precision, recall, F1, AUROC), one bar per model, 95% CIs
    as error bars, colours by family (classical ML, hybrids, CNN)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = table.to_dict(orient="records")
    metrics = list(SHOWN)
    n_models = max(1, len(records))
    width = 0.85 / n_models
    fig = Figure(figsize=(max(9.0, 1.2 + 0.16 * n_models * len(metrics)), 5.2), layout="constrained")
    ax = fig.add_subplot()
    used_in_family: dict[str, int] = {}
    centres = np.arange(len(metrics))
    for i, record in enumerate(records):
        shades = FAMILY_COLOURS.get(record["family"], ("#718096",))
        shade = shades[used_in_family.get(record["family"], 0) % len(shades)]
        used_in_family[record["family"]] = used_in_family.get(record["family"], 0) + 1
        values = np.array([record[m] for m in metrics], dtype=float)
        low = np.array([record[f"{m}_ci_low"] for m in metrics], dtype=float)
        high = np.array([record[f"{m}_ci_high"] for m in metrics], dtype=float)
        errors = np.nan_to_num(np.vstack([values - low, high - values]).clip(min=0))
        ax.bar(
            centres - 0.425 + (i + 0.5) * width,
            np.nan_to_num(values),
            width=width * 0.92,
            color=shade,
            edgecolor="white",
            linewidth=0.4,
            yerr=errors,
            error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "#2d3748"},
            label=_bar_label(record),
        )
    ax.set_xticks(centres, labels=[SHOWN[m] for m in metrics])
    ax.set(ylabel="test score (95% CI)", ylim=(0, 1.05), title="Classical ML vs CNN vs hybrid (test split)")
    ax.grid(alpha=GRID_ALPHA, axis="y")
    if records:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no models", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(out, dpi=DPI, facecolor="white")
    return out


def _segmentation_figure(
    manifest: Manifest, targets: np.ndarray, test_rows: np.ndarray, cache: ImageCache, out: Path, n: int = 8
) -> Path:
    """The nucleus / cell segmentation of up to n test images (half leukemic), at the size the features saw."""
    picked: list[int] = []
    for cls in (1, 0):
        rows = test_rows[targets[test_rows] == cls]
        take = min(len(rows), n // 2)
        if take:
            picked += [int(r) for r in rows[np.linspace(0, len(rows) - 1, take).round().astype(int)]]
    images = [np.array(cache[r]) for r in picked]
    labels = manifest.table["label"].astype(str).to_numpy()
    titles = [f"{labels[r]}: {Path(manifest.table['path'].iloc[r]).name}" for r in picked]
    return save_segmentation_figure(images, titles, out)


__all__ = [
    "BaselineResult",
    "FeatureSource",
    "baselines_markdown",
    "plot_baselines_bar",
    "run_baselines",
]
