"""Finding every leukocyte in a smear field: a training-free stain-cue detector.

Steps, all on one RGB field (ALL-IDB1 2592x1944, BCCD 640x480, a lab camera):

1. **Scale.** The typical red-cell diameter in pixels (`estimate_red_cell_diameter`): red cells are most of a
   smear's stained area, so the area-weighted median of the largest inscribed radius of the stained blobs (optical
   density above Otsu's threshold) is their radius. Every size below is a multiple of this diameter (`RBC`), so the
   finder works at any magnification; the field is resampled so that a red cell spans `WORKING_RBC` pixels.
2. **Nuclei.** Leukocyte nuclei (azure-DNA, purple) are far bluer than green; red cells and glass are not. The
   nucleus cue `(B - G) / (R + G + B)` is thresholded at Otsu's level over the bluish pixels (never below
   `NUCLEUS_MIN_CUE`). Pieces closer than `LOBE_GAP` belong to one nucleus (a neutrophil's lobes).
3. **Platelets and debris** are nucleus-coloured too but small: a nucleus below `MIN_NUCLEUS_AREA` red-cell areas
   is not a leukocyte.
4. **Touching cells** are split by a watershed on the nucleus's distance transform when it holds more than one deep
   core (`CORE_DEPTH`), which a lymphocyte or blast nucleus has and a neutrophil's thin lobes do not.
5. **Cell extent.** Each nucleus claims the surrounding cytoplasm-coloured pixels (stained, and not red-cell
   coloured by the blue share of optical density, as `blastscan.imaging.segmentation` explains) up to
   `MAX_CYTOPLASM` beyond it, by a watershed seeded by all nuclei, so neighbours share the gap between them.
6. **Border.** A cell whose mask reaches the field's edge is flagged `touches_border`, not dropped.

Hand-written because no library we use finds leukocytes in Wright/Giemsa fields without training; the pieces are
scikit-image / SciPy operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_multiotsu, threshold_otsu
from skimage.measure import label as label_regions
from skimage.measure import regionprops
from skimage.morphology import remove_small_holes
from skimage.segmentation import watershed

from blastscan.imaging.segmentation import disk_dilate, nucleus_cue, remove_small_components

__all__ = ["FieldFinding", "Leukocyte", "estimate_red_cell_diameter", "find_leukocytes"]

#: Side (pixels) of the thumbnail the red-cell diameter is measured on.
SCALE_SIDE = 400
#: At least this many single, whole red cells give the scale directly (else the crowded-field estimate is used).
MIN_SINGLE_CELLS = 5
#: ... and this many are enough for the median.
MAX_SINGLE_CELLS = 40
#: A blob this convex (area / convex area) is one cell, not touching cells.
SINGLE_SOLIDITY = 0.9
#: A red cell spans this many pixels in the working image the finder runs on (speed vs detail).
WORKING_RBC = 28.0
#: Used when a field shows too few stained blobs to measure (a near-empty field): about ALL-IDB1's 2592 px fields.
DEFAULT_RBC = 80.0
#: The nucleus threshold is Otsu's over bluish pixels but never below this cue (red cells reach ~0.06).
NUCLEUS_MIN_CUE = 0.1
#: Pixels with a cue above this enter Otsu's threshold (glass and red cells are around 0).
BLUISH_CUE = 0.04
# Sizes in red-cell diameters (RBC) or red-cell areas (RBC^2 = pi/4 * RBC diameter^2).
#: Nucleus pieces closer than this (RBC) are one nucleus: a neutrophil's lobes.
LOBE_GAP = 0.12
#: A nucleus smaller than this (red-cell areas) is a platelet, a granule or stain debris, not a leukocyte.
MIN_NUCLEUS_AREA = 0.16
#: Nucleus pieces this close (RBC) join when one of them is not a whole round nucleus (lobes of granulocytes).
LOBE_REACH = 0.5
#: A whole nucleus (which never joins another) covers at least this many red-cell areas ...
WHOLE_NUCLEUS_AREA = 0.35
#: ... and is at least this round (`_roundness`).
WHOLE_ROUNDNESS = 0.8
#: Any nucleus piece this large (red-cell areas) is whole: a granulocyte lobe (about 3 x 4.5 um) is 0.3-0.4 red-cell
#: areas (a red cell is about 38 um^2).
LARGE_NUCLEUS_AREA = 0.6
#: Specks smaller than this (red-cell areas) are dropped before grouping lobes.
MIN_PIECE_AREA = 0.015
#: A nucleus core at least this deep (RBC, the distance to the nucleus edge) is one cell's: two such cores in one
#: nucleus mean two touching cells. Lymphocyte and blast nuclei are ~0.3-0.45 deep; neutrophil lobes ~0.12.
CORE_DEPTH = 0.22
#: A split into pieces whose mean roundness (`_roundness`) is below this is a lobed nucleus and is undone.
SPLIT_ROUNDNESS = 0.76
#: Two cores closer than this (RBC) are one cell's.
CORE_SEPARATION = 0.45
#: The cell reaches at most this far (RBC) beyond its nucleus.
MAX_CYTOPLASM = 0.45
#: Pixels whose OD blue share exceeds max(Otsu, this) are red-cell coloured (see imaging.segmentation).
RED_MIN_CUE = 0.2


@dataclass(frozen=True)
class Leukocyte:
    """One leukocyte in field pixel coordinates.

    `box` is (x0, y0, x1, y1) with exclusive ends; `mask` is the cell's boolean mask inside the box (shape
    (y1 - y0, x1 - x0)); `centroid` is (x, y) of the mask; `area` its pixel count in the field; `score` in [0, 1]
    says how clearly it is a leukocyte (nucleus size and stain contrast), for ranking detections.
    """

    centroid: tuple[float, float]
    box: tuple[int, int, int, int]
    mask: np.ndarray
    area: int
    nucleus_area: int
    touches_border: bool
    score: float

    @property
    def diameter(self) -> float:
        """Equivalent-circle diameter of the cell, in field pixels."""
        return 2.0 * math.sqrt(self.area / math.pi)


@dataclass(frozen=True)
class FieldFinding:
    """The leukocytes of one field, the field's scale and a note on how they were found."""

    cells: tuple[Leukocyte, ...]
    red_cell_diameter: float
    scale_measured: bool
    width: int
    height: int
    note: str

    @property
    def leukocyte_diameter(self) -> float:
        """Median diameter of the cells found (1.5 red cells when none were found), in field pixels."""
        inside = [c.diameter for c in self.cells if not c.touches_border] or [c.diameter for c in self.cells]
        return float(np.median(inside)) if inside else 1.5 * self.red_cell_diameter


