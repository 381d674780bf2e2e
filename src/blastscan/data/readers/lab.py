"""A laboratory's own data: a folder per class, or a CSV listing `path,label[,patient_id]`."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from blastscan.data.images import is_image_file
from blastscan.data.listing import list_folder, one_row_per_file, real_path, skipped_note
from blastscan.data.manifest import LEUKEMIC, NORMAL
from blastscan.data.registry import READERS, DatasetReader, ReaderOptions
from blastscan.errors import DatasetError

#: Class names labs commonly use, mapped onto the binary task; any other name is kept as it is.
LABEL_SYNONYMS: dict[str, str] = {
    **dict.fromkeys(
        [
            "all",
            "aml",
            "blast",
            "blasts",
            "leukemic",
            "leukemia",
            "leukaemia",
            "malignant",
            "abnormal",
            "positive",
            "1",
        ],
        LEUKEMIC,
    ),
    **dict.fromkeys(["hem", "normal", "healthy", "benign", "negative", "0"], NORMAL),
}


#: Labels that mark a missing value (pandas' and spreadsheets' NA spellings), never a class.
MISSING_LABELS: frozenset[str] = frozenset({"nan", "na", "n/a", "#n/a", "null", "none", "<na>"})


def normalise_label(raw: object) -> str:
    """Map a lab's class name onto `leukemic` / `normal` when it is a known synonym; otherwise keep it."""
    text = str(raw).strip()
    return LABEL_SYNONYMS.get(text.lower(), text)


