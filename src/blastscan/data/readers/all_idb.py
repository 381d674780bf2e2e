"""ALL-IDB (Donida Labati et al., ICIP 2011): ALL-IDB1 smear fields and ALL-IDB2 single-cell crops.

File names carry the label, `ImXXX_Y.ext` with Y=1 for a blast / an ALL patient's field and Y=0 otherwise.
Neither set records patients, so `patient_id` stays empty and `split` groups duplicates instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image

from blastscan.data.listing import one_row_per_file
from blastscan.data.manifest import LEUKEMIC, NORMAL
from blastscan.data.registry import READERS, DatasetReader, ReaderOptions
from blastscan.errors import DatasetError

_NAME = re.compile(r"^Im(\d{3})_([01])\.(tif|tiff|jpg|jpeg)$", re.IGNORECASE)


def _labelled_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files in `folder` named `ImXXX_Y` with one of `suffixes`."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.suffix.lower() in suffixes)


def _note_unnamed(folder: Path, suffixes: tuple[str, ...], notes: list[str]) -> None:
    """A note naming the picture files in `folder` (any type Pillow knows) that the reader leaves out."""
    pictures = set(Image.registered_extensions())
    read = set(_labelled_files(folder, suffixes))
    left_out = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in pictures and not p.name.startswith(".") and p not in read and p.is_file()
    )
    if left_out:
        more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
        named = ", ".join(p.name for p in left_out[:5]) + more
        notes.append(f"left out {len(left_out)} picture file(s) not named ImXXX_Y{suffixes[0]}: {named}")


def _first_with_files(root: Path, subfolders: tuple[str, ...], suffixes: tuple[str, ...]) -> Path | None:
    for candidate in (root, *(root / s for s in subfolders)):
        if _labelled_files(candidate, suffixes):
            return candidate
    return None


def _row(path: Path, match: re.Match[str], dataset: str) -> dict[str, Any]:
    """The manifest row an `ImXXX_Y` file name gives: no patient, label from Y."""
    label = LEUKEMIC if match.group(2) == "1" else NORMAL
    return {"path": path.name, "label": label, "patient_id": None, "dataset": dataset, "source_label": match.group(2)}


@READERS.register("all-idb2")
class AllIdb2Reader(DatasetReader):
    """ALL-IDB2: 260 single-cell crops `ImXXX_Y.tif`; Y says whether the centre cell is a blast."""

    name = "all-idb2"
    single_cells = True
    description = "ALL-IDB2 crops ImXXX_Y.tif (in ROOT or ROOT/img)"

    def locate(self, root: Path) -> Path | None:
        return _first_with_files(root, ("img", "ALL_IDB2/img"), (".tif", ".tiff"))

    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        rows = []
        for path in _labelled_files(located, (".tif", ".tiff")):
            match = _NAME.match(path.name)
            assert match is not None  # _labelled_files only returns matching names
            rows.append(_row(path, match, self.name))
        _note_unnamed(located, (".tif", ".tiff"), notes)
        notes.append("ALL-IDB2 records no patients: splits will be image-level, with duplicates grouped")
        return one_row_per_file(rows, located, notes)


@READERS.register("all-idb1")
class AllIdb1Reader(DatasetReader):
    """ALL-IDB1: smear fields `im/ImXXX_Y.jpg` with blast centroids in `xyc/ImXXX_Y.xyc`."""

    name = "all-idb1"
    description = "ALL-IDB1 fields ImXXX_Y.jpg with xyc/ImXXX_Y.xyc centroids (in ROOT or ROOT/im)"

    def locate(self, root: Path) -> Path | None:
        found = _first_with_files(root, ("im", "ALL_IDB1/im"), (".jpg", ".jpeg"))
        # A folder of ALL-IDB1 fields without its xyc folder is still ALL-IDB1, but centroids are then missing.
        return found

    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        xyc_dir = next((d for d in (located.parent / "xyc", located / "xyc") if d.is_dir()), None)
        if xyc_dir is None:
            notes.append(f"no xyc/ folder beside {located}: blast centroids are left empty")
        rows = []
        for path in _labelled_files(located, (".jpg", ".jpeg")):
            match = _NAME.match(path.name)
            assert match is not None
            centroids = _read_centroids(xyc_dir / f"{path.stem}.xyc") if xyc_dir else None
            rows.append(
                {
                    **_row(path, match, self.name),
                    "blast_centroids": json.dumps(centroids) if centroids is not None else None,
                }
            )
        _note_unnamed(located, (".jpg", ".jpeg"), notes)
        notes.append("ALL-IDB1 records no patients: splits will be image-level, with duplicates grouped")
        return one_row_per_file(rows, located, notes)


def _read_centroids(path: Path) -> list[list[int]] | None:
    """The `x<TAB>y` lines of an ALL-IDB1 `.xyc` file, or None when the file is missing."""
    if not path.is_file():
        return None
    centroids = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
            raise DatasetError(f"{path}:{number}: expected 'x<TAB>y' integers, found {line!r}")
        centroids.append([int(parts[0]), int(parts[1])])
    return centroids
