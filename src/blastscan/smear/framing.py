"""Framing field crops the way a classifier's training images were framed.

A classifier learns at one framing: ALL-IDB2 crops show the leukocyte filling about half of a 257-pixel square,
DeepAPL's CellaVision images a centred cell of about a third of the square. A crop cut from a field must show the
cell at the same share of the image, or the network sees a cell of the wrong apparent size. The share is measured
on the run's own training images with `segment_cell` (the cell's equivalent diameter over the image's shorter side)
and the field crop's side is the found cell's diameter divided by that share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blastscan.data.images import load_resized
from blastscan.errors import BlastscanError
from blastscan.imaging.segmentation import WORKING_SIZE, segment_cell

__all__ = ["DEFAULT_CELL_FRACTION", "Framing", "crop_cells", "measure_framing"]

#: The share used when a run's training images cannot be measured (no cell segmented in any).
DEFAULT_CELL_FRACTION = 0.5
#: Shares outside this range are not plausible framings of a single cell (segmentation took the wrong object).
PLAUSIBLE = (0.15, 0.95)


@dataclass(frozen=True)
class Framing:
    """Cell diameter / image side in the training images (median), and how many images it was measured on."""

    cell_fraction: float
    measured_on: int
    source: str

    def crop_side(self, cell_diameter: float) -> float:
        """The side (field pixels) of a square crop that shows a cell of `cell_diameter` at the training share."""
        return cell_diameter / self.cell_fraction


def measure_framing(paths: Sequence[str | Path], limit: int = 48, seed: int = 0) -> Framing:
    """The median cell share of up to `limit` images (a seeded sample), segmented at 128 px."""
    paths = list(paths)
    if not paths:
        return Framing(DEFAULT_CELL_FRACTION, 0, "default (no training images)")
    rng = np.random.default_rng(seed)
    chosen = [paths[i] for i in sorted(rng.choice(len(paths), size=min(limit, len(paths)), replace=False))]
    shares = []
    for path in chosen:
        try:
            image = load_resized(path, WORKING_SIZE)
        except (OSError, ValueError, BlastscanError):
            continue  # an unreadable training image says nothing about the framing
        segmentation = segment_cell(image)
        if segmentation.ok:
            share = 2 * math.sqrt(segmentation.cell.sum() / math.pi) / WORKING_SIZE
            if PLAUSIBLE[0] <= share <= PLAUSIBLE[1]:
                shares.append(share)
    if not shares:
        return Framing(DEFAULT_CELL_FRACTION, 0, "default (no cell segmented in the training images)")
    return Framing(float(np.median(shares)), len(shares), f"median over {len(shares)} training images")


def crop_cells(
    image: np.ndarray, centroids: Sequence[tuple[float, float]], sides: Sequence[float], fill: np.ndarray | None = None
) -> list[np.ndarray]:
    """Square (side x side) crops of an (H, W, 3) field centred on each (x, y); outside the field is `fill`
    (default: the field's glass colour, its 98th-percentile pixel), as a crop would show more glass."""
    h, w = image.shape[:2]
    if fill is None:
        fill = np.percentile(image[:: max(1, h // 256), :: max(1, w // 256)].reshape(-1, 3), 98, axis=0)
    fill = np.asarray(fill, dtype=np.uint8)
    crops = []
    for (x, y), side in zip(centroids, sides, strict=True):
        s = max(8, round(side))
        x0, y0 = round(x - s / 2), round(y - s / 2)
        crop = np.empty((s, s, 3), dtype=np.uint8)
        crop[:] = fill
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + s), min(h, y0 + s)
        if sx1 > sx0 and sy1 > sy0:
            crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        crops.append(crop)
    return crops