def _class_dirs(root: Path) -> list[Path]:
    """The class folders of a folder-per-class dataset: the visible folders (or links to folders) under `root`."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@READERS.register("folder")
class FolderReader(DatasetReader):
    """ROOT/<class>/*.png (or ROOT/<class>/<patient>/*.png): one folder per class.

    What is read, and what a lab can expect from links:
    - each folder directly under ROOT is a class (hidden ones are ignored); a class folder may itself be a link to a
      folder kept elsewhere, which is how a dataset is often assembled from an archive;
    - inside a class folder, links to folders are not followed: a link such as `leukemic/up -> ..` would otherwise
      read the other class's images under this label. They are left out and listed in the scan's notes; to bring in
      a folder kept elsewhere, link the class folder itself or copy the folder in;
    - a link to a file is read when the file lies inside ROOT or a class folder, and left out otherwise;
    - files of a type blastscan does not read (an animated GIF, a text file) are left out and listed in the notes;
    - images are identified by their real path: one file reached twice under one class is read once, and one file
      reached under two classes stops the scan with an error naming both paths.
    """

    name = "folder"
    description = "a folder per class, ROOT/<class>/[<patient>/]image"
    generic = True

    def locate(self, root: Path) -> Path | None:
        return root if len(self._classes_with_images(root)) >= 2 else None

    def explain_miss(self, root: Path) -> str | None:
        if not root.is_dir():
            return None
        with_images = self._classes_with_images(root)
        if len(with_images) == 1:
            others = [f"{d.name}/" for d in _class_dirs(root) if d not in with_images]
            empty = f" ({', '.join(others)} hold(s) none that blastscan reads)" if others else ""
            return (
                f"only one class folder holds images: {with_images[0].name}/{empty}; a folder-per-class dataset needs "
                "two or more, e.g. ROOT/leukemic/ and ROOT/normal/"
            )
        if not with_images and any(is_image_file(p) for p in root.iterdir()):
            return "the images sit directly in ROOT; put each class's images in its own folder, ROOT/<class>/"
        return None

    def _classes_with_images(self, root: Path) -> list[Path]:
        if not root.is_dir():
            return []
        return [d for d in _class_dirs(root) if any(is_image_file(p) for p in d.rglob("*"))]

    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        class_dirs = _class_dirs(located)
        if not class_dirs:
            raise DatasetError(f"{located}: no class folders; put each class's images in ROOT/<class>/")
        dataset_folders = [real_path(located), *(real_path(d) for d in class_dirs)]
        rows: list[dict[str, Any]] = []
        skipped: list[tuple[Path, str]] = []
        for class_dir in class_dirs:
            top = list_folder(class_dir, dataset_folders)
            images = [(image, None) for image in top.images]
            for patient_dir in top.folders:
                below = list_folder(patient_dir, dataset_folders, recursive=True)
                images += [(image, patient_dir.name) for image in below.images]
                skipped += below.skipped
            skipped += top.skipped
            if not images:
                left_out = [f"{p.name} ({reason})" for p, reason in skipped if p.is_relative_to(class_dir)]
                why = f" (left out: {', '.join(left_out[:5])})" if left_out else ""
                raise DatasetError(f"{class_dir}: class {class_dir.name!r} has no images{why}; add images or remove it")
            rows += [self._row(located, image, class_dir.name, patient) for image, patient in images]
        note = skipped_note(skipped, located)
        if note:
            notes.append(note)
        rows = one_row_per_file(rows, located, notes)
        if any(r["patient_id"] is not None for r in rows):
            notes.append("sub-folders of class folders were read as patient IDs")
        return rows

    def _row(self, located: Path, image: Path, class_name: str, patient: str | None) -> dict[str, Any]:
        return {
            "path": image.relative_to(located).as_posix(),
            "label": normalise_label(class_name),
            "patient_id": patient,
            "dataset": located.name,
            "source_label": class_name,
        }


@READERS.register("csv")
class CsvReader(DatasetReader):
    """A CSV with columns path,label[,patient_id]; paths relative to the CSV's folder (or --csv-root).

    Every path, once `..` and links are resolved, must lie inside that folder (absolute paths too): a row that
    leads out of it stops the scan with its line number, before any file is opened. A missing-value label (`NaN`,
    `NA`, `null`, ...) is refused with its line number; other labels that are neither leukemic nor normal, and
    paths listed more than once, are kept and noted (training refuses one image under two labels).
    """

    name = "csv"
    description = "a CSV file with columns path,label[,patient_id]"
    generic = True

    def locate(self, root: Path) -> Path | None:
        return root if root.is_file() and root.suffix.lower() == ".csv" else None

    def image_root(self, located: Path, options: ReaderOptions) -> Path:
        return Path(options.csv_root) if options.csv_root else located.parent

    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        try:
            table = pd.read_csv(located, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{located}: not a readable CSV ({exc})") from exc
        table.columns = [c.strip() for c in table.columns]
        for column in ("path", "label"):
            if column not in table.columns:
                raise DatasetError(
                    f"{located}: missing column {column!r} (columns are {', '.join(table.columns) or 'none'}); "
                    "a lab CSV needs path,label[,patient_id]"
                )
        image_root = self.image_root(located, options).resolve()
        rows = []
        for number, record in enumerate(table.to_dict("records"), start=2):
            raw_path, raw_label = record["path"].strip(), record["label"].strip()
            if not raw_path or not raw_label:
                raise DatasetError(f"{located}:{number}: empty path or label")
            if raw_label.lower() in MISSING_LABELS:
                raise DatasetError(
                    f"{located}:{number}: label {raw_label!r} for {raw_path} marks a missing value, not a class; "
                    "write the image's class or remove the row"
                )
            path = _path_inside(Path(raw_path), image_root, f"{located}:{number}")
            patient = record.get("patient_id", "").strip() or None
            extra = {k: v for k, v in record.items() if k not in ("path", "label", "patient_id")}
            rows.append(
                {
                    **extra,
                    "path": path.as_posix(),
                    "label": normalise_label(raw_label),
                    "patient_id": patient,
                    "dataset": extra.get("dataset") or located.stem,
                    "source_label": raw_label,
                }
            )
        _note_labels_and_repeats(rows, notes)
        return rows


def _path_inside(path: Path, image_root: Path, where: str) -> Path:
    """`path` (relative to `image_root`, or absolute) as a path relative to `image_root`, which must hold it.

    The check is made on the resolved path, so `..` and links that lead out of the root are refused like absolute
    paths outside it: a CSV must not make blastscan read files it was not pointed at.
    """
    full = path if path.is_absolute() else image_root / path
    try:
        resolved = full.resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise DatasetError(f"{where}: {path} cannot be resolved ({exc}); fix the path or the links") from None
    if not resolved.is_relative_to(image_root):
        shown = f"{path} (which resolves to {resolved})" if resolved != full else str(path)
        raise DatasetError(
            f"{where}: {shown} is outside the image root {image_root}; every path must lie inside it: pass "
            "--csv-root to a folder that holds every image, or fix the path"
        )
    if path.is_absolute():
        return resolved.relative_to(image_root)
    return Path(os.path.normpath(path))


def _note_labels_and_repeats(rows: list[dict[str, Any]], notes: list[str]) -> None:
    """Notes for labels that are neither leukemic nor normal, and for paths listed more than once."""
    others: dict[str, int] = {}
    for row in rows:
        if row["label"] not in (LEUKEMIC, NORMAL):
            others[row["label"]] = others.get(row["label"], 0) + 1
    if others:
        listed = ", ".join(f"{label!r} ({n})" for label, n in sorted(others.items()))
        notes.append(f"label(s) other than {LEUKEMIC}/{NORMAL} were kept as their own classes: {listed}")
    times = Counter(row["path"] for row in rows)
    repeated = [path for path, n in times.items() if n > 1]
    if repeated:
        labels_of: dict[str, set[str]] = {}
        for row in rows:
            labels_of.setdefault(row["path"], set()).add(row["label"])
        mixed = [p for p in repeated if len(labels_of[p]) > 1]
        notes.append(
            f"{len(repeated)} path(s) are listed more than once, e.g. {repeated[0]}"
            + (f"; {len(mixed)} of them with different labels, e.g. {mixed[0]}" if mixed else "")
        )
