"""`blastscan evaluate-fields`: score whole-field analysis where truth exists (ALL-IDB1, BCCD).

- Leukocyte detection on ALL-IDB1: found centroids matched one-to-one (Hungarian) to the marked leukocytes within
  half a typical leukocyte diameter (0.75 red-cell diameters); precision, recall, F1. Marks on platelets are set
  apart first (`blastscan.smear.field_truth`), and the result against all marks is reported too.
- Leukocyte detection on BCCD: VOC AP@0.5 of the finder's boxes for the `WBC` boxes of the official test split.
- With a run: blast finding on ALL-IDB1 (recall and precision of blast marks among the detections), and the smear
  call per field, cross-validated over groups of overlapping fields (`data.duplicates`: exact, near and overlapping
  fields stay on one side), the blast-share threshold chosen on the training folds only; accuracy, sensitivity,
  specificity and the AUROC of the blast share with bootstrap CIs over field groups.

A run whose training crops were cut from the evaluated fields (an ALL-IDB2 run on ALL-IDB1) is refused, or with
`only_unseen` evaluated on the fields it has not seen. With several runs, each field is scored by the first run that
has not seen it. `cross_fit_config` does this in one go: the fields are split into `cross_fit_folds` groups of
overlapping fields (stratified by label), and for each group a run is trained from the config with
`data.leave_out_fields` listing that group's fields, then scores them; every field is then scored by a classifier
that never saw a crop cut from it or from a field overlapping it.

`review/` holds contact sheets for checking the truth and the finder by eye: the detections no mark matched, the
marks no detection matched, and the `xyc_other` marks set apart as platelets.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from blastscan.data.duplicates import duplicate_groups, duplicate_pairs, fingerprints
from blastscan.data.images import load_rgb
from blastscan.data.manifest import LEUKEMIC
from blastscan.data.scan import scan
from blastscan.errors import ConfigError, DatasetError
from blastscan.evaluation.metrics import metrics_with_ci
from blastscan.runs import RunFolder, write_json
from blastscan.smear.analysis import FieldAnalyzer
from blastscan.smear.detection_metrics import average_precision, match_centroids
from blastscan.smear.field_truth import (
    MIN_LEUKOCYTE_MARK_AREA,
    bccd_wbc_boxes,
    mark_object_areas,
    mark_sheet,
    read_marks,
)
from blastscan.smear.find import find_leukocytes
from blastscan.workflows.analyze import field_analyzer

__all__ = ["FieldEvaluation", "evaluate_fields"]

#: Centroids match within this many red-cell diameters: half a typical leukocyte (~1.5 red cells across).
MATCH_RADIUS = 0.75


@dataclass
class FieldEvaluation:
    """The figures (`metrics`, JSON-ready) and the files written."""

    metrics: dict[str, Any]
    files: dict[str, Path]


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _bootstrap_prf(rows: list[dict[str, Any]], n_boot: int, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of precision, recall and F1, resampling fields (their tp/fp/fn) with replacement."""
    counts = np.array([[r["tp"], r["fp"], r["fn"]] for r in rows], dtype=float).reshape(-1, 3)
    if not len(counts):
        return {}
    rng = np.random.default_rng(seed)
    draws = counts[rng.integers(0, len(counts), size=(n_boot, len(counts)))].sum(axis=1)
    tp, fp, fn = draws.T
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        f1 = 2 * precision * recall / (precision + recall)
    return {
        name: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
        for name, v in (("precision", precision), ("recall", recall), ("f1", f1))
    }


def _field_groups(paths: list[Path], workers: int) -> np.ndarray:
    """A group number per field: exact, near and overlapping fields share one (the audit's duplicate graph)."""
    pairs, _ = duplicate_pairs(fingerprints(paths, workers=workers), paths, check_overlap=True, workers=workers)
    return np.asarray(duplicate_groups(len(paths), pairs))


