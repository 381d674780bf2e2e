"""Train/validation/test splits (or K folds) that keep every patient, and every duplicate cluster, on one side.

Splits are stratified by label and grouped by patient with scikit-learn's `StratifiedGroupKFold`. A dataset
without patient IDs (ALL-IDB) is grouped by duplicate cluster instead (exact, near and overlapping images, see
`duplicates`), which is weaker: different images of one patient can still land on both sides.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from blastscan.data.duplicates import DEFAULT_NEAR_THRESHOLD, duplicate_groups, find_duplicates
from blastscan.data.manifest import Manifest
from blastscan.errors import SplitError

SPLITS_MAGIC = "# blastscan-splits "
SPLIT_NAMES = ("train", "val", "test")
IMAGE_LEVEL_WARNING = (
    "this dataset records no patient IDs, so the split is image-level: duplicate and near-duplicate images are kept "
    "together, but different cells or fields from one patient can still fall on both sides, which makes test "
    "results optimistic compared with a patient-level split"
)


@dataclass
class SplitResult:
    """One split label per manifest row (`table`: path, split, group) and how it was made (`metadata`)."""

    table: pd.DataFrame
    metadata: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def level(self) -> str:
        """`patient` or `image`."""
        return str(self.metadata["level"])

    def counts(self) -> pd.DataFrame:
        """Images per split and label."""
        return pd.crosstab(self.table["split"], self.table["label"])


def manifest_digest(manifest: Manifest) -> str:
    """SHA-256 of the manifest's paths and labels, so a split file records which manifest it was made from."""
    rows = manifest.table["path"].astype(str) + "\t" + manifest.table["label"].astype(str)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _fold_plan(fractions: tuple[float, float, float], n_groups: int) -> tuple[int, list[int]]:
    """How many equal folds to cut, and how many of them go to train, val and test.

    Cutting K stratified group folds and handing out whole folds keeps sklearn's guarantees (grouping, label
    balance); K is the fold count (<= 20 and <= the smallest class's group count) whose multiples best match the
    requested fractions, with at least one fold for every non-zero fraction.
    """
    best: tuple[float, int, list[int]] | None = None
    for k in range(2, min(20, n_groups) + 1):
        counts = [round(f * k) for f in fractions]
        if any(f > 0 and c == 0 for f, c in zip(fractions, counts, strict=True)):
            continue
        counts[0] = k - counts[1] - counts[2]
        if counts[0] <= 0:
            continue
        error = sum(abs(c / k - f) for c, f in zip(counts, fractions, strict=True))
        if best is None or error < best[0] - 1e-9:
            best = (error, k, counts)
    if best is None:
        raise SplitError(
            f"cannot make a {fractions} split from {n_groups} group(s) per class; "
            "add data, or use fewer splits (e.g. --val 0)"
        )
    return best[1], best[2]


def _groups(
    manifest: Manifest, near_threshold: int, check_overlap: bool | None, workers: int
) -> tuple[np.ndarray, str, dict[str, Any]]:
    if manifest.has_patients:
        return manifest.table["patient_id"].astype(str).to_numpy(), "patient", {}
    pairs = find_duplicates(
        manifest.absolute_paths(), near_threshold=near_threshold, check_overlap=check_overlap, workers=workers
    )
    groups = duplicate_groups(len(manifest), pairs)
    info = {
        "duplicate_pairs": len(pairs),
        "duplicate_groups": len({g for g in groups if groups.count(g) > 1}),
        "near_threshold": near_threshold,
    }
    return np.array([f"dup-{g:05d}" for g in groups]), "image", info


