"""Segmenting the central leukocyte of a single-cell crop into nucleus and cell (nucleus + cytoplasm).

Works on Wright (ALL-IDB) and May-Grünwald-Giemsa (CellaVision / DeepAPL) crops, on grey, peach or white glass and
on the black surround of pre-segmented cells (C-NMC). Two colour cues, both chosen by looking at both datasets:

* nucleus: the chromatic blue-minus-green share `(B - G) / (R + G + B)`. Chromatin (azure-DNA, purple) is far bluer
  than green; red cells and glass are not (glass ~ -0.03, red cells ~ 0.03-0.06, nuclei 0.2-0.5 on both datasets).
  Being a ratio, it ignores brightness and most of the glass tint.
* cytoplasm versus red cells: the blue share of optical density, `OD_B / (OD_R + OD_G + OD_B)`. Haemoglobin absorbs
  blue (Soret band), while basophilic cytoplasm absorbs red and passes blue; red cells ~0.25-0.45, cytoplasm lower.

Nucleus = Otsu threshold of the nucleus cue over the stained pixels (`blastscan.imaging.stain.foreground_mask`), never
below `NUCLEUS_MIN_CUE`, cleaned (opening, specks removed, holes filled); components closer than `LOBE_GAP` form one
nucleus (a neutrophil's lobes are separate components of one nucleus), and the nucleus nearest the image centre is
kept, less pieces far smaller than its largest (platelets, granules).
Cell = stained pixels that are neither red-cell coloured (OD blue share above Otsu's threshold) nor nucleus coloured
outside the nucleus, opened to cut thin red-cell rims; split by a watershed on the distance transform between this
nucleus, other nuclei in view, and pale red cells (round deep blobs clear of the nucleus); kept within
`MAX_CYTOPLASM` of the nucleus, with narrow spurs away from the nucleus dropped and holes filled. A crop on black
(C-NMC) has no red cells: every stained pixel counts as cell there.
Sizes are given for a 128-pixel image and scale with the image's shorter side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from blastscan.imaging.stain import BLACK_LEVEL, SEGMENTED_BLACK_SHARE, foreground_mask

__all__ = [
    "CellSegmentation",
    "disk_dilate",
    "nucleus_cue",
    "remove_small_components",
    "save_segmentation_figure",
    "segment_cell",
    "segmentation_gallery",
]

#: The side the feature extractors resize images to before segmenting (and the gallery shows them at).
WORKING_SIZE = 128
#: The image side that the sizes below are given for; they scale with min(H, W) / REFERENCE_SIDE.
REFERENCE_SIDE = 128
#: The nucleus threshold is Otsu's on the stained pixels but never below this cue value (red cells reach ~0.06).
NUCLEUS_MIN_CUE = 0.1
#: Fewer stained pixels than this fraction of the image: nothing to segment.
MIN_STAINED = 0.005
#: Nucleus pieces smaller than this (pixels at 128 px) are specks or platelet fragments, not lobes.
MIN_LOBE_AREA = 12
#: A nucleus smaller than this (pixels at 128 px) is not accepted (platelets are ~20-50 px at 128 px).
MIN_NUCLEUS_AREA = 40
#: A nucleus piece smaller than this share of its largest piece is a platelet or granule, not a lobe.
LOBE_MIN_SHARE = 0.1
#: Nucleus components closer than this (pixels at 128 px) belong to one nucleus (neutrophil lobes).
LOBE_GAP = 6
#: Pixels whose OD blue share exceeds max(Otsu's threshold, this) are red cells (cytoplasm ~0.13-0.23, red cells
#: ~0.24-0.28 in DeepAPL and 0.36-0.44 in ALL-IDB2); the floor keeps Otsu from cutting the cytoplasm in two when
#: few red cells are in view.
RED_MIN_CUE = 0.2
#: A stained blob at least this deep (pixels at 128 px) and clear of the nucleus is another object (a red cell).
RED_CELL_RADIUS = 6
#: ... if its mean OD blue share is within this of the red-cell threshold (cytoplasm is ~0.05-0.1 below it).
RED_MARGIN = 0.04
#: The cell reaches at most this far (pixels at 128 px) beyond the nucleus.
MAX_CYTOPLASM = 30
#: Parts of the cell narrower than twice this (pixels at 128 px) and farther than it from the nucleus are dropped.
SPUR_WIDTH = 4


@dataclass
class CellSegmentation:
    """The central leukocyte of one image: boolean (H, W) masks, whether it worked, and what was done.

    `cell` contains `nucleus`. When `ok` is False both masks are empty and `note` says why.
    """

    nucleus: np.ndarray
    cell: np.ndarray
    ok: bool
    note: str

    @property
    def cytoplasm(self) -> np.ndarray:
        """Cell minus nucleus."""
        return self.cell & ~self.nucleus


def nucleus_cue(pixels: np.ndarray) -> np.ndarray:
    """(H, W) blue-minus-green share `(B - G) / (R + G + B + 1)` of (H, W, 3) RGB pixels: high on nuclei only."""
    pixels = np.asarray(pixels, dtype=np.float64)
    return (pixels[..., 2] - pixels[..., 1]) / (pixels.sum(axis=2) + 1.0)


def disk_dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilation by a disk, via the distance transform (constant time in the radius, unlike a footprint)."""
    if not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask) <= radius