def resize_field(image: np.ndarray, factor: float) -> np.ndarray:
    if abs(factor - 1.0) < 1e-3:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(
        Image.fromarray(image).resize(size, Image.Resampling.BOX if factor < 1 else Image.Resampling.BILINEAR)
    )


def _optical_density(pixels: np.ndarray) -> np.ndarray:
    """Per-channel OD relative to the glass (the field's 99th-percentile colour)."""
    illuminant = np.percentile(pixels.reshape(-1, 3), 99.0, axis=0)
    return np.clip(-np.log10((pixels + 1.0) / (illuminant + 1.0)), 0.0, None)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _single_red_cells(stained: np.ndarray, nucleus_coloured: np.ndarray) -> np.ndarray:
    """Equivalent diameters (thumbnail pixels) of the stained blobs that look like one whole red cell: convex,
    round, clear of the border and of nucleus-coloured pixels, their pallor filled."""
    red = stained & ~disk_dilate(nucleus_coloured, 2)
    diameters: list[float] = []
    for region in regionprops(label_regions(red)):
        r0, c0, r1, c1 = region.bbox
        inside = r0 > 0 and c0 > 0 and r1 < red.shape[0] and c1 < red.shape[1]
        if inside and region.area >= 30 and region.solidity > SINGLE_SOLIDITY and region.eccentricity < 0.75:
            diameters.append(2.0 * math.sqrt(region.area_filled / math.pi))
            if len(diameters) >= MAX_SINGLE_CELLS:
                break  # enough for a median; the convex hulls of hundreds more cost time and change nothing
    return np.asarray(diameters)