def make_split(
    manifest: Manifest,
    train: float = 0.7,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    folds: int | None = None,
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    check_overlap: bool | None = None,
    workers: int = 4,
) -> SplitResult:
    """Split `manifest` into train/val/test (or `folds` folds), stratified by label and grouped.

    Groups are patients when every row has a patient ID, otherwise duplicate clusters. The same manifest and
    seed always give the same split.
    """
    fractions = (train, val, test)
    if any(f < 0 or f >= 1 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise SplitError(f"--train/--val/--test must be in [0, 1) and sum to 1; got {train}, {val}, {test}")
    if folds is not None and folds < 2:
        raise SplitError(f"--folds must be at least 2, got {folds}")
    labels = manifest.table["label"].astype(str).to_numpy()
    groups, level, group_info = _groups(manifest, near_threshold, check_overlap, workers)
    groups_per_class = min(len(set(groups[labels == label])) for label in set(labels))

    if folds is not None:
        if folds > groups_per_class:
            raise SplitError(f"--folds {folds} is more than the {groups_per_class} group(s) of the smallest class")
        k, allotment = folds, None
    else:
        k, allotment = _fold_plan(fractions, groups_per_class)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of_row = np.empty(len(labels), dtype=int)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold_of_row[held_out] = fold

    if allotment is None:
        split = fold_of_row.astype(str)
    else:
        fold_to_split = np.array([name for name, n in zip(SPLIT_NAMES, allotment, strict=True) for _ in range(n)])
        # Folds are handed out in a seeded order so val/test are not always sklearn's last folds.
        split_of_fold = fold_to_split[np.random.default_rng(seed).permutation(k)]
        split = split_of_fold[fold_of_row]

    table = pd.DataFrame({"path": manifest.table["path"], "split": split, "group": groups, "label": labels})
    warnings = [IMAGE_LEVEL_WARNING] if level == "image" else []
    if len(set(labels)) < 2:
        warnings.append(f"every image has the label {labels[0]!r}: the split is grouped but cannot be stratified")
    for name in sorted(set(split)):
        missing = sorted(set(labels) - set(labels[split == name]))
        if missing:
            warnings.append(f"split {name!r} has no {', '.join(missing)} images")
    metadata = {
        "method": "StratifiedGroupKFold",
        "level": level,
        "seed": seed,
        "fractions": None if folds else dict(zip(SPLIT_NAMES, fractions, strict=True)),
        "folds": folds,
        "fold_count": k,
        "folds_per_split": None if allotment is None else dict(zip(SPLIT_NAMES, allotment, strict=True)),
        "groups": len(set(groups)),
        "rows": len(table),
        "manifest_format": manifest.format,
        "manifest_sha256": manifest_digest(manifest),
        **group_info,
    }
    return SplitResult(table=table, metadata=metadata, warnings=warnings)


def write_splits(result: SplitResult, out: str | Path) -> Path:
    """Write a split file: a metadata comment line, then CSV rows path,split,group,label."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write(SPLITS_MAGIC + json.dumps({**result.metadata, "warnings": result.warnings}, sort_keys=True) + "\n")
        result.table.to_csv(fh, index=False)
    tmp.replace(out)
    return out


def read_splits(path: str | Path, manifest: Manifest | None = None) -> SplitResult:
    """Read a split file; with `manifest`, check that it covers exactly the manifest's rows, in order."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: no such split file; make one with `blastscan data split MANIFEST --out {path}`")
    with path.open(encoding="utf-8") as fh:
        first = fh.readline()
    metadata: dict[str, Any] = {}
    skip = 0
    if first.startswith(SPLITS_MAGIC):
        metadata, skip = json.loads(first[len(SPLITS_MAGIC) :]), 1
    table = pd.read_csv(path, skiprows=skip, dtype=str, keep_default_na=False)
    for column in ("path", "split"):
        if column not in table.columns:
            raise SplitError(f"{path}: missing column {column!r}; a split file needs path,split")
    if manifest is not None:
        mine, theirs = list(manifest.table["path"]), list(table["path"])
        if mine != theirs:
            missing = sorted(set(mine) - set(theirs))[:3]
            extra = sorted(set(theirs) - set(mine))[:3]
            raise SplitError(
                f"{path}: does not match the manifest ({len(theirs)} rows vs {len(mine)}; missing e.g. {missing}, "
                f"unknown e.g. {extra}); re-run `blastscan data split` on this manifest"
            )
    return SplitResult(table=table, metadata=metadata, warnings=list(metadata.pop("warnings", [])))