def _erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Erosion by a disk; the image border does not erode."""
    return ndi.distance_transform_edt(mask) > radius


def _open(mask: np.ndarray, radius: float) -> np.ndarray:
    return disk_dilate(_erode(mask, radius), radius)


def remove_small_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """`mask` without its connected components smaller than `min_area` pixels."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def _failed(shape: tuple[int, int], note: str) -> CellSegmentation:
    empty = np.zeros(shape, dtype=bool)
    return CellSegmentation(nucleus=empty, cell=empty.copy(), ok=False, note=note)


def _optical_density(pixels: np.ndarray, black: np.ndarray) -> np.ndarray:
    """Per-channel OD relative to the glass (98th-percentile colour; white for cells on black)."""
    if black.mean() >= SEGMENTED_BLACK_SHARE:
        illuminant = np.full(3, 255.0)
    else:
        illuminant = np.percentile(pixels.reshape(-1, 3), 98.0, axis=0)
    return np.clip(-np.log10((pixels + 1.0) / (illuminant + 1.0)), 0.0, None)


def _nucleus(cue: np.ndarray, stained: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    threshold = max(float(threshold_otsu(cue[stained])), NUCLEUS_MIN_CUE)
    mask = (cue > threshold) & stained
    mask = ndi.binary_opening(mask, structure=ndi.generate_binary_structure(2, 1))
    mask = remove_small_components(mask, MIN_LOBE_AREA * scale**2)
    mask = ndi.binary_fill_holes(mask)
    return mask, threshold


def _nucleus_groups(mask: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """Label image of the nuclei in `mask` (components closer than `LOBE_GAP` form one nucleus, big enough ones
    only) and the label of the one nearest the image centre (0 when there is none)."""
    groups, n = ndi.label(disk_dilate(mask, LOBE_GAP * scale / 2))
    groups = groups * mask
    if n == 0:
        return groups, 0
    areas = np.bincount(groups.ravel(), minlength=n + 1)
    big = areas >= MIN_NUCLEUS_AREA * scale**2
    big[0] = False
    groups = np.where(big[groups], groups, 0)
    if not big.any():
        return groups, 0
    h, w = mask.shape
    yy, xx = np.mgrid[:h, :w]
    distance = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    nearest = np.full(n + 1, np.inf)
    nearest[big] = ndi.minimum(distance, labels=groups, index=np.flatnonzero(big))
    return groups, int(np.argmin(nearest))


def _drop_specks(nucleus: np.ndarray) -> np.ndarray:
    """Components much smaller than the nucleus's largest piece are platelets or granules beside it, not lobes."""
    labels, n = ndi.label(nucleus)
    if n <= 1:
        return nucleus
    areas = np.bincount(labels.ravel())
    keep = areas >= LOBE_MIN_SHARE * areas[1:].max()
    keep[0] = False
    return keep[labels]


def _cell(
    smooth: np.ndarray,
    black: np.ndarray,
    stained: np.ndarray,
    candidates: np.ndarray,
    groups: np.ndarray,
    central: int,
    nucleus: np.ndarray,
    segmented: bool,
    scale: float,
) -> tuple[np.ndarray, float]:
    """The cell (nucleus + cytoplasm) mask, and the OD blue-share threshold above which pixels are red cells."""
    od = _optical_density(smooth, black)
    blue_share = od[..., 2] / (od.sum(axis=2) + 1e-3)
    rest = stained & (groups == 0)
    if segmented or rest.sum() <= 10:
        # A cell cut out onto black (C-NMC) has no red cells around it: every stained pixel is the cell's.
        red_threshold = np.inf
    else:
        red_threshold = max(float(threshold_otsu(blue_share[rest])), RED_MIN_CUE)
    # Cytoplasm is stained, not red-cell coloured and not nucleus coloured (platelets and other nuclei beside it).
    candidate = stained & (blue_share <= red_threshold) & ~(candidates & ~nucleus)
    # Opening cuts the thin red-cell rims and glass specks that touch the cell.
    candidate = _open(candidate, 2 * scale) | (groups > 0)

    # Split the candidate region at its narrowest points between this nucleus, other nuclei (a touching leukocyte
    # keeps its own cytoplasm) and red cells pale enough to pass the colour test. Those are deep round blobs clear of
    # the nucleus whose colour is near the red-cell threshold; deep pale cytoplasm far from the nucleus (monocytes)
    # is well below it.
    markers = groups.copy()
    markers[(groups == central) & ~nucleus] = 0
    depth = ndi.distance_transform_edt(candidate)
    from_nucleus = ndi.distance_transform_edt(~nucleus)
    window = 2 * round(RED_CELL_RADIUS * scale) + 1
    peaks = (depth == ndi.maximum_filter(depth, size=window)) & (depth >= RED_CELL_RADIUS * scale)
    peaks &= (from_nucleus > depth + SPUR_WIDTH * scale) & (groups == 0)
    peaks &= ndi.uniform_filter(blue_share, size=window) > red_threshold - RED_MARGIN
    markers[peaks] = groups.max() + 1 + np.arange(int(peaks.sum()))
    owner = watershed(-depth, markers, mask=candidate)

    cell = (owner == central) & (from_nucleus <= MAX_CYTOPLASM * scale)
    # Red-cell spurs: narrow parts of the cell are dropped unless they hug the nucleus (a thin lymphocyte rim).
    spur = SPUR_WIDTH * scale
    cell = _open(cell, spur) | (cell & (from_nucleus <= spur)) | nucleus
    labels, _ = ndi.label(cell)
    cell = ndi.binary_fill_holes(np.isin(labels, np.unique(labels[nucleus])))
    return cell, red_threshold


def segment_cell(image: np.ndarray) -> CellSegmentation:
    """Nucleus and cell masks of the leukocyte nearest the centre of an (H, W, 3) uint8 RGB crop.

    Never raises on a valid image: a blank, black or one-colour image, or one without nucleus-coloured pixels,
    gives `ok=False`, empty masks and a note saying why.
    """
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise ValueError(
            f"segment_cell expects an (H, W, 3) uint8 RGB array, got "
            f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}"
        )
    h, w = image.shape[:2]
    if min(h, w) < 16:
        return _failed((h, w), f"image too small to segment ({h}x{w})")
    scale = min(h, w) / REFERENCE_SIDE
    pixels = image.astype(np.float64)
    black = image.max(axis=2) <= BLACK_LEVEL
    if black.mean() > 0.99:
        return _failed((h, w), "black image: no cell")
    stained = foreground_mask(image)
    if stained.mean() < MIN_STAINED:
        return _failed((h, w), f"blank or one-colour image: only {stained.mean():.1%} of pixels are stained")

    smooth = ndi.gaussian_filter(pixels, sigma=(scale, scale, 0))
    cue = nucleus_cue(smooth)
    candidates, threshold = _nucleus(cue, stained, scale)
    groups, central = _nucleus_groups(candidates, scale)
    if central == 0:
        peak = float(np.percentile(cue[stained], 99))
        return _failed(
            (h, w),
            f"no nucleus-like pixels: nucleus cue (B-G)/(R+G+B) reaches {peak:.3f}, threshold {threshold:.3f}",
        )
    nucleus = _drop_specks(groups == central)

    segmented = bool(black.mean() >= SEGMENTED_BLACK_SHARE)
    cell, red_threshold = _cell(smooth, black, stained, candidates, groups, central, nucleus, segmented, scale)
    lobes = ndi.label(nucleus)[1]
    cell_rule = (
        "all stained pixels (cell on black, or no red cells in view)"
        if not np.isfinite(red_threshold)
        else f"stained, OD blue share <= {red_threshold:.2f} (not red cell)"
    )
    note = (
        f"nucleus: (B-G)/(R+G+B) > {threshold:.3f}, {lobes} component(s), {nucleus.mean():.1%} of image; "
        f"cell: {cell_rule}, joined to the nucleus, {cell.mean():.1%} of image"
    )
    return CellSegmentation(nucleus=nucleus, cell=cell, ok=True, note=note)


def save_segmentation_figure(
    images: list[np.ndarray], titles: list[str], out: Path, *, size: int | None = None
) -> Path:
    """Save a PNG grid of the images with `segment_cell`'s nucleus (blue) and cell (yellow) contours drawn on them.

    With `size`, each image is first resized to `size` x `size` (as the feature extractors do), so the figure shows
    exactly what the features measured. A panel whose segmentation failed says why. Returns `out`.
    """
    import textwrap

    from matplotlib.figure import Figure

    from blastscan.data.images import resize_rgb

    out = Path(out)
    cols = max(1, min(4, len(images)))
    rows = max(1, -(-len(images) // cols))
    # Figure without pyplot: no global state, safe from worker threads.
    fig = Figure(figsize=(3.2 * cols, 3.6 * rows), layout="constrained")
    fig.suptitle("nucleus (blue) and cell (yellow) found by segment_cell", fontsize=10)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(images):
            ax.axis("off")
            if not images:
                ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes)
            continue
        image = images[i] if size is None else resize_rgb(images[i], size)
        seg = segment_cell(image)
        ax.imshow(image)
        title = titles[i] if i < len(titles) else ""
        if seg.ok:
            ax.contour(seg.cell, levels=[0.5], colors=["#ffd400"], linewidths=1.5)
            ax.contour(seg.nucleus, levels=[0.5], colors=["#1f4fff"], linewidths=1.5)
            ratio = seg.nucleus.sum() / seg.cell.sum()
            ax.set_title(f"{title}\nnucleus/cell area {ratio:.2f}", fontsize=8)
        else:
            ax.set_title(f"{title}\nsegmentation failed", fontsize=8, color="#c53030")
            ax.text(
                0.5,
                0.5,
                textwrap.fill(seg.note, 30),
                ha="center",
                va="center",
                fontsize=7,
                transform=ax.transAxes,
                bbox={"facecolor": "white", "alpha": 0.8},
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor="white")
    return out


def segmentation_gallery(
    manifest_paths: Sequence[str | Path],
    out: Path,
    n: int = 8,
    *,
    labels: Sequence[str] | None = None,
    size: int | None = WORKING_SIZE,
) -> Path:
    """Load up to `n` images from `manifest_paths` and save their segmentation figure (`save_segmentation_figure`).

    Images are taken evenly spread over the list; with `labels` (one per path), evenly spread within each label in
    turn, so every class shows. Unreadable files are skipped. `size` is the working size the features use.
    """
    from blastscan.data.images import load_rgb
    from blastscan.errors import DatasetError

    paths = [Path(p) for p in manifest_paths]
    keys = [""] * len(paths) if labels is None else [str(label) for label in labels]
    if len(keys) != len(paths):
        raise ValueError(f"segmentation_gallery: {len(paths)} paths but {len(keys)} labels")
    by_label: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_label.setdefault(key, []).append(i)
    # Round-robin over labels, each label's rows visited in an evenly spread order.
    quota = -(-n // max(1, len(by_label)))
    queues = [_spread(rows, quota) for rows in by_label.values()]
    order = [q[j] for j in range(max(map(len, queues), default=0)) for q in queues if j < len(q)]
    images, titles = [], []
    for i in order:
        if len(images) >= n:
            break
        try:
            images.append(load_rgb(paths[i]))
        except DatasetError:
            continue
        name = f"{paths[i].parent.name}/{paths[i].name}" if paths[i].parent.name else paths[i].name
        titles.append(f"{keys[i]}: {name}" if keys[i] else name)
    return save_segmentation_figure(images, titles, out, size=size)


def _spread(rows: list[int], k: int) -> list[int]:
    """`k` evenly spaced members of `rows` first, then the rest in order (fallbacks for unreadable files)."""
    if not rows:
        return []
    first = sorted({int(j) for j in np.linspace(0, len(rows) - 1, min(k, len(rows))).round()})
    return [rows[j] for j in first] + [r for j, r in enumerate(rows) if j not in set(first)]
