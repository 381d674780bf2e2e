"""The run report: one self-contained HTML file for a paper's supplement.

Everything a reader needs travels inside the file: figures are embedded as base64 data URIs, the CSS is inline,
there is no script and no external resource (a Content-Security-Policy forbids them), so it renders offline.
This module prepares the content (numbers formatted, rows chosen, images encoded); the markup lives in
templates/report.html.j2 and the style in templates/report.css, shipped as package data. All text is escaped
(Jinja2 autoescape).
"""

from __future__ import annotations

import base64
import functools
import math
import mimetypes
import numbers
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import numpy as np
from PIL import Image
from pydantic import BaseModel, FilePath

import blastscan

TEMPLATE_NAME = "report.html.j2"  # in blastscan/evaluation/templates/
EN_DASH = "\u2013"
MISSING = "\u2014"

DEFAULT_INTENDED_USE = (
    "Research on automated leukemia detection in peripheral blood smear images, and triage support: ranking or "
    "flagging images for review by a hematologist. Every output is a suggestion for an expert to check."
)
DEFAULT_OUT_OF_SCOPE = (
    "Not a diagnostic device and not validated for clinical use: it must not diagnose, rule out or subtype "
    "leukemia, and must not be used without review by a qualified hematologist, nor on stains, scanners or "
    "populations unlike the training data without new validation."
)

METRIC_NAMES = {
    "roc_auc": "AUROC",
    "auroc": "AUROC",
    "average_precision": "Average precision (AP)",
    "pr_auc": "PR AUC",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "sensitivity": "Sensitivity (recall)",
    "recall": "Recall",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1 score",
    "mcc": "Matthews correlation (MCC)",
    "cohen_kappa": "Cohen's kappa",
    "brier": "Brier score",
    "brier_score": "Brier score",
    "log_loss": "Log loss",
    "ece": "Expected calibration error (ECE)",
    "sensitivity_at_95_specificity": "Sensitivity at the validation 95%-specificity threshold",
    "specificity_at_95_specificity_threshold": "Specificity at the validation 95%-specificity threshold",
    "n": "Samples",
    "n_positive": "Leukemic samples",
    "n_negative": "Normal samples",
    "patients": "Patients",
}
# Keys shown first, in this order; the rest follow as given.
METRIC_ORDER = tuple(METRIC_NAMES)
# Keys of the metrics dict that are not rows of the metrics table.
NOT_METRICS = frozenset({"ci", "threshold"})
SPLIT_ORDER = ("train", "val", "validation", "test")


class RunInfo(BaseModel):
    """Which run, on which data, split how."""

    run_name: str
    dataset: str
    split_level: Literal["patient", "image"]
    split_seed: int | None = None
    evaluated_on: str = "test"
    synthetic: bool = False
    created: str | None = None
    code_version: str | None = None


class LeakageAudit(BaseModel):
    """The headline of `blastscan data audit` for the run's split."""

    leaks: bool
    duplicate_pairs: int
    label_conflicts: int
    patients_across_splits: int = 0
    duplicates_across_splits: int = 0
    notes: list[str] = []

    @classmethod
    def from_audit(cls, audit: Any) -> LeakageAudit:
        """From a `blastscan.data.audit.AuditReport` (or anything with the same attributes)."""
        return cls(
            leaks=bool(audit.leaks),
            duplicate_pairs=len(audit.duplicates),
            label_conflicts=len(audit.label_conflicts),
            patients_across_splits=len(getattr(audit, "patient_leaks", [])),
            duplicates_across_splits=len(getattr(audit, "duplicate_leaks", [])),
            notes=list(getattr(audit, "notes", [])),
        )


class DataSummary(BaseModel):
    """Images per split and class, patients, and the leakage audit."""

    split_counts: dict[str, dict[str, int]]
    patients: int | dict[str, int] | None = None
    audit: LeakageAudit | None = None
    notes: list[str] = []


class OperatingPoints(BaseModel):
    """Decision thresholds: the honest one chosen on validation, and the optimistic test-oracle one."""

    threshold: float
    target_specificity: float = 0.95
    sensitivity: float | None = None
    specificity: float | None = None
    sensitivity_ci: tuple[float, float] | None = None
    specificity_ci: tuple[float, float] | None = None
    oracle_threshold: float | None = None
    oracle_sensitivity: float | None = None
    oracle_specificity: float | None = None


class Calibration(BaseModel):
    """Expected calibration error before and after temperature scaling with temperature T."""

    ece_before: float | None
    ece_after: float | None = None
    temperature: float | None = None
    n_bins: int | None = None
    fitted_on: str = "validation"


