"""A laboratory's own data: a folder per class, or a CSV listing `path,label[,patient_id]`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from blastscan.data.images import is_image_file
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


def normalise_label(raw: object) -> str:
    """Map a lab's class name onto `leukemic` / `normal` when it is a known synonym; otherwise keep it."""
    text = str(raw).strip()
    return LABEL_SYNONYMS.get(text.lower(), text)


@READERS.register("folder")
class FolderReader(DatasetReader):
    """ROOT/<class>/*.png (or ROOT/<class>/<patient>/*.png): one folder per class."""

    name = "folder"
    description = "a folder per class, ROOT/<class>/[<patient>/]image"
    generic = True

    def locate(self, root: Path) -> Path | None:
        if not root.is_dir():
            return None
        class_dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        has_images = [d for d in class_dirs if any(is_image_file(p) for p in d.rglob("*"))]
        return root if len(has_images) >= 2 else None

    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        class_dirs = sorted(p for p in located.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DatasetError(f"{located}: no class folders; put each class's images in ROOT/<class>/")
        rows: list[dict[str, Any]] = []
        for class_dir in class_dirs:
            direct = [p for p in sorted(class_dir.iterdir()) if is_image_file(p)]
            patient_dirs = [p for p in sorted(class_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
            if not direct and not patient_dirs:
                raise DatasetError(f"{class_dir}: class {class_dir.name!r} has no images; add images or remove it")
            for image in direct:
                rows.append(self._row(located, image, class_dir.name, None))
            for patient_dir in patient_dirs:
                for image in sorted(p for p in patient_dir.rglob("*") if is_image_file(p)):
                    rows.append(self._row(located, image, class_dir.name, patient_dir.name))
            if not any(r["source_label"] == class_dir.name for r in rows):
                raise DatasetError(f"{class_dir}: class {class_dir.name!r} has no images; add images or remove it")
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
    """A CSV with columns path,label[,patient_id]; paths relative to the CSV's folder (or --csv-root)."""

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
            path = Path(raw_path)
            if path.is_absolute():
                try:
                    path = path.resolve().relative_to(image_root)
                except ValueError:
                    raise DatasetError(
                        f"{located}:{number}: {raw_path} is outside {image_root}; pass --csv-root to a folder "
                        "that holds every image"
                    ) from None
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
        return rows
