"""The data audit: unreadable files, duplicates, and whether a split leaks.

A split leaks when one patient, or one duplicate cluster (exact, near or overlapping images), has rows on two
sides of it. `audit(...).leaks` is what the CLI turns into a non-zero exit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from blastscan.data.duplicates import (
    DEFAULT_NEAR_THRESHOLD,
    DuplicatePair,
    Fingerprint,
    duplicate_groups,
    duplicate_pairs,
    fingerprint,
)
from blastscan.data.manifest import Manifest
from blastscan.data.parallel import threaded_map
from blastscan.data.splits import SplitResult
from blastscan.errors import DatasetError


class UnreadableFile(BaseModel):
    path: str
    reason: str


class DuplicateFinding(BaseModel):
    """Two rows that show the same picture (`exact`/`near`, pHash distance) or the same scene (`overlap`)."""

    first: str
    second: str
    kind: str
    distance: float
    first_split: str | None = None
    second_split: str | None = None

    @property
    def straddles(self) -> bool:
        return self.first_split is not None and self.first_split != self.second_split


class PatientLeak(BaseModel):
    patient_id: str
    splits: list[str]
    images: int


class AuditReport(BaseModel):
    """Everything `blastscan data audit` found; `leaks` is True when the split lets information cross."""

    manifest_rows: int
    dataset: str
    class_counts: dict[str, int]
    patients: int | None
    image_sizes: dict[str, int]
    image_modes: dict[str, int]
    unreadable: list[UnreadableFile]
    duplicates: list[DuplicateFinding]
    duplicate_clusters: int
    near_threshold: int
    overlap_checked: bool
    split_level: str | None = None
    split_counts: dict[str, dict[str, int]] | None = None
    patient_leaks: list[PatientLeak] = []
    duplicate_leaks: list[DuplicateFinding] = []
    label_conflicts: list[DuplicateFinding] = []
    notes: list[str] = []

    @property
    def leaks(self) -> bool:
        return bool(self.patient_leaks or self.duplicate_leaks)

    @property
    def exact_duplicates(self) -> list[DuplicateFinding]:
        return [d for d in self.duplicates if d.kind == "exact"]


def _safe_fingerprint(path: Path) -> Fingerprint | UnreadableFile:
    try:
        return fingerprint(path)
    except DatasetError as exc:
        return UnreadableFile(path=str(path), reason=str(exc).removeprefix(f"{path}: "))
    except OSError as exc:
        return UnreadableFile(path=str(path), reason=f"cannot read the file ({exc})")


def audit(
    manifest: Manifest,
    splits: SplitResult | None = None,
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    check_overlap: bool | None = None,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> AuditReport:
    """Audit `manifest` (and, given `splits`, the split): see `AuditReport` for what is checked."""
    table = manifest.table
    paths = manifest.absolute_paths()
    results = threaded_map(_safe_fingerprint, paths, workers, progress)
    readable = [i for i, r in enumerate(results) if isinstance(r, Fingerprint)]
    prints: list[Fingerprint] = [results[i] for i in readable]  # type: ignore[misc]
    unreadable = [r for r in results if isinstance(r, UnreadableFile)]

    found, overlap_checked = duplicate_pairs(
        prints, [paths[i] for i in readable], near_threshold, check_overlap, workers
    )
    # Back from positions among the readable images to manifest rows.
    pairs = [DuplicatePair(readable[p.first], readable[p.second], p.kind, p.distance) for p in found]
    clusters = duplicate_groups(len(table), pairs)

    split_of_row: list[str] | None = None
    if splits is not None:
        if list(splits.table["path"]) != list(table["path"]):
            raise DatasetError(
                "the split file does not list the manifest's rows in order; re-run `blastscan data split`"
            )
        split_of_row = [str(s) for s in splits.table["split"]]
    names = [str(p) for p in table["path"]]
    findings = [
        DuplicateFinding(
            first=names[p.first],
            second=names[p.second],
            kind=p.kind,
            distance=p.distance,
            first_split=split_of_row[p.first] if split_of_row else None,
            second_split=split_of_row[p.second] if split_of_row else None,
        )
        for p in sorted(pairs, key=lambda p: (p.first, p.second))
    ]
    sizes = [f"{p.width}x{p.height}" for p in prints]
    modes = table["mode"].astype(str).value_counts().to_dict() if "mode" in table else {}
    report = AuditReport(
        manifest_rows=len(table),
        dataset=manifest.format,
        class_counts=manifest.class_counts(),
        patients=int(table["patient_id"].nunique()) if manifest.has_patients else None,
        image_sizes=dict(Counter(sizes).most_common()),
        image_modes={str(k): int(v) for k, v in modes.items()},
        unreadable=unreadable,
        duplicates=findings,
        duplicate_clusters=sum(size > 1 for size in Counter(clusters).values()),
        near_threshold=near_threshold,
        overlap_checked=overlap_checked,
    )
    labels = [str(v) for v in table["label"]]
    report.label_conflicts = [
        f
        for f, p in zip(findings, sorted(pairs, key=lambda p: (p.first, p.second)), strict=True)
        if labels[p.first] != labels[p.second]
    ]
    if splits is not None and split_of_row is not None:
        _audit_split(report, manifest, splits, split_of_row)
    return report


def _audit_split(report: AuditReport, manifest: Manifest, splits: SplitResult, split_of_row: list[str]) -> None:
    table = manifest.table.assign(split=split_of_row)
    report.split_level = splits.metadata.get("level") or ("patient" if manifest.has_patients else "image")
    counts: dict[str, dict[str, int]] = {}
    for (split, label), n in table.groupby(["split", "label"]).size().items():
        counts.setdefault(str(split), {})[str(label)] = int(n)
    report.split_counts = counts
    named = table["patient_id"].notna() & (table["patient_id"].astype(str) != "")
    if named.any():  # a multi-source manifest may name patients for some sources only: check those
        for patient, rows in table[named].groupby("patient_id"):
            sides = sorted(set(rows["split"]))
            if len(sides) > 1:
                report.patient_leaks.append(PatientLeak(patient_id=str(patient), splits=sides, images=len(rows)))
    report.duplicate_leaks = [d for d in report.duplicates if d.straddles]
    if report.split_level == "image":
        report.notes.append("the split is image-level (no patient IDs): leakage can only be checked for duplicates")
    for split, by_label in counts.items():
        missing = sorted(set(report.class_counts) - set(by_label))
        if missing:
            report.notes.append(f"split {split!r} has no {', '.join(missing)} images")


def report_summary(report: AuditReport) -> dict[str, Any]:
    """The headline numbers of an audit, for a one-screen summary."""
    return {
        "rows": report.manifest_rows,
        "unreadable": len(report.unreadable),
        "exact duplicate pairs": sum(d.kind == "exact" for d in report.duplicates),
        "near duplicate pairs": sum(d.kind == "near" for d in report.duplicates),
        "overlapping field pairs": sum(d.kind == "overlap" for d in report.duplicates),
        "patients straddling splits": len(report.patient_leaks),
        "duplicates straddling splits": len(report.duplicate_leaks),
        "duplicates with different labels": len(report.label_conflicts),
    }