class ModelCard(BaseModel):
    """What the model is for, what it saw, and where it fails."""

    training_data: str
    evaluation_data: str
    limitations: list[str] = []
    intended_use: str = DEFAULT_INTENDED_USE
    out_of_scope: str = DEFAULT_OUT_OF_SCOPE


class ReportContent(BaseModel):
    """Everything the report shows. Metric dicts look like {"accuracy": 0.9, ..., "ci": {"accuracy": [lo, hi]}};
    figures are (caption, PNG path) pairs and must exist when the content is built.
    """

    run: RunInfo
    data: DataSummary
    config: dict[str, Any] = {}
    metrics: dict[str, Any]
    operating_points: OperatingPoints | None = None
    calibration: Calibration | None = None
    patient_metrics: dict[str, Any] | None = None
    patient_rule: str | None = None
    patient_table: list[dict[str, Any]] | None = None
    tta_metrics: dict[str, Any] | None = None
    #: The out-of-distribution flag on the scored images (`evaluate`'s metrics["out_of_distribution"]).
    out_of_distribution: dict[str, Any] | None = None
    figures: list[tuple[str, FilePath]] = []
    error_gallery: FilePath | None = None
    error_gallery_caption: str = "The test images the model got wrong with the highest confidence."
    model_card: ModelCard


def _ood_rows(ood: dict[str, Any] | None) -> list[tuple[str, str]] | None:
    """The out-of-distribution flag's key-value rows, or None when the run has no in-distribution profile."""
    if not ood:
        return None
    if ood.get("note"):
        return [("Out-of-distribution flag", str(ood["note"]))]
    rows = [
        ("Score", str(ood["method"])),
        ("Flag threshold", f"{format_number(ood['threshold'])} ({format_number(ood['percentile'], 0)}th percentile "
         "of validation scores)"),
        ("Images flagged", f"{ood['n_flagged']} of {ood['n_images']} ({100 * ood['flagged_share']:.1f}%)"),
    ]  # fmt: skip
    if ood.get("accuracy_unflagged") is not None:
        rows.append(("Accuracy: flagged / not flagged", f"{format_number(ood.get('accuracy_flagged'))} / "
                     f"{format_number(ood['accuracy_unflagged'])}"))  # fmt: skip
    return rows


def format_number(value: Any, digits: int = 3) -> str:
    """0.9 -> "0.900"; integers stay integers; None / NaN -> an em dash."""
    if value is None:
        return MISSING
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):  # numpy integers too
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return MISSING
    if number.is_integer() and abs(number) >= 1000:
        return str(int(number))
    return f"{number:.{digits}f}"


def format_estimate(value: Any, ci: Sequence[Any] | None = None, digits: int = 3) -> str:
    """An estimate with its 95% CI: "0.900 (0.850-0.940)" with an en dash; without a usable CI, the estimate alone."""
    text = format_number(value, digits)
    if ci is not None and len(ci) == 2 and all(_finite(v) for v in ci) and _finite(value):
        text += f" ({format_number(ci[0], digits)}{EN_DASH}{format_number(ci[1], digits)})"
    return text


def write_report(out: str | Path, *, title: str, sections: ReportContent) -> Path:
    """Write the report to `out` (parents created) as one HTML file that stands alone; returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    html = _template().render(title=title, **_view(sections))
    out.write_text(html, encoding="utf-8")
    return out


@functools.cache
def _template() -> jinja2.Template:
    """The report template, loaded once from the package so that it works from a wheel as well as from a checkout."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("blastscan.evaluation", "templates"),
        # Every template here is HTML (the CSS partial has no expressions), so escaping is on whatever the name.
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default=True),
        undefined=jinja2.StrictUndefined,  # a context key the template expects but _view forgot fails loudly
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template(TEMPLATE_NAME)


