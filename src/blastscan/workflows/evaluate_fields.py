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
`only_unseen` evaluated on the fields it has not seen.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
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
from blastscan.smear.field_truth import bccd_wbc_boxes, leukocyte_marks, read_marks
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
    stored = run.crop_sources() if hasattr(run, "crop_sources") else None
    return fields_seen_in_training(training, fields, stored)


def _smear_level(shares: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int, n_boot: int) -> dict:
    """Cross-validated smear calls: per fold, the blast-share threshold that maximises balanced accuracy on the
    other folds' fields; metrics of the held-out calls with bootstrap CIs over field groups."""
    usable = ~np.isnan(shares)
    shares, labels, groups = shares[usable], labels[usable], groups[usable]
    folds = max(2, min(folds, len(np.unique(groups)), int(min(labels.sum(), (1 - labels).sum()))))
    called = np.zeros(len(shares))
    thresholds = []
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    for train, test in splitter.split(shares, labels, groups):
        candidates = np.unique(np.concatenate([[0.0], shares[train], [1.01]]))

        def balanced(t: float, idx: np.ndarray = train) -> float:
            calls = shares[idx] >= t
            y = labels[idx]
            return 0.5 * (calls[y == 1].mean() if (y == 1).any() else 0) + 0.5 * (
                (~calls[y == 0]).mean() if (y == 0).any() else 0
            )

        best = max(candidates, key=balanced)
        thresholds.append(float(best))
        called[test] = shares[test] >= best
    result = metrics_with_ci(labels, called, 0.5, 0.5, groups=groups, n_boot=n_boot)
    auroc = metrics_with_ci(labels, shares, 0.5, 0.5, groups=groups, n_boot=n_boot)
    keep = ("accuracy", "recall", "specificity", "precision", "confusion_matrix", "ci", "ci_method")
    out = {k: result[k] for k in keep}
    out["roc_auc_blast_share"] = auroc["roc_auc"]
    out["roc_auc_ci"] = auroc["ci"]["roc_auc"]
    out.update(folds=folds, fold_thresholds=thresholds, fields=len(shares), groups=len(np.unique(groups)))
    return out


def _all_idb1(
    manifest_paths: list[Path],
    labels: np.ndarray,
    analyzer: FieldAnalyzer | None,
    out: Path,
    progress: Callable[[int], None] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-field detection (and, with an analyzer, blast and smear) records for ALL-IDB1."""
    rows = []
    for path in manifest_paths:
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
        other_is_leukocyte = leukocyte_marks(image, others, rbc)
        truth = np.concatenate([blasts, others[other_is_leukocyte]])
        radius = MATCH_RADIUS * rbc
        match = match_centroids(centroids, truth, radius)
        match_all = match_centroids(centroids, np.concatenate([blasts, others]), radius)
        blast_match = match_centroids(centroids[called_blast], blasts, radius)
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
    detection = _prf(totals["tp"], totals["fp"], totals["fn"])
    marks_all = sum(r["leukocyte_marks"] + r["platelet_marks"] for r in rows)
    tp_all = sum(r["tp_all_marks"] for r in rows)
    found = sum(r["found"] for r in rows)
    metrics: dict[str, Any] = {
        "fields": len(rows),
        "detection": detection,
        "detection_against_all_marks": _prf(tp_all, found - tp_all, marks_all - tp_all),
        "marks": {"leukocyte": totals["leukocyte_marks"], "platelet": totals["platelet_marks"]},
        "match_radius_red_cells": MATCH_RADIUS,
    }
    if analyzer is not None:
        blast_tp = sum(r["blast_tp"] for r in rows)
        called = sum(r["called_blast"] for r in rows)
        marks = sum(r["blast_marks"] for r in rows)
        metrics["blast_finding"] = _prf(blast_tp, called - blast_tp, marks - blast_tp)
    return metrics, rows


def _bccd(paths: list[Path], boxes: list[Any], progress: Callable[[int], None] | None) -> tuple[dict, list[dict]]:
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
    return {"fields": len(rows), "detection_ap50": average_precision(found, truth, 0.5)}, rows


def evaluate_fields(
    data: str | Path,
    out: str | Path,
    run_dir: str | Path | None = None,
    *,
    device: str = "auto",
    only_unseen: bool = False,
    folds: int = 5,
    n_boot: int = 1000,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> FieldEvaluation:
    """Evaluate the finder (and, with `run_dir`, the blast calls and smear calls) on ALL-IDB1 or BCCD at `data`."""
    scanned = scan(data, verify=False)
    manifest = scanned.manifest
    dataset = str(manifest.table["dataset"].iloc[0]) if len(manifest) else ""
    paths = manifest.absolute_paths()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"data": str(data), "dataset": dataset}
    if dataset == "bccd":
        split = manifest.table["official_split"].astype(str).to_numpy()
        chosen = np.flatnonzero(split == "test")
        result, rows = _bccd([paths[i] for i in chosen], list(manifest.table["boxes"].iloc[chosen]), progress)
        metrics.update(result, split="official test split (ImageSets/Main/test.txt)")
    elif dataset == "all-idb1":
        labels = (manifest.table["label"].astype(str).to_numpy() == LEUKEMIC).astype(int)
        analyzer = None
        chosen = np.arange(len(paths))
        if run_dir is not None:
            run = RunFolder.open(run_dir, need=("model_card", "weights"))
            seen = _seen_fields(run, paths)
            if seen and not only_unseen:
                names = ", ".join(sorted(seen)[:8]) + (" ..." if len(seen) > 8 else "")
                raise ConfigError(
                    f"run {run.name} was trained on crops cut from {len(seen)} of these fields ({names}): its field "
                    "results would be inflated. Retrain with data.leave_out_fields listing the fields to evaluate, "
                    "or pass --only-unseen to evaluate the other fields"
                )
            chosen = np.array([i for i, p in enumerate(paths) if p.name not in seen])
            metrics["run"] = run.name
            metrics["fields_left_out_as_seen_in_training"] = sorted(seen)
            analyzer = field_analyzer(run, device)
            metrics["cell_threshold"] = analyzer.cell_threshold
            metrics["framing"] = {"cell_fraction": analyzer.framing.cell_fraction, "source": analyzer.framing.source}
        chosen_paths = [paths[i] for i in chosen]
        result, rows = _all_idb1(chosen_paths, labels[chosen], analyzer, out, progress)
        metrics.update(result)
        if analyzer is not None:
            groups = _field_groups(chosen_paths, workers)
            shares = np.array([np.nan if r["blast_share"] is None else r["blast_share"] for r in rows])
            metrics["smear_level"] = _smear_level(shares, labels[chosen], groups, folds, n_boot)
    else:
        raise DatasetError(f"{data}: field evaluation needs ALL-IDB1 or BCCD fields, found {dataset or 'no images'}")
    write_json(out / "field_metrics.json", metrics)
    with (out / "fields.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["field"])
        writer.writeheader()
        writer.writerows(rows)
    return FieldEvaluation(metrics, {"metrics": out / "field_metrics.json", "fields": out / "fields.csv"})
