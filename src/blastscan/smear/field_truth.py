"""Truth for whole-field evaluation: ALL-IDB1 centroid marks and BCCD leukocyte boxes.

ALL-IDB1 marks blast centroids in `xyc/` (tab-separated) and, from ALL-IDB-Patches, every other centroid in
`xyc_other/` (space-separated). Looking at the fields shows that `xyc_other/` marks platelets as well as
leukocytes (in healthy fields most of its marks sit on platelets lying on red cells). A leukocyte finder that
rightly ignores platelets would be charged with hundreds of misses, so `leukocyte_marks` separates them by the size
of the nucleus-coloured object under each mark: on ALL-IDB1 every blast mark's object is at least 1.4 red-cell
areas, the platelet marks' are under 0.25, and only 3 marks fall between 0.3 and 0.6. Both the split and the
counts are reported with the results, and `mark_sheet` draws the marks each side of it so a reader can check the
rule by eye.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from blastscan.errors import DatasetError
from blastscan.imaging.cell_focus import CellFocus
from blastscan.imaging.segmentation import disk_dilate, nucleus_cue
from blastscan.smear import find

__all__ = [
    "MIN_LEUKOCYTE_MARK_AREA",
    "bccd_wbc_boxes",
    "leukocyte_marks",
    "mark_object_areas",
    "mark_sheet",
    "read_marks",
]

#: A mark whose nucleus-coloured object (lobes within `find.LOBE_GAP` joined) covers at least this many red-cell
#: areas is a leukocyte; smaller ones are platelets (no ALL-IDB1 mark's object lies between 0.25 and 0.3).
MIN_LEUKOCYTE_MARK_AREA = 0.3
#: How far (red-cell diameters) from a mark its object may lie (annotators click near, not on, the centre).
MARK_REACH = 0.3


def read_marks(path: Path) -> np.ndarray:
    """(N, 2) x, y centroids of an ALL-IDB1 `.xyc` file (tab- or space-separated); empty when the file is absent."""
    if not path.is_file():
        return np.zeros((0, 2))
    points = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            points.append([float(parts[0]), float(parts[1])])
        except (IndexError, ValueError):
            raise DatasetError(f"{path}:{number}: expected 'x y' numbers, found {line!r}") from None
    return np.asarray(points, dtype=float).reshape(-1, 2)


def mark_object_areas(image: np.ndarray, marks: np.ndarray, red_cell_diameter: float) -> np.ndarray:
    """Area (red-cell areas) of the nucleus-coloured object nearest each mark, 0 when none is within reach."""
    if len(marks) == 0:
        return np.zeros(0)
    factor = min(1.0, find.WORKING_RBC / red_cell_diameter)
    pixels = ndi.gaussian_filter(find.resize_field(image, factor).astype(np.float64), sigma=(1, 1, 0))
    rbc = red_cell_diameter * factor
    mask = ndi.binary_opening(nucleus_cue(pixels) > find.NUCLEUS_MIN_CUE)
    groups, _ = ndi.label(disk_dilate(mask, find.LOBE_GAP * rbc / 2))
    groups = groups * mask
    areas = np.bincount(groups.ravel()) / (math.pi / 4 * rbc**2)
    reach = max(2, round(MARK_REACH * rbc))
    out = np.zeros(len(marks))
    for i, (x, y) in enumerate(marks):
        cx, cy = round(x * factor), round(y * factor)
        window = groups[max(0, cy - reach) : cy + reach + 1, max(0, cx - reach) : cx + reach + 1]
        labels = np.unique(window[window > 0])
        out[i] = float(areas[labels].max()) if labels.size else 0.0
    return out


def leukocyte_marks(image: np.ndarray, marks: np.ndarray, red_cell_diameter: float) -> np.ndarray:
    """Bool per mark: it sits on a leukocyte-sized nucleus (True) rather than a platelet (False)."""
    return mark_object_areas(image, marks, red_cell_diameter) >= MIN_LEUKOCYTE_MARK_AREA


def mark_sheet(tiles: Sequence[np.ndarray], out: Path, columns: int = 12, side: int = 96) -> Path:
    """Save a contact sheet of mark-centred tiles (for checking the platelet/leukocyte split by eye)."""
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * side, rows * side), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(Image.fromarray(tile).resize((side, side)), ((i % columns) * side, (i // columns) * side))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def bccd_wbc_boxes(boxes_json: list[dict] | None) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 of the `WBC` boxes of one BCCD annotation (as the BCCD reader stores them)."""
    boxes = [[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in boxes_json or [] if b["name"] == "WBC"]
    return np.asarray(boxes, dtype=float).reshape(-1, 4)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def framing_against_boxes(field: np.ndarray, boxes: np.ndarray, focus: CellFocus, context: float = 2.0) -> list[dict]:
    """How well `focus` finds annotated leukocytes: per (x0, y0, x1, y1) box, a square of `context` times the box's
    larger side is cut around it (as a single-cell crop would be) and framed; the record holds whether a cell was
    found and the IoU of the segmented cell's box with the annotated one (0 when none was found)."""
    records = []
    for x0, y0, x1, y1 in boxes:
        side = round(max(x1 - x0, y1 - y0) * context)
        crop, left, top = _cut(field, round((x0 + x1) / 2 - side / 2), round((y0 + y1) / 2 - side / 2), side)
        framed = focus.frame(crop)
        truth = (x0 - left, y0 - top, x1 - left, y1 - top)
        iou = box_iou(framed.cell_box, truth) if framed.cell_box is not None else 0.0
        records.append({"found": bool(framed.ok), "iou": iou, "note": "" if framed.ok else framed.note})
    return records


def framing_against_marks(field: np.ndarray, marks: np.ndarray, focus: CellFocus, side: int = 257) -> list[dict]:
    """Per (x, y) cell centroid: a `side`-px crop centred on it (as ALL-IDB2's crops were cut) is framed; the record
    holds whether a cell was found, the distance from the mark to the segmented cell's box centre, and whether the
    mark lies inside that box."""
    records = []
    for x, y in marks:
        crop, left, top = _cut(field, round(x - side / 2), round(y - side / 2), side)
        framed = focus.frame(crop)
        if framed.cell_box is None:
            records.append({"found": False, "distance": float("nan"), "inside": False, "note": framed.note})
            continue
        bx0, by0, bx1, by1 = framed.cell_box
        mx, my = x - left, y - top
        distance = float(np.hypot((bx0 + bx1) / 2 - mx, (by0 + by1) / 2 - my))
        records.append({"found": True, "distance": distance, "inside": bool(bx0 <= mx <= bx1 and by0 <= my <= by1),
                        "note": ""})  # fmt: skip
    return records


def _cut(field: np.ndarray, left: int, top: int, side: int) -> tuple[np.ndarray, int, int]:
    """A side x side crop of `field` at (left, top), clipped where the field ends (as ALL-IDB2's crops are), and
    the field position of its top-left pixel."""
    h, w = field.shape[:2]
    left, top, right, bottom = max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)
    return field[top:bottom, left:right], left, top
