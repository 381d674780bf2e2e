"""C-NMC 2019 (ISBI challenge): segmented single cells on black, 450x450 BMP.

Two layouts are read:
- training: `fold_k/{all,hem}/UID_<subject>_<image>_<cell>_<all|hem>.bmp`; healthy subjects have an `H` prefix;
- preliminary test: renamed `N.bmp` files plus a labels CSV that maps each new name to its original name.
The patient is the subject (`UID_<subject>`), so splits can be patient-level.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from blastscan.data.listing import one_row_per_file
from blastscan.data.manifest import LEUKEMIC, NORMAL
from blastscan.data.registry import READERS, DatasetReader, ReaderOptions
from blastscan.errors import DatasetError

_ORIGINAL = re.compile(r"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.bmp$", re.IGNORECASE)
_RENAMED = re.compile(r"^\d+\.bmp$", re.IGNORECASE)
_CLASS_LABEL = {"all": LEUKEMIC, "hem": NORMAL}


def _fold_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("fold_*") if p.is_dir() and any((p / c).is_dir() for c in _CLASS_LABEL))


def _labels_csv_near(folder: Path) -> Path | None:
    """A CSV in `folder` or its parent whose name mentions labels (the preliminary-test labels file)."""
    for candidate_dir in (folder, folder.parent):
        found = sorted(p for p in candidate_dir.glob("*.csv") if "label" in p.name.lower())
        if found:
            return found[0]
    return None


@READERS.register("c-nmc")
class CnmcReader(DatasetReader):
    """C-NMC 2019 training folds, or the renamed preliminary-test set with its labels CSV."""

    name = "c-nmc"
    description = "C-NMC 2019 fold_*/{all,hem}/UID_*.bmp, or N.bmp + a labels CSV"

    def locate(self, root: Path) -> Path | None:
        if not root.is_dir():
            return None
        for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
            if _fold_dirs(candidate):
                return candidate
        if any(_RENAMED.match(p.name) for p in root.iterdir()) and _labels_csv_near(root) is not None:
            return root
        return None

    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        if _fold_dirs(located):
            return self._training_rows(located, notes)
        return self._renamed_rows(located, options, notes)

    def _training_rows(self, located: Path, notes: list[str]) -> list[dict[str, Any]]:
        rows = []
        skipped: list[str] = []
        for fold in _fold_dirs(located):
            for class_name in _CLASS_LABEL:
                class_dir = fold / class_name
                if not class_dir.is_dir():
                    continue
                for path in sorted(class_dir.iterdir()):
                    match = _ORIGINAL.match(path.name)
                    if match is None:
                        if path.is_file() and not path.name.startswith("."):
                            skipped.append(str(path.relative_to(located)))
                        continue
                    if match.group(4).lower() != class_name:
                        raise DatasetError(
                            f"{path}: the name says {match.group(4)!r} but the file sits in {class_name}/; "
                            "move it to the matching folder"
                        )
                    rows.append(_row(path.relative_to(located).as_posix(), match, fold=fold.name))
        if skipped:
            notes.append(
                f"left out {len(skipped)} file(s) not named UID_<subject>_<image>_<cell>_<all|hem>.bmp, "
                f"e.g. {skipped[0]}"
            )
        return one_row_per_file(rows, located, notes)

    def _renamed_rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        csv_path = options.labels_csv or _labels_csv_near(located)
        if csv_path is None:
            raise DatasetError(f"{located}: renamed C-NMC images need their labels CSV; pass it with --labels-csv")
        table = pd.read_csv(csv_path, dtype=str)
        new_col = _column_matching(table, _RENAMED, csv_path, "the new file names (e.g. 1.bmp)")
        original_col = _column_matching(table, _ORIGINAL, csv_path, "the original names (UID_..._all.bmp)")
        rows = []
        missing = []
        for new_name, original in zip(table[new_col], table[original_col], strict=True):
            match = _ORIGINAL.match(str(original).strip())
            if match is None:
                raise DatasetError(f"{csv_path}: {original!r} in column {original_col!r} is not a C-NMC name")
            if not (located / new_name).is_file():
                missing.append(new_name)
                continue
            rows.append(_row(new_name, match, original_name=original))
        if missing:
            notes.append(f"{len(missing)} file(s) listed in {csv_path.name} are not in {located}, e.g. {missing[0]}")
        return rows


def _row(path: str, match: re.Match[str], **extra: str) -> dict[str, Any]:
    subject = match.group(1).upper()
    return {
        "path": path,
        "label": _CLASS_LABEL[match.group(4).lower()],
        "patient_id": subject,
        "dataset": "c-nmc",
        "source_label": match.group(4).lower(),
        "diagnosis": "healthy" if subject.startswith("H") else "ALL",
        **extra,
    }


def _column_matching(table: pd.DataFrame, pattern: re.Pattern[str], csv_path: Path, what: str) -> str:
    """The first column whose non-empty values all match `pattern`."""
    for column in table.columns:
        values = table[column].dropna().astype(str).str.strip()
        if len(values) and values.map(lambda v: bool(pattern.match(v))).all():
            return str(column)
    raise DatasetError(f"{csv_path}: no column holds {what}; columns are {', '.join(map(str, table.columns))}")
