"""Cell-centred inputs: frame the segmented leukocyte of a single-cell image, and optionally blank what is around it.

A model trained on whole crops can learn the slide instead of the cell (ALL-IDB2: AUROC barely moves when the cell
is erased). `data.cell_focus` takes that away:

* ``crop``: a square box centred on the segmented cell, its side the cell's larger extent times
  ``1 + 2 * margin`` (so the cell fills the same share of every input, whatever the magnification), padded with the
  image's own border colour where the box leaves the image;
* ``mask``: the same box, and every pixel that is not the cell (or a stained pixel of its rim, within `MASK_HALO`)
  set to `NEUTRAL_FILL` - glass, red cells, neighbours and C-NMC's black surround all become one neutral background.

The cell is found by `blastscan.imaging.segmentation.segment_cell` at its working size; the box and mask are mapped
back to the image's own resolution, so cropping loses no detail. When segmentation fails the image is passed on
whole and the failure is reported (`FramedCell.ok`, `note`), never hidden: callers count and show it.

Why by hand: no library frames a single leukocyte (TIAToolbox and timm crop patches or tiles at fixed places).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from blastscan.imaging.segmentation import WORKING_SIZE, segment_cell
from blastscan.imaging.stain import foreground_mask

#: The values of `data.cell_focus`.
CellFocusMode = Literal["none", "crop", "mask"]
CELL_FOCUS_MODES: tuple[str, ...] = get_args(CellFocusMode)
#: Box side = the cell's larger extent x (1 + 2 x margin).
DEFAULT_MARGIN = 0.25
#: Bump when framing or masking changes the pixels it gives: image caches are keyed on it.
FOCUS_VERSION = 2
#: The background colour of `mask` inputs: mid grey, near the ImageNet mean, so the network sees ~0 there.
NEUTRAL_FILL = (128, 128, 128)
#: The mask also keeps stained pixels this close (pixels at the 128-px working size) to the segmented cell: its rim.
MASK_HALO = 2.0


@dataclass(frozen=True)
class FramedCell:
    """One image framed on its cell: the (cropped) RGB image, the segmented cell's mask at the image's size (None
    when no cell was found), whether a cell was found, and what was done."""

    image: np.ndarray
    mask: np.ndarray | None
    ok: bool
    note: str
    #: The segmented cell's bounding box (x0, y0, x1, y1) in the input image's pixels; None when none was found.
    cell_box: tuple[float, float, float, float] | None = None


def _working_copy(image: np.ndarray) -> tuple[np.ndarray, float]:
    """`image` scaled so its shorter side is WORKING_SIZE (aspect kept), and working pixels per image pixel."""
    h, w = image.shape[:2]
    factor = WORKING_SIZE / min(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)), factor


def border_colour(image: np.ndarray) -> np.ndarray:
    """The median colour of the image's outermost pixel ring (the glass, or the black surround)."""
    ring = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(ring, axis=0).round().astype(np.uint8)


def _square_crop(image: np.ndarray, centre: tuple[float, float], side: int, fill: np.ndarray) -> np.ndarray:
    """A side x side crop of `image` centred on (row, col), padded with `fill` outside the image."""
    h, w = image.shape[:2]
    top, left = round(centre[0] - side / 2), round(centre[1] - side / 2)
    out = np.empty((side, side, image.shape[2]), dtype=image.dtype)
    out[:] = fill
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + side, h), min(left + side, w)
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    return out


@dataclass(frozen=True)
class CellFocus:
    """How inputs are framed on their cell (`mode`: none, crop or mask; `margin`: box margin per side, as a share
    of the cell's extent). `frame(image)` does it to one full-resolution image; `fill(image, mask)` blanks the
    background of an already resized one (so stain normalisation, which runs in between, never sees the fill)."""

    mode: CellFocusMode = "none"
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if self.mode not in CELL_FOCUS_MODES:
            raise ValueError(f"cell_focus must be one of {', '.join(CELL_FOCUS_MODES)}, not {self.mode!r}")
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"cell_focus margin must be between 0 and 2, not {self.margin!r}")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def to_dict(self) -> dict[str, object]:
        """What model.json and preprocessing.json record (and the image cache keys on)."""
        return {
            "mode": self.mode,
            "margin": self.margin,
            "fill": list(NEUTRAL_FILL),
            "halo": MASK_HALO,
            "version": FOCUS_VERSION,
        }

    @classmethod
    def from_dict(cls, state: dict[str, object] | None) -> CellFocus:
        """The framing a model.json / preprocessing.json records; none when it records none (older runs)."""
        if not state:
            return cls()
        return cls(mode=str(state.get("mode", "none")), margin=float(state.get("margin", DEFAULT_MARGIN)))  # type: ignore[arg-type]

    def frame(self, image: np.ndarray) -> FramedCell:
        """`image` framed on its central leukocyte; the image unchanged (ok=False, with the reason) when none is
        found. With mode none the image is returned as it is (ok=True)."""
        if not self.active:
            return FramedCell(image, None, True, "no cell focus")
        working, factor = _working_copy(image)
        seg = segment_cell(working)
        if not seg.ok:
            return FramedCell(image, None, False, f"no cell found, image used whole: {seg.note}")
        rows, cols = np.nonzero(seg.cell)
        extent = max(np.ptp(rows), np.ptp(cols)) + 1
        centre = ((rows.min() + rows.max() + 1) / 2 / factor, (cols.min() + cols.max() + 1) / 2 / factor)
        side = max(8, round(extent * (1 + 2 * self.margin) / factor))
        crop = _square_crop(image, centre, side, border_colour(image))
        note = f"cell {extent / factor:.0f} px across, box {side} px"
        full = np.asarray(Image.fromarray(seg.cell).resize((image.shape[1], image.shape[0]), Image.Resampling.NEAREST))
        mask = _square_crop(full[..., None], centre, side, np.zeros(1, dtype=bool))[..., 0]
        cell_box = (cols.min() / factor, rows.min() / factor, (cols.max() + 1) / factor, (rows.max() + 1) / factor)
        return FramedCell(crop, mask, True, note, tuple(float(v) for v in cell_box))  # type: ignore[arg-type]

    def fill(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """`image` with everything but the cell set to NEUTRAL_FILL. Kept: the cell `mask` (any size; resized to
        the image by nearest neighbour) and the stained pixels within MASK_HALO (at the 128-px working size) of it,
        its membrane; glass, red cells and black surround around it all go, so no rim of the slide's background
        colour is left to tell one laboratory from another."""
        h, w = image.shape[:2]
        mask = resize_cell_mask(mask, (h, w))
        grown = ndi.distance_transform_edt(~mask) <= MASK_HALO * min(h, w) / WORKING_SIZE
        keep = mask | (grown & foreground_mask(image))
        out = image.copy()
        out[~keep] = NEUTRAL_FILL
        return out


def resize_cell_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized to (H, W) by nearest neighbour."""
    if mask.shape == tuple(shape):
        return mask
    return np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