def _seen_fields(run: RunFolder, fields: list[Path]) -> dict[str, list[str]]:
    """Evaluated fields that the run's training crops were cut from (ALL-IDB2 runs only)."""
    manifest = run.manifest()
    if "all-idb2" not in set(manifest.table["dataset"].astype(str)):
        return {}
    from blastscan.data.crop_sources import fields_seen_in_training

    paths = manifest.absolute_paths()
    training = [paths[i] for i in run.rows("train", manifest)] + [paths[i] for i in run.rows("val", manifest)]
    return fields_seen_in_training(training, fields, run.crop_sources())


def _balanced_accuracy(shares: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    calls = shares >= threshold
    sensitivity = calls[labels == 1].mean() if (labels == 1).any() else 0.0
    specificity = (~calls[labels == 0]).mean() if (labels == 0).any() else 0.0
    return 0.5 * (sensitivity + specificity)


def _smear_level(shares: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int, n_boot: int) -> dict:
    """Cross-validated smear calls: per fold, the blast-share threshold that maximises balanced accuracy on the
    other folds' fields; metrics of the held-out calls with bootstrap CIs over field groups."""
    usable = ~np.isnan(shares)  # a field where no leukocyte was found has no blast share and no call
    shares, labels, groups = shares[usable], labels[usable], groups[usable]
    without = int((~usable).sum())
    per_class = int(min(labels.sum(), (1 - labels).sum()))
    if per_class < 2:
        return {
            "skipped": f"needs at least 2 fields of each class with leukocytes; has {per_class} of the rarer class",
            "fields_without_leukocytes": without,
        }
    folds = max(2, min(folds, len(np.unique(groups)), per_class))
    called = np.zeros(len(shares))
    thresholds = []
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    for train, test in splitter.split(shares, labels, groups):
        candidates = np.unique(np.concatenate([[0.0], shares[train], [1.01]]))
        best = max(candidates, key=lambda t, idx=train: _balanced_accuracy(shares[idx], labels[idx], t))
        thresholds.append(float(best))
        called[test] = shares[test] >= best
    result = metrics_with_ci(labels, called, 0.5, 0.5, groups=groups, n_boot=n_boot)
    auroc = metrics_with_ci(labels, shares, 0.5, 0.5, groups=groups, n_boot=n_boot)
    keep = ("accuracy", "recall", "specificity", "precision", "confusion_matrix", "ci", "ci_method")
    out = {k: result[k] for k in keep}
    out["roc_auc_blast_share"] = auroc["roc_auc"]
    out["roc_auc_ci"] = auroc["ci"]["roc_auc"]
    out["ci_method"] = str(out["ci_method"]).replace("patients", "groups of overlapping fields")
    # The threshold to use with `blastscan analyze --smear-threshold`: chosen on all evaluated fields (the figures
    # above are the honest, cross-validated estimate of how it performs on new fields).
    overall = np.unique(np.concatenate([[0.0], shares, [1.01]]))
    out["recommended_smear_threshold"] = float(max(overall, key=lambda t: _balanced_accuracy(shares, labels, t)))
    out.update(folds=folds, fold_thresholds=thresholds, fields=len(shares), groups=len(np.unique(groups)))
    out["fields_without_leukocytes"] = without
    return out


@dataclass
class _ReviewTiles:
    """Mark- or detection-centred tiles for the review contact sheets (at most `limit` of each)."""

    unmatched_found: list[np.ndarray] = field(default_factory=list)
    unmatched_marks: list[np.ndarray] = field(default_factory=list)
    platelet_marks: list[np.ndarray] = field(default_factory=list)
    limit: int = 240

    def add(self, kind: str, image: np.ndarray, points: np.ndarray, radius: float) -> None:
        tiles = getattr(self, kind)
        r = max(8, round(radius))
        for x, y in points:
            if len(tiles) >= self.limit:
                return
            x0, y0 = max(0, round(x) - r), max(0, round(y) - r)
            tiles.append(image[y0 : round(y) + r, x0 : round(x) + r].copy())

    def write(self, folder: Path) -> dict[str, Path]:
        return {
            kind: mark_sheet(getattr(self, kind), folder / f"{kind}.png")
            for kind in ("unmatched_found", "unmatched_marks", "platelet_marks")
            if getattr(self, kind)
        }


def _all_idb1(
    manifest_paths: list[Path],
    labels: np.ndarray,
    analyzers: list[FieldAnalyzer | None],
    review: _ReviewTiles,
    n_boot: int,
    progress: Callable[[int], None] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-field detection (and, with analyzers, blast and smear) records for ALL-IDB1; `analyzers[i]` scores
    field i (None: detection only)."""
    rows = []
    blast_areas, other_areas = [], []  # sizes of the objects under the marks, to report the platelet split
    for path, analyzer in zip(manifest_paths, analyzers, strict=True):
        image = load_rgb(path)
        blasts = read_marks(path.parent.parent / "xyc" / f"{path.stem}.xyc")
        others = read_marks(path.parent.parent / "xyc_other" / f"{path.stem}.xyc")
        if analyzer is not None:
            analysis = analyzer.analyze(image)
            centroids = np.array([[c.x, c.y] for c in analysis.cells]).reshape(-1, 2)
            called_blast = np.array([c.blast for c in analysis.cells], dtype=bool)
            rbc, share = analysis.red_cell_diameter, analysis.smear.blast_share
        else:
            finding = find_leukocytes(image)
            centroids = np.array([c.centroid for c in finding.cells]).reshape(-1, 2)
            called_blast = np.zeros(len(centroids), dtype=bool)
            rbc, share = finding.red_cell_diameter, None
        other_area = mark_object_areas(image, others, rbc)
        other_is_leukocyte = other_area >= MIN_LEUKOCYTE_MARK_AREA
        other_areas.append(other_area)
        blast_areas.append(mark_object_areas(image, blasts, rbc))
        truth = np.concatenate([blasts, others[other_is_leukocyte]])
        radius = MATCH_RADIUS * rbc
        match = match_centroids(centroids, truth, radius)
        match_all = match_centroids(centroids, np.concatenate([blasts, others]), radius)
        blast_match = match_centroids(centroids[called_blast], blasts, radius)
        review.add("unmatched_found", image, centroids[list(match.unmatched_found)], rbc)
        review.add("unmatched_marks", image, truth[list(match.unmatched_truth)], rbc)
        review.add("platelet_marks", image, others[~other_is_leukocyte], 0.5 * rbc)
        rows.append(
            {
                "field": path.name,
                "label": int(labels[len(rows)]),
                "red_cell_diameter": round(rbc, 1),
                "found": len(centroids),
                "leukocyte_marks": len(truth),
                "platelet_marks": int((~other_is_leukocyte).sum()),
                "tp": match.true_positives,
                "fp": len(match.unmatched_found),
                "fn": len(match.unmatched_truth),
                "tp_all_marks": match_all.true_positives,
                "blast_marks": len(blasts),
                "called_blast": int(called_blast.sum()),
                "blast_tp": blast_match.true_positives,
                "blast_share": share,
            }
        )
        if progress is not None:
            progress(1)
    totals = {k: sum(r[k] for r in rows) for k in ("tp", "fp", "fn", "leukocyte_marks", "platelet_marks")}
    marks_all = totals["leukocyte_marks"] + totals["platelet_marks"]
    tp_all = sum(r["tp_all_marks"] for r in rows)
    found = sum(r["found"] for r in rows)
    metrics: dict[str, Any] = {
        "fields": len(rows),
        "detection": _prf(totals["tp"], totals["fp"], totals["fn"]),
        "detection_ci": _bootstrap_prf(rows, n_boot),
        "detection_ci_method": f"percentile bootstrap, {n_boot} resamples of fields",
        "detection_against_all_marks": _prf(tp_all, found - tp_all, marks_all - tp_all),
        "marks": {"leukocyte": totals["leukocyte_marks"], "platelet": totals["platelet_marks"]},
        "match_radius_red_cells": MATCH_RADIUS,
        "mark_object_areas": _mark_size_summary(np.concatenate(blast_areas), np.concatenate(other_areas)),
    }
    if any(a is not None for a in analyzers):
        blast_tp = sum(r["blast_tp"] for r in rows)
        called = sum(r["called_blast"] for r in rows)
        marks = sum(r["blast_marks"] for r in rows)
        metrics["blast_finding"] = _prf(blast_tp, called - blast_tp, marks - blast_tp)
    return metrics, rows


def _mark_size_summary(blast_areas: np.ndarray, other_areas: np.ndarray) -> dict[str, Any]:
    """How clearly the object sizes under the marks (red-cell areas) split platelets from leukocytes."""
    platelets = other_areas[other_areas < MIN_LEUKOCYTE_MARK_AREA]
    return {
        "threshold": MIN_LEUKOCYTE_MARK_AREA,
        "smallest_blast_mark": float(blast_areas.min()) if blast_areas.size else None,
        "largest_platelet_mark": float(platelets.max()) if platelets.size else None,
        "other_marks_between_threshold_and_twice_it": int(
            ((other_areas >= MIN_LEUKOCYTE_MARK_AREA) & (other_areas < 2 * MIN_LEUKOCYTE_MARK_AREA)).sum()
        ),
    }


def _cross_fit_runs(
    config_path: Path, fields: list[Path], labels: np.ndarray, groups: np.ndarray, folds: int, out: Path
) -> tuple[list[Path], np.ndarray]:
    """Train one run per fold of field groups, each leaving out its fold's fields; (run folders, fold per field)."""
    from blastscan.training.config import load_config
    from blastscan.workflows.train import train

    fold_of = np.zeros(len(fields), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    for k, (_, held_out) in enumerate(splitter.split(fields, labels, groups)):
        fold_of[held_out] = k
    run_dirs = []
    for k in range(folds):
        names = [fields[i].stem for i in np.flatnonzero(fold_of == k)]
        config = load_config(config_path)
        config = config.model_copy(
            update={
                "name": f"{config.name}-fields-fold{k}",
                "runs_dir": str(out / "runs"),
                "data": config.data.model_copy(update={"leave_out_fields": names}),
            }
        )
        run_dirs.append(train(config, progress_bar=False).run_dir)
    return run_dirs, fold_of


def _analyzers_for(
    run_dirs: list[Path], fields: list[Path], fold_of: np.ndarray | None, only_unseen: bool, device: str
) -> tuple[list[FieldAnalyzer | None], dict[str, Any]]:
    """The analyzer that scores each field: its fold's run when cross-fitted, else the first run that has not seen
    it. A field every run has seen is refused (ConfigError) or, with `only_unseen`, left out (None)."""
    runs = [RunFolder.open(d, need=("model_card", "weights")) for d in run_dirs]
    analyzers = [field_analyzer(run, device) for run in runs]
    seen = [_seen_fields(run, fields) for run in runs]
    chosen: list[FieldAnalyzer | None] = []
    refused = []
    for i, path in enumerate(fields):
        order = [int(fold_of[i])] if fold_of is not None else range(len(runs))
        pick = next((k for k in order if path.name not in seen[k]), None)
        if pick is None:
            refused.append(path.name)
        chosen.append(None if pick is None else analyzers[pick])
    if refused and not only_unseen:
        names = ", ".join(refused[:8]) + (" ..." if len(refused) > 8 else "")
        raise ConfigError(
            f"{len(refused)} field(s) were seen in training by every run given ({names}): their crops were cut from "
            "them, so their results would be inflated. Retrain with data.leave_out_fields listing them (or use "
            "--cross-fit-config), or pass --only-unseen to evaluate the other fields"
        )
    info = {
        "runs": [run.name for run in runs],
        "cell_thresholds": {run.name: a.cell_threshold for run, a in zip(runs, analyzers, strict=True)},
        "framing": {run.name: a.framing.cell_fraction for run, a in zip(runs, analyzers, strict=True)},
        "fields_left_out_as_seen_in_training": refused,
    }
    return chosen, info


def _bccd(
    paths: list[Path], boxes: list[Any], n_boot: int, progress: Callable[[int], None] | None
) -> tuple[dict, list[dict]]:
    found, truth, rows = [], [], []
    for path, annotation in zip(paths, boxes, strict=True):
        finding = find_leukocytes(load_rgb(path))
        predicted = np.array([[*c.box] for c in finding.cells], dtype=float).reshape(-1, 4)
        scores = np.array([c.score for c in finding.cells])
        wbc = bccd_wbc_boxes(json.loads(annotation) if isinstance(annotation, str) else None)
        found.append((predicted, scores))
        truth.append(wbc)
        rows.append({"field": path.name, "found": len(predicted), "wbc_boxes": len(wbc),
                     "red_cell_diameter": round(finding.red_cell_diameter, 1)})  # fmt: skip
        if progress is not None:
            progress(1)
    result = average_precision(found, truth, 0.5)
    rng = np.random.default_rng(0)
    resampled = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(found), size=len(found))
        resampled.append(average_precision([found[i] for i in pick], [truth[i] for i in pick], 0.5)["ap"])
    result["ap_ci"] = [float(np.nanpercentile(resampled, 2.5)), float(np.nanpercentile(resampled, 97.5))]
    result["ci_method"] = f"percentile bootstrap, {n_boot} resamples of images"
    return {"fields": len(rows), "detection_ap50": result}, rows


def evaluate_fields(
    data: str | Path,
    out: str | Path,
    run_dirs: Sequence[str | Path] = (),
    *,
    cross_fit_config: str | Path | None = None,
    cross_fit_folds: int = 2,
    device: str = "auto",
    only_unseen: bool = False,
    folds: int = 5,
    n_boot: int = 1000,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> FieldEvaluation:
    """Evaluate the finder (and, with runs, the blast calls and smear calls) on ALL-IDB1 or BCCD at `data`."""
    scanned = scan(data, verify=False)
    manifest = scanned.manifest
    dataset = str(manifest.table["dataset"].iloc[0]) if len(manifest) else ""
    paths = manifest.absolute_paths()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"data": str(data), "dataset": dataset}
    files: dict[str, Path] = {}
    if dataset == "bccd":
        if run_dirs or cross_fit_config:
            raise ConfigError("BCCD has no leukemia labels: evaluate-fields scores only leukocyte detection there")
        split = manifest.table["official_split"].astype(str).to_numpy()
        chosen = np.flatnonzero(split == "test")
        result, rows = _bccd([paths[i] for i in chosen], list(manifest.table["boxes"].iloc[chosen]), n_boot, progress)
        metrics.update(result, split="official test split (ImageSets/Main/test.txt)")
    elif dataset == "all-idb1":
        labels = (manifest.table["label"].astype(str).to_numpy() == LEUKEMIC).astype(int)
        scored = bool(run_dirs) or cross_fit_config is not None
        groups = _field_groups(paths, workers) if scored else np.arange(len(paths))
        analyzers: list[FieldAnalyzer | None] = [None] * len(paths)
        if scored:
            fold_of = None
            run_list = [Path(d) for d in run_dirs]
            if cross_fit_config is not None:
                run_list, fold_of = _cross_fit_runs(Path(cross_fit_config), paths, labels, groups, cross_fit_folds, out)
                fold_names = {p.name: int(k) for p, k in zip(paths, fold_of, strict=True)}
                metrics["cross_fit"] = {
                    "config": str(cross_fit_config),
                    "folds": cross_fit_folds,
                    "fold_of_field": fold_names,
                }
            analyzers, info = _analyzers_for(run_list, paths, fold_of, only_unseen, device)
            metrics.update(info)
        keep = [i for i, a in enumerate(analyzers) if a is not None or not scored]
        review = _ReviewTiles()
        result, rows = _all_idb1(
            [paths[i] for i in keep], labels[keep], [analyzers[i] for i in keep], review, n_boot, progress
        )
        metrics.update(result)
        files.update(review.write(out / "review"))
        if scored:
            shares = np.array([np.nan if r["blast_share"] is None else r["blast_share"] for r in rows])
            metrics["smear_level"] = _smear_level(shares, labels[keep], groups[keep], folds, n_boot)
    else:
        raise DatasetError(f"{data}: field evaluation needs ALL-IDB1 or BCCD fields, found {dataset or 'no images'}")
    files["metrics"] = write_json(out / "field_metrics.json", metrics)
    files["fields"] = out / "fields.csv"
    with files["fields"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["field"])
        writer.writeheader()
        writer.writerows(rows)
    return FieldEvaluation(metrics, files)