def estimate_red_cell_diameter(image: np.ndarray) -> float | None:
    """The typical red-cell diameter of an (H, W, 3) uint8 field in pixels, or None when it cannot be measured.

    Stained pixels are those above Otsu's optical-density threshold. With at least `MIN_SINGLE_CELLS` blobs that
    are one whole red cell (convex, round, away from leukocytes), their median equivalent diameter is the answer.
    In crowded fields where red cells touch, it is the area-weighted median, over stained blobs, of the radius of
    the largest disc inside each blob (touching cells share a blob but not a disc), doubled.
    """
    h, w = image.shape[:2]
    factor = min(1.0, SCALE_SIDE / max(h, w))
    small = resize_field(image, factor).astype(np.float64)
    od = ndi.gaussian_filter(_optical_density(small).sum(axis=2), 1.0)
    if float(od.max() - od.min()) < 0.05:
        return None
    # Glass against red cells: nuclei are left out of the threshold, or a few dark leukocytes on pale red cells
    # would make Otsu split nuclei from everything else.
    nucleus_coloured = nucleus_cue(small) > NUCLEUS_MIN_CUE
    rest = od[~nucleus_coloured]
    if rest.size < 100 or float(rest.max() - rest.min()) < 0.05:
        return None
    stained = ndi.binary_opening(od > threshold_otsu(rest))
    singles = _single_red_cells(stained, nucleus_coloured)
    if singles.size >= MIN_SINGLE_CELLS:
        return float(np.median(singles)) / factor
    # Pale centres (pallor) make red cells rings: fill holes up to a twentieth of the thumbnail's side across.
    stained = remove_small_holes(stained, max_size=int((max(small.shape[:2]) / 20) ** 2))
    depth = ndi.distance_transform_edt(stained)
    labels, n = ndi.label(stained)
    if n == 0:
        return None
    index = np.arange(1, n + 1)
    radius = np.asarray(ndi.maximum(depth, labels, index))
    area = np.asarray(ndi.sum(stained, labels, index))
    usable = radius >= 2
    if area[usable].sum() < 0.02 * stained.size:
        return None
    return 2.0 * _weighted_median(radius[usable], area[usable]) / factor


