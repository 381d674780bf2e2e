"""BCCD: 640x480 smear fields with Pascal VOC boxes for WBC, RBC and platelets (a detection dataset).

BCCD carries no leukemia label, so `label` is `unlabelled`; the leukocyte boxes (`boxes`, JSON) and the
dataset's own train/val/test lists (`official_split`) are kept for whole-field work.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from blastscan.data.registry import READERS, DatasetReader, ReaderOptions
from blastscan.errors import DatasetError

UNLABELLED = "unlabelled"


@READERS.register("bccd")
class BccdReader(DatasetReader):
    """BCCD: JPEGImages/*.jpg + Annotations/*.xml (+ ImageSets/Main/{train,val,test}.txt)."""

    name = "bccd"
    description = "BCCD JPEGImages/ + Annotations/*.xml (Pascal VOC)"

    def locate(self, root: Path) -> Path | None:
        for candidate in (root, root / "BCCD"):
            if (candidate / "JPEGImages").is_dir() and (candidate / "Annotations").is_dir():
                return candidate
        return None

    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        official = _official_splits(located / "ImageSets" / "Main")
        rows = []
        without_annotation = 0
        for image in sorted((located / "JPEGImages").glob("*.jpg")):
            xml_path = located / "Annotations" / f"{image.stem}.xml"
            boxes = _read_boxes(xml_path) if xml_path.is_file() else None
            without_annotation += boxes is None
            rows.append(
                {
                    "path": image.relative_to(located).as_posix(),
                    "label": UNLABELLED,
                    "patient_id": None,
                    "dataset": self.name,
                    "official_split": official.get(image.stem),
                    "boxes": json.dumps(boxes) if boxes is not None else None,
                }
            )
        if without_annotation:
            notes.append(f"{without_annotation} BCCD image(s) have no annotation file")
        notes.append("BCCD has no leukemia labels (label = unlabelled); it serves whole-field leukocyte work")
        return rows


def _official_splits(folder: Path) -> dict[str, str]:
    splits: dict[str, str] = {}
    for name in ("train", "val", "test"):
        listing = folder / f"{name}.txt"
        if listing.is_file():
            splits.update({line.strip(): name for line in listing.read_text().splitlines() if line.strip()})
    return splits


def _read_boxes(path: Path) -> list[dict[str, Any]]:
    """The VOC objects of one annotation file as [{"name", "xmin", "ymin", "xmax", "ymax"}]."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{path}: not valid Pascal VOC XML ({exc})") from exc
    boxes = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        name = obj.findtext("name")
        if box is None or name is None:
            raise DatasetError(f"{path}: an <object> lacks its <name> or <bndbox>")
        try:
            coords = {k: int(float(box.findtext(k) or "")) for k in ("xmin", "ymin", "xmax", "ymax")}
        except ValueError as exc:
            raise DatasetError(f"{path}: a <bndbox> of {name!r} has a missing or non-numeric corner") from exc
        boxes.append({"name": name.strip(), **coords})
    return boxes