def _finite(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _is_scalar_number(value: Any) -> bool:
    """A number (None counts: a metric that could not be computed) but not a bool, string, list or dict."""
    if value is None:
        return True
    if isinstance(value, bool | np.bool_ | str | bytes):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def metric_label(key: str) -> str:
    """The reader's name of a metrics-dict key: "roc_auc" -> "AUROC"; unknown keys get their underscores spaced."""
    return METRIC_NAMES.get(key, key.replace("_", " ").capitalize())


def _metric_keys(metrics: Mapping[str, Any]) -> list[str]:
    keys = [k for k, v in metrics.items() if k not in NOT_METRICS and _is_scalar_number(v)]
    rank = {k: i for i, k in enumerate(METRIC_ORDER)}
    return sorted(keys, key=lambda k: rank.get(k, len(rank)))


def _ci_of(metrics: Mapping[str, Any], key: str) -> Sequence[Any] | None:
    ci = (metrics.get("ci") or {}).get(key)
    if isinstance(ci, Mapping):  # {"low": .., "high": ..}
        ci = [ci.get("low"), ci.get("high")]
    return ci


def _metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    return [
        {"name": metric_label(k), "key": k, "value": format_estimate(metrics[k], _ci_of(metrics, k))}
        for k in _metric_keys(metrics)
    ]


def _comparison_rows(plain: Mapping[str, Any], tta: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for key in _metric_keys(plain):
        if key not in tta or not _is_scalar_number(tta[key]):
            continue
        difference = float(tta[key]) - float(plain[key]) if _finite(tta[key]) and _finite(plain[key]) else None
        rows.append(
            {
                "name": metric_label(key),
                "plain": format_estimate(plain[key], _ci_of(plain, key)),
                "tta": format_estimate(tta[key], _ci_of(tta, key)),
                "difference": MISSING if difference is None else f"{difference:+.3f}",
            }
        )
    return rows


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            rows.append((name, "[" + ", ".join(str(v) for v in value) + "]"))
        else:
            rows.append((name, "null" if value is None else str(value)))
    return rows


def _split_table(data: DataSummary) -> dict[str, Any]:
    classes: list[str] = []
    for by_class in data.split_counts.values():
        classes.extend(c for c in by_class if c not in classes)
    rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    splits = sorted(data.split_counts, key=lambda s: rank.get(s, len(rank)))
    per_split_patients = data.patients if isinstance(data.patients, dict) else None
    rows = []
    for split in splits:
        counts = data.split_counts[split]
        row = [str(counts.get(c, 0)) for c in classes] + [str(sum(counts.values()))]
        if per_split_patients is not None:
            row.append(format_number(per_split_patients.get(split)))
        rows.append({"split": split, "cells": row})
    totals = [str(sum(data.split_counts[s].get(c, 0) for s in splits)) for c in classes]
    totals.append(str(sum(sum(v.values()) for v in data.split_counts.values())))
    if per_split_patients is not None:
        totals.append(format_number(sum(per_split_patients.values())))
    header = [*classes, "images"] + (["patients"] if per_split_patients is not None else [])
    return {"header": header, "rows": rows, "totals": totals}


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0]
    if mime is None or not mime.startswith("image/"):
        raise ValueError(f"{path}: not an image the report can embed (use PNG, JPEG or SVG)")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _is_wide(path: Path) -> bool:
    """Landscape figures (e.g. two panels side by side) get a full row; the rest share rows two by two."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError):  # SVG and other formats PIL does not read
        return False
    return width > 1.8 * height


def _headline(content: ReportContent) -> list[dict[str, str]]:
    cards = []
    metrics = content.metrics
    for key in ("roc_auc", "auroc", "accuracy", "sensitivity", "specificity", "f1"):
        if key in metrics and _is_scalar_number(metrics[key]) and len(cards) < 4:
            ci = _ci_of(metrics, key)
            ci_text = (
                f"95% CI {format_number(ci[0])}{EN_DASH}{format_number(ci[1])}"
                if ci is not None and len(ci) == 2 and all(_finite(v) for v in ci)
                else "no CI"
            )
            cards.append({"name": metric_label(key), "value": format_number(metrics[key]), "ci": ci_text})
    if content.calibration is not None and content.calibration.ece_before is not None and len(cards) < 5:
        after = content.calibration.ece_after
        cards.append(
            {
                "name": "ECE",
                "value": format_number(content.calibration.ece_before),
                "ci": f"{format_number(after)} after temperature scaling" if after is not None else "uncalibrated",
            }
        )
    return cards


def _view(content: ReportContent) -> dict[str, Any]:
    run, data = content.run, content.data
    warnings: list[dict[str, str]] = []
    if run.synthetic:
        warnings.append(
            {
                "level": "danger",
                "title": "Synthetic data",
                "text": "Every image in this run is SYNTHETIC (generated by blastscan for testing). "
                "The numbers show that the pipeline runs; they say nothing about leukemia detection.",
            }
        )
    if run.split_level == "image":
        warnings.append(
            {
                "level": "warning",
                "title": "Image-level split",
                "text": "Images were split without patient identities, so one patient's cells may sit in both "
                "training and test sets. Expect the metrics to be optimistic.",
            }
        )
    if data.audit is not None and data.audit.leaks:
        warnings.append(
            {
                "level": "danger",
                "title": "Leaking split",
                "text": f"The leakage audit found {data.audit.patients_across_splits} patient(s) and "
                f"{data.audit.duplicates_across_splits} duplicate pair(s) on more than one side of the split. "
                "The test metrics are not an independent estimate.",
            }
        )
    identification = [
        ("Run", run.run_name),
        ("Dataset", run.dataset + (" (SYNTHETIC)" if run.synthetic else "")),
        ("Split level", "patient-level" if run.split_level == "patient" else "image-level (no patient IDs)"),
        ("Split seed", format_number(run.split_seed)),
        ("Evaluated on", run.evaluated_on),
    ]
    if isinstance(data.patients, int):
        identification.append(("Patients", str(data.patients)))
    if run.created:
        identification.append(("Created", run.created))
    if run.code_version:
        identification.append(("Code version", run.code_version))

    audit_rows = None
    if data.audit is not None:
        audit = data.audit
        audit_rows = [
            ("Split leaks", "YES" if audit.leaks else "no"),
            ("Patients on more than one side", str(audit.patients_across_splits)),
            ("Duplicate pairs found (exact, near, overlapping)", str(audit.duplicate_pairs)),
            ("Duplicate pairs across splits", str(audit.duplicates_across_splits)),
            ("Duplicate pairs with conflicting labels", str(audit.label_conflicts)),
        ]

    operating = None
    if content.operating_points is not None:
        op = content.operating_points
        target = f"{op.target_specificity:.0%}"
        operating = {
            "target": target,
            "rows": [
                {
                    "kind": "valid",
                    "name": f"Validation-chosen threshold (targets {target} specificity on validation)",
                    "threshold": format_number(op.threshold),
                    "sensitivity": format_estimate(op.sensitivity, op.sensitivity_ci),
                    "specificity": format_estimate(op.specificity, op.specificity_ci),
                    "status": "Reported estimate",
                }
            ],
        }
        if op.oracle_sensitivity is not None or op.oracle_threshold is not None:
            operating["rows"].append(
                {
                    "kind": "oracle",
                    "name": f"TEST-ORACLE threshold (chosen on the test set for {target} specificity)",
                    "threshold": format_number(op.oracle_threshold),
                    "sensitivity": format_number(op.oracle_sensitivity),
                    "specificity": format_number(op.oracle_specificity),
                    "status": "Optimistic upper bound; not a valid estimate",
                }
            )

    calibration = None
    if content.calibration is not None:
        cal = content.calibration
        calibration = [
            ("ECE before temperature scaling", format_number(cal.ece_before)),
            ("ECE after temperature scaling", format_number(cal.ece_after)),
            ("Temperature T", format_number(cal.temperature)),
            ("Temperature fitted on", cal.fitted_on),
        ]
        if cal.n_bins is not None:
            calibration.append(("Equal-width bins", str(cal.n_bins)))

    patient_columns: list[str] = []
    patient_rows: list[list[dict[str, Any]]] = []
    for record in content.patient_table or []:
        patient_columns.extend(k for k in record if k not in patient_columns)
    for record in content.patient_table or []:
        patient_rows.append(
            [{"text": format_number(record.get(c)), "num": _is_scalar_number(record.get(c))} for c in patient_columns]
        )

    card = content.model_card
    return {
        "run_name": run.run_name,
        "dataset": run.dataset + (" (SYNTHETIC)" if run.synthetic else ""),
        "warnings": warnings,
        "headline": _headline(content),
        "identification": identification,
        "splits": _split_table(data),
        "data_notes": data.notes + (data.audit.notes if data.audit else []),
        "audit": audit_rows,
        "audit_leaks": bool(data.audit and data.audit.leaks),
        "config": _flatten(content.config),
        "metrics": _metric_rows(content.metrics),
        "metrics_threshold": format_number(content.metrics.get("threshold")),
        "evaluated_on": run.evaluated_on,
        "operating": operating,
        "calibration": calibration,
        "ood_rows": _ood_rows(content.out_of_distribution),
        "patient_metrics": _metric_rows(content.patient_metrics) if content.patient_metrics else None,
        "patient_rule": content.patient_rule,
        "patient_columns": patient_columns,
        "patient_rows": patient_rows,
        "tta": _comparison_rows(content.metrics, content.tta_metrics) if content.tta_metrics else None,
        "figures": [
            {"caption": caption, "src": _data_uri(Path(path)), "wide": _is_wide(Path(path))}
            for caption, path in content.figures
        ],
        "gallery": _data_uri(content.error_gallery) if content.error_gallery else None,
        "gallery_caption": content.error_gallery_caption,
        "card": card,
        "synthetic": run.synthetic,
        "training_data": card.training_data,
        "version": blastscan.__version__,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