def _nuclei(pixels: np.ndarray, cue: np.ndarray, rbc: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Label image of leukocyte nuclei (lobes grouped, platelets dropped, touching nuclei split), the leukocyte
    material (nucleus or cytoplasm coloured) and the nucleus cue threshold used; `cue` is `nucleus_cue(pixels)`."""
    bluish = cue[cue > BLUISH_CUE]
    threshold = NUCLEUS_MIN_CUE
    if bluish.size > 100 and float(bluish.max() - bluish.min()) > 1e-3:
        # Three classes of bluish pixels (tinted glass or red-cell edges, pale nuclei, dark nuclei): the lower cut
        # keeps a blast's pale, fine chromatin with the nuclei instead of splitting pale from dark nuclei.
        threshold = max(threshold, float(threshold_multiotsu(bluish, classes=3)[0]))
    mask = ndi.binary_opening(cue > threshold)
    rbc_area = math.pi / 4 * rbc**2
    mask = ndi.binary_fill_holes(remove_small_components(mask, MIN_PIECE_AREA * rbc_area))
    material = _leukocyte_material(pixels, mask, rbc)
    groups, n = ndi.label(disk_dilate(mask, LOBE_GAP * rbc / 2))
    groups = groups * mask
    if n == 0:
        return groups, material, threshold
    groups = _join_lobes(_split_touching(groups, rbc), material, rbc)
    areas = np.bincount(groups.ravel())
    big = areas >= MIN_NUCLEUS_AREA * rbc_area
    big[0] = False
    return _compact(np.where(big[groups], groups, 0)), material, threshold


def _compact(labels: np.ndarray) -> np.ndarray:
    """The same regions labelled 1..n (a bincount, not np.unique: no sort of every pixel)."""
    present = np.bincount(labels.ravel()) > 0
    present[0] = False
    lookup = np.cumsum(present).astype(np.int32) * present
    return lookup[labels]


def _join_lobes(groups: np.ndarray, material: np.ndarray, rbc: float) -> np.ndarray:
    """Join the pieces of lobed nuclei: every piece that is not a whole round nucleus (`_is_whole_nucleus`) joins
    the pieces it reaches within `LOBE_REACH` through leukocyte material (a granulocyte's lobes lie in one
    cytoplasm; separate cells are parted by glass or red cells). Whole round nuclei never join each other (touching
    blasts stay apart); a lobe between two of them goes to the nearer. Lobes can lie farther apart than
    `LOBE_GAP`, the more so at high magnification (BCCD)."""
    n = int(groups.max())
    if n < 2:
        return groups
    reach, _ = ndi.label((material & disk_dilate(groups > 0, LOBE_REACH * rbc / 2)) | (groups > 0))
    # Per piece, within its own box (ndimage's labelled statistics would sort every pixel of the field).
    whole = np.zeros(n + 1, dtype=bool)
    centres = np.zeros((n, 2))
    owner_of_piece = np.zeros(n + 1, dtype=int)
    for label, box in enumerate(ndi.find_objects(groups), start=1):
        if box is None:
            continue
        piece = groups[box] == label
        whole[label] = _is_whole_nucleus(piece, rbc)
        rows, cols = np.nonzero(piece)
        centres[label - 1] = (rows.mean() + box[0].start, cols.mean() + box[1].start)
        owner_of_piece[label] = int(reach[box][piece].max())
    target = np.arange(n + 1)
    for region in np.unique(owner_of_piece[owner_of_piece > 0]):
        members = np.flatnonzero(owner_of_piece == region)
        anchors = members[whole[members]]
        if anchors.size <= 1:
            target[members] = members[0] if anchors.size == 0 else anchors[0]
            continue
        for piece in members[~whole[members]]:
            distance = np.hypot(*(centres[anchors - 1] - centres[piece - 1]).T)
            target[piece] = anchors[int(np.argmin(distance))]
    return target[groups]


def _is_whole_nucleus(mask: np.ndarray, rbc: float) -> bool:
    """A nucleus too big to be a lobe, or a round one the size of a lymphocyte's (not a lobe, platelet or fragment)."""
    area = mask.sum() / (math.pi / 4 * rbc**2)
    return area >= LARGE_NUCLEUS_AREA or (area >= WHOLE_NUCLEUS_AREA and _roundness(mask) >= WHOLE_ROUNDNESS)


def _roundness(mask: np.ndarray) -> float:
    """Largest inscribed radius over the equivalent-circle radius: 1 for a disc, ~0.7 for a sausage-shaped lobe."""
    area = int(mask.sum())
    return float(ndi.distance_transform_edt(np.pad(mask, 1)).max() / math.sqrt(area / math.pi)) if area else 0.0


def _split_touching(groups: np.ndarray, rbc: float) -> np.ndarray:
    """Split every nucleus group holding two or more deep cores (touching cells) by a watershed.

    A split is kept only when its pieces are round on average (`SPLIT_ROUNDNESS`): touching blast or lymphocyte
    nuclei split into near-discs, while a lobed nucleus cut at its thin joins gives sausage-shaped lobes. The test
    is scale-free, so it holds where the red-cell scale was misjudged (the depth test alone does not).
    """
    depth = ndi.distance_transform_edt(groups > 0)
    cores = peak_local_max(
        depth,
        min_distance=max(1, round(CORE_SEPARATION * rbc)),
        threshold_abs=CORE_DEPTH * rbc,
        labels=groups,
        exclude_border=False,
    )
    if len(cores) == 0:
        return groups
    owner = groups[cores[:, 0], cores[:, 1]]
    counts = np.bincount(owner, minlength=int(groups.max()) + 1)
    split = np.flatnonzero(counts >= 2)
    if split.size == 0:
        return groups
    markers = np.zeros_like(groups)
    chosen = np.isin(owner, split)
    markers[cores[chosen, 0], cores[chosen, 1]] = np.arange(1, int(chosen.sum()) + 1)
    region = np.isin(groups, split)
    pieces = watershed(-depth, markers, mask=region)
    result = groups.copy()
    offset = int(groups.max())
    boxes = ndi.find_objects(groups)
    for label in split:
        box = boxes[label - 1]
        inside = groups[box] == label
        local = np.where(inside, pieces[box], 0)
        labels = np.unique(local[local > 0])
        if np.mean([_roundness(local == piece) for piece in labels]) < SPLIT_ROUNDNESS:
            continue  # a lobed nucleus, not touching cells: keep it whole
        # Pixels no core's flood reached stay background (adding the offset would alias an existing label).
        result[box][inside] = np.where(local[inside] > 0, local[inside] + offset, 0)
    return _compact(result)


def _leukocyte_material(pixels: np.ndarray, nucleus_coloured: np.ndarray, rbc: float) -> np.ndarray:
    """Pixels that are nucleus or cytoplasm: stained, and not red-cell coloured by the blue share of optical density
    (haemoglobin absorbs blue; basophilic cytoplasm passes it), opened to cut thin red-cell rims."""
    od = _optical_density(pixels)
    stained = od.max(axis=2) > 0.06
    blue_share = od[..., 2] / (od.sum(axis=2) + 1e-3)
    rest = stained & ~nucleus_coloured
    red_threshold = RED_MIN_CUE
    if rest.sum() > 100:
        red_threshold = max(red_threshold, float(threshold_otsu(blue_share[rest])))
    material = (stained & (blue_share <= red_threshold)) | nucleus_coloured
    return ndi.binary_opening(material, iterations=max(1, round(0.05 * rbc))) | nucleus_coloured


def _cells(material: np.ndarray, nuclei: np.ndarray, rbc: float) -> np.ndarray:
    """Label image of whole cells: each nucleus plus the leukocyte material it reaches first."""
    candidate = material | (nuclei > 0)
    from_nucleus = ndi.distance_transform_edt(nuclei == 0)
    candidate &= from_nucleus <= MAX_CYTOPLASM * rbc
    owner = watershed(from_nucleus, nuclei, mask=candidate)
    # Holes (pale granules, vacuoles) belong to the cell around them.
    filled = np.zeros_like(owner)
    for label, box in enumerate(ndi.find_objects(owner), start=1):
        if box is not None:
            filled[box][ndi.binary_fill_holes(owner[box] == label)] = label
    return filled


def _score(nucleus_area: float, rbc: float, contrast: float) -> float:
    """Detection confidence: how far the nucleus is above the platelet size, times its stain contrast."""
    size = min(1.0, nucleus_area / (3 * MIN_NUCLEUS_AREA * math.pi / 4 * rbc**2))
    return float(np.clip(size * min(1.0, contrast / 0.3), 0.0, 1.0))


def find_leukocytes(image: np.ndarray, red_cell_diameter: float | None = None) -> FieldFinding:
    """Every leukocyte in an (H, W, 3) uint8 RGB smear field, in field pixels (see the module docstring).

    `red_cell_diameter` (pixels) skips the scale estimate when the magnification is known. Never raises on a valid
    image: a blank or all-background field gives no cells and a note saying so.
    """
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise ValueError(
            f"find_leukocytes expects an (H, W, 3) uint8 RGB array, got "
            f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}"
        )
    h, w = image.shape[:2]
    measured = red_cell_diameter is None
    rbc_field = red_cell_diameter or estimate_red_cell_diameter(image)
    if rbc_field is None:
        measured, rbc_field = False, DEFAULT_RBC
    factor = min(1.0, WORKING_RBC / rbc_field)
    pixels = ndi.gaussian_filter(resize_field(image, factor).astype(np.float64), sigma=(1, 1, 0))
    rbc = rbc_field * factor
    cue = nucleus_cue(pixels)
    nuclei, material, threshold = _nuclei(pixels, cue, rbc)
    cells = _cells(material, nuclei, rbc) if nuclei.any() else nuclei

    found = []
    for label, box in enumerate(ndi.find_objects(cells), start=1):
        if box is None:
            continue
        local = cells[box] == label
        nucleus = nuclei[box] == label
        if not nucleus.any():
            continue
        found.append(_leukocyte(local, nucleus, box, cue[box], factor, (h, w), rbc))
    found.sort(key=lambda c: (c.centroid[1], c.centroid[0]))
    scale_note = (
        f"red cell {rbc_field:.0f} px ({'measured' if measured else 'given' if red_cell_diameter else 'assumed'})"
    )
    note = f"{len(found)} leukocyte(s); {scale_note}; nucleus cue (B-G)/(R+G+B) > {threshold:.3f}"
    return FieldFinding(
        cells=tuple(found), red_cell_diameter=float(rbc_field), scale_measured=measured, width=w, height=h, note=note
    )


