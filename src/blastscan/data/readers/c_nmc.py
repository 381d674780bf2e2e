"""C-NMC 2019 (ISBI challenge): segmented single cells on black, 450x450 BMP (and the converted copies that circulate).

Three variants are read, in any image format blastscan reads (BMP, PNG, JPEG, TIFF), and the scan's notes say which:
- training folds: `fold_k/{all,hem}/UID_<subject>_<image>_<cell>_<all|hem>.<ext>`; healthy subjects have an `H` prefix;
- the renamed test set: `N.<ext>` files plus a labels CSV that maps each new name to its original name (a converted
  copy whose files changed extension is matched by the number);
- UID-named cells in any other layout: flat folders, nested ones, any depth. The label and the subject come from the
  name; a cell inside an `all/` or `hem/` folder must agree with it. Picked when nearly all the image files under the
  folder (`UID_SHARE` of a sample of up to `UID_SAMPLE`) carry C-NMC names, so a lab folder is not taken for C-NMC.
The patient is the subject (`UID_<subject>`), so splits can be patient-level.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from blastscan.data.images import IMAGE_SUFFIXES
from blastscan.data.listing import list_folder, one_row_per_file, real_path, skipped_note
from blastscan.data.manifest import LEUKEMIC, NORMAL
from blastscan.data.registry import READERS, DatasetReader, ReaderOptions
from blastscan.errors import DatasetError

_IMAGE_ENDING = r"\.(?:bmp|png|jpe?g|tiff?)$"
_ORIGINAL = re.compile(r"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)" + _IMAGE_ENDING, re.IGNORECASE)
_RENAMED = re.compile(r"^\d+" + _IMAGE_ENDING, re.IGNORECASE)
_CLASS_LABEL = {"all": LEUKEMIC, "hem": NORMAL}
#: Image files sampled to decide whether a folder of any layout holds C-NMC cells, and the share that must be
#: UID-named: C-NMC copies hold nothing else, while a lab folder with a few such names is a lab folder.
UID_SAMPLE = 400
UID_SHARE = 0.9


def _uid_named_tree(root: Path) -> bool:
    """True when nearly all of a sample of the image files under `root` (any depth) carry C-NMC names."""
    seen = named = 0
    for _, subfolders, files in os.walk(root):  # links to folders are not followed, as `list_folder` does
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            seen += 1
            named += bool(_ORIGINAL.match(name))
            if seen >= UID_SAMPLE:
                return named >= UID_SHARE * seen
    return seen > 0 and named >= UID_SHARE * seen


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
    single_cells = True
    description = (
        "C-NMC 2019 fold_*/{all,hem}/UID_*.bmp, N.bmp + a labels CSV, or UID_<subject>_<image>_<cell>_<all|hem> "
        "cells in any folders (BMP, PNG, JPEG, TIFF)"
    )

    def locate(self, root: Path) -> Path | None:
        if not root.is_dir():
            return None
        for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
            if _fold_dirs(candidate):
                return candidate
        if any(_RENAMED.match(p.name) for p in root.iterdir()) and _labels_csv_near(root) is not None:
            return root
        if _uid_named_tree(root):
            return root
        return None

    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        if options.labels_csv is not None or (
            any(_RENAMED.match(p.name) for p in located.iterdir()) and _labels_csv_near(located) is not None
        ):
            notes.append("C-NMC variant: the renamed test set (N.<ext> with a labels CSV)")
            return self._renamed_rows(located, options, notes)
        return self._uid_rows(located, notes)

    def _uid_rows(self, located: Path, notes: list[str]) -> list[dict[str, Any]]:
        """Every UID-named image under `located`, at any depth: the training folds, or any other layout."""
        listing = list_folder(located, [real_path(located)], recursive=True)
        rows, other_names = [], []
        for path in listing.images:
            match = _ORIGINAL.match(path.name)
            if match is None:
                other_names.append(path)
                continue
            parts = path.parent.relative_to(located).parts
            class_folder = next((part.lower() for part in reversed(parts) if part.lower() in _CLASS_LABEL), None)
            if class_folder is not None and class_folder != match.group(4).lower():
                raise DatasetError(
                    f"{path}: the name says {match.group(4)!r} but the file sits in a {class_folder}/ folder; "
                    "move it to the matching folder"
                )
            fold = next((part for part in parts if part.lower().startswith("fold")), None)
            rows.append(_row(path.relative_to(located).as_posix(), match, **({"fold": fold} if fold else {})))
        folds = _fold_dirs(located)
        if folds and all(any(path.is_relative_to(fold) for fold in folds) for path in listing.images):
            notes.append(f"C-NMC variant: the training folds ({', '.join(f.name for f in folds)}/all|hem)")
        else:
            endings = sorted({path.suffix.lower() for path in listing.images})
            notes.append(
                f"C-NMC variant: UID-named cells in {len({p.parent for p in listing.images})} folder(s), "
                f"{', '.join(endings)} files (label and subject read from each name)"
            )
        if other_names:
            notes.append(
                f"left out {len(other_names)} image(s) not named UID_<subject>_<image>_<cell>_<all|hem>.<ext>, "
                f"e.g. {other_names[0].relative_to(located).as_posix()}"
            )
        if note := skipped_note(listing.skipped, located):
            notes.append(note)
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
        # A converted copy keeps the numbers but not the extension the CSV names (1.bmp -> 1.png).
        by_number = {p.stem: p.name for p in located.iterdir() if _RENAMED.match(p.name)}
        for new_name, original in zip(table[new_col], table[original_col], strict=True):
            match = _ORIGINAL.match(str(original).strip())
            if match is None:
                raise DatasetError(f"{csv_path}: {original!r} in column {original_col!r} is not a C-NMC name")
            name = new_name if (located / new_name).is_file() else by_number.get(Path(new_name).stem)
            if name is None:
                missing.append(new_name)
                continue
            rows.append(_row(name, match, original_name=original))
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
