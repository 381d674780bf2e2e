"""The manifest: one table row per image, with paths stored relative to a dataset root.

A manifest file is a CSV whose first line is a comment carrying JSON metadata (the root, the reader that made
it). Paths in the table are relative to that root, so a manifest keeps working when the dataset folder moves:
pass the new root, or keep the dataset beside the manifest (the root is also recorded relative to the file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blastscan.errors import ConfigError, DatasetError, TrainingError

MANIFEST_MAGIC = "# blastscan-manifest "
MANIFEST_VERSION = 1

#: Columns every manifest has, in this order; readers add what their source knows after them.
REQUIRED_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "group_id", "dataset")
#: Optional columns, written in this order when present.
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "source_label",
    "cell_type",
    "diagnosis",
    "age",
    "gender",
    "slide",
    "fold",
    "official_split",
    "blast_centroids",
    "boxes",
    "width",
    "height",
    "mode",
)

#: The binary task's two labels; readers of leukemia datasets map their own classes onto these.
LEUKEMIC = "leukemic"
NORMAL = "normal"


@dataclass
class Manifest:
    """A dataset as a table (`table`, one row per image) plus the folder its relative paths start from."""

    table: pd.DataFrame
    root: Path
    format: str = "unknown"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in self.table.columns]
        if missing:
            raise DatasetError(
                f"manifest is missing column(s) {', '.join(missing)}; every manifest needs "
                f"{', '.join(REQUIRED_COLUMNS)}"
            )
        self.root = Path(self.root)

    def __len__(self) -> int:
        return len(self.table)

    def absolute_paths(self) -> list[Path]:
        """Each row's image path, resolved against the root."""
        return [self.root / p for p in self.table["path"]]

    @property
    def has_patients(self) -> bool:
        """True when every row names its patient (so splits can be patient-level)."""
        ids = self.table["patient_id"]
        return bool(len(ids)) and bool(ids.notna().all()) and bool((ids.astype(str) != "").all())

    def class_counts(self) -> dict[str, int]:
        """Number of images per label."""
        return {str(k): int(v) for k, v in self.table["label"].value_counts().sort_index().items()}


def order_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Required columns first, then the known optional ones, then anything else a reader added."""
    known = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in table.columns]
    rest = [c for c in table.columns if c not in known]
    return table[known + rest]


def write_manifest(manifest: Manifest, out: str | Path) -> Path:
    """Write `manifest` to `out` (CSV with a metadata comment line); returns the path written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = manifest.root.resolve()
    meta = {
        **manifest.metadata,
        "version": MANIFEST_VERSION,
        "format": manifest.format,
        "root": str(root),
        "root_from_manifest": os.path.relpath(root, out.resolve().parent),
        "rows": len(manifest.table),
    }
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write(MANIFEST_MAGIC + json.dumps(meta, sort_keys=True) + "\n")
        order_columns(manifest.table).to_csv(fh, index=False)
    tmp.replace(out)
    return out


def read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read a manifest written by `write_manifest`.

    The dataset root is, in order of preference: `root` if given; the recorded absolute root if it exists; the
    recorded root relative to the manifest file if that exists. Otherwise a `DatasetError` says how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such manifest file; make one with `blastscan data scan ROOT --out {path}`")
    with path.open(encoding="utf-8") as fh:
        first = fh.readline()
    if not first.startswith(MANIFEST_MAGIC):
        raise DatasetError(
            f"{path}: not a blastscan manifest (its first line should start with {MANIFEST_MAGIC.strip()!r}); "
            "make one with `blastscan data scan`, or scan a lab CSV with `--format csv`"
        )
    try:
        meta = json.loads(first[len(MANIFEST_MAGIC) :])
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: the metadata line is not valid JSON ({exc}); re-run `blastscan data scan`"
        ) from exc
    table = pd.read_csv(
        path,
        skiprows=1,
        dtype={"path": str, "label": str, "patient_id": str, "group_id": str},
        keep_default_na=False,
        na_values=[""],
    )
    if root is None:
        candidates = [Path(meta.get("root", "")), (path.resolve().parent / meta.get("root_from_manifest", "."))]
        root = next((c for c in candidates if str(c) and c.is_dir()), None)
        if root is None:
            raise DatasetError(
                f"{path}: its dataset root {meta.get('root')!r} no longer exists; pass the new location with --root"
            )
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: the dataset root given for {path} is not a folder")
    return Manifest(table=table, root=root, format=str(meta.get("format", "unknown")), metadata=meta)


def class_targets(manifest: Manifest, positive_label: str) -> np.ndarray:
    """1 where the label is `positive_label`, else 0; refuses a manifest without that label or with one class."""
    labels = manifest.table["label"].astype(str)
    present = sorted(set(labels))
    if positive_label not in present:
        raise ConfigError(f"data.positive_label: {positive_label!r} is not a label of this dataset ({present})")
    if len(present) < 2:
        raise TrainingError(f"the dataset has only the label {positive_label!r}; a classifier needs two classes")
    return (labels == positive_label).to_numpy().astype(np.int64)


def patient_ids(manifest: Manifest) -> np.ndarray | None:
    """Each row's patient ID as a string array, or None when the manifest records no patients."""
    return manifest.table["patient_id"].astype(str).to_numpy() if manifest.has_patients else None