def _leukocyte(
    local: np.ndarray,
    nucleus: np.ndarray,
    box: tuple[slice, slice],
    cue: np.ndarray,
    factor: float,
    field_shape: tuple[int, int],
    rbc: float,
) -> Leukocyte:
    """A working-image cell mapped back to field pixels."""
    h, w = field_shape
    ys, xs = np.nonzero(local)
    y0 = max(0, math.floor(box[0].start / factor))
    x0 = max(0, math.floor(box[1].start / factor))
    y1 = min(h, math.ceil(box[0].stop / factor))
    x1 = min(w, math.ceil(box[1].stop / factor))
    mask = np.asarray(Image.fromarray(local).resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST), dtype=bool)
    # The working image is one pixel coarser than the field at most: a cell within a pixel of the edge touches it.
    edge = 1.5 / factor
    touches = x0 <= edge or y0 <= edge or x1 >= w - edge or y1 >= h - edge
    contrast = float(cue[nucleus].mean() - cue[local & ~nucleus].mean()) if (local & ~nucleus).any() else 0.3
    return Leukocyte(
        centroid=((box[1].start + xs.mean() + 0.5) / factor - 0.5, (box[0].start + ys.mean() + 0.5) / factor - 0.5),
        box=(x0, y0, x1, y1),
        mask=mask,
        area=round(local.sum() / factor**2),
        nucleus_area=round(nucleus.sum() / factor**2),
        touches_border=bool(touches),
        score=_score(float(nucleus.sum()), rbc, contrast),
    )
